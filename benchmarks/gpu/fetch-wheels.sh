#!/usr/bin/env bash
# Builds, on a machine with package access, what vLLM 0.24.0 needs on a GPU machine that has Python 3.12,
# torch 2.11.0+cu130 and transformers but no network (the H200 machine): a stripped vLLM archive split in
# 50 MB parts, and the wheels vLLM and dynamo_lite import that such a machine lacks.
#   bash fetch-wheels.sh OUT_DIR
# Then, there: join the parts, unpack them with python's zstandard (no zstd binary there), pip install the
# wheels with --no-index --no-deps --target SITE, put SITE first on PYTHONPATH (pack.sh and setup_device.sh
# beside this file do all of that; README.md says how).
set -euo pipefail
out=${1:?usage: fetch-wheels.sh OUT_DIR}; mkdir -p "$out/wheels" "$out/vllm"
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux_2_31_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download -q --no-deps "${plat[@]}" -d "$out/vllm" vllm==0.24.0
python3 -m pip download -q --no-deps "${plat[@]}" -d "$out/wheels" \
  pydantic pydantic-core annotated-types typing-inspection msgspec pyzmq blake3 cachetools cbor2 pybase64 setproctitle \
  "openai>=2.0,<2.20" partial-json-parser "fastapi>=0.133,<0.137" starlette "compressed-tensors==0.17.0" "depyf==0.20.0" \
  astor dill "lark==1.2.2" "xgrammar==0.2.8" "apache-tvm-ffi==0.1.11" "llguidance>=1.7,<1.8" "outlines_core==0.2.14" gguf \
  "diskcache==5.6.3" mistral-common pycountry openai-harmony python-json-logger watchfiles ijson jsonschema \
  jsonschema-specifications referencing rpds-py "lm-format-enforcer==0.11.3" interegular prometheus-fastapi-instrumentator \
  aetcd nats-py uvicorn httptools distro jiter sniffio anyio h11 zstandard "nixl==1.5.1" "nixl-cu13==1.5.1"
# Not needed on Hopper, and too large to carry: flash-attention 2 (FA3 serves sm90), the Rust binary, C++ headers.
tmp=$(mktemp -d); (cd "$tmp" && unzip -q "$out"/vllm/vllm-0.24.0-*.whl && rm -f vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/vllm-rs \
  && find . -path '*third_party*' \( -name '*.hpp' -o -name '*.h' -o -name '*.cuh' \) -delete && tar cf - . | zstd -q -T0 -12 -o "$out/vllm.tar.zst")
(cd "$out" && split -b 50M -d vllm.tar.zst vllm.tar.zst.part. && rm vllm.tar.zst vllm/*.whl); rm -rf "$tmp"
ls -la "$out" "$out/wheels" | tail -n +1 | awk '{s+=$5} END {print "total bytes:", s}'
