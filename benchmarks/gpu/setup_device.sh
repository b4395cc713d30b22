#!/usr/bin/env bash
# On the GPU machine (no network; python3 with torch 2.11+cu130 and transformers): installs what
# pack.sh brought into SITE, makes the models, and prints the environment to run with.
#   bash benchmarks/gpu/setup_device.sh STAGE [SITE] [MODELS]
# STAGE holds the unpacked bundle (wheels/, vllm.tar.zst, gguf/, bin/, the trace, llama-3.1-8b-shape/).
set -euo pipefail
stage=${1:?usage: setup_device.sh STAGE [SITE] [MODELS]}; site=${2:-/root/site}; models=${3:-/root/models}
repo=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$site" "$models" "$stage/bin"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$stage"/wheels/*.whl
# No zstd binary there: python's zstandard (one of the wheels) unpacks vLLM.
PYTHONPATH=$site python3 - "$stage/vllm.tar.zst" "$site" <<'PY'
import sys, tarfile, zstandard
with open(sys.argv[1], "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as reader:
    tarfile.open(fileobj=reader, mode="r|").extractall(sys.argv[2], filter="tar")
PY
# vLLM finds general plugins by entry point; dynamo_lite is on PYTHONPATH, not installed, so give it
# the dist-info that names its NIXL progress-thread plugin (nixl_progress.py).
mkdir -p "$site/dynamo_lite-0.1.0.dist-info"
printf 'Metadata-Version: 2.1\nName: dynamo_lite\nVersion: 0.1.0\n' > "$site/dynamo_lite-0.1.0.dist-info/METADATA"
printf '[vllm.general_plugins]\ndynamo_lite_nixl_progress = dynamo_lite.vllm.nixl_progress:register\n' \
  > "$site/dynamo_lite-0.1.0.dist-info/entry_points.txt"
for b in etcd nats-server; do python3 -c "import gzip, shutil, sys; shutil.copyfileobj(gzip.open(sys.argv[1]), open(sys.argv[2], 'wb'))" "$stage/bin/$b.gz" "$stage/bin/$b"; chmod +x "$stage/bin/$b"; done
PYTHONPATH=$site:$stage/gguf:$repo python3 "$repo/scripts/prepare_model.py" --output "$models/SmolLM2-135M-Instruct"
rm -rf "$models/llama-3.1-8b-shape"; cp -r "$stage/llama-3.1-8b-shape" "$models/"
(cd "$repo" && PYTHONPATH=$site:$repo python3 -c "import vllm, nixl, vllm.entrypoints.openai.api_server, dynamo_lite.vllm.engine; print('vllm', vllm.__version__, 'ok')")
echo "export PYTHONPATH=$site:$repo DYN_TEST_ETCD=$stage/bin/etcd DYN_TEST_NATS=$stage/bin/nats-server DYN_MODEL_PATH=$models/SmolLM2-135M-Instruct"
