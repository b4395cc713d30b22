#!/usr/bin/env bash
# Disaggregated serving with KV-aware routing: etcd + NATS (unless ETCD_ENDPOINTS / NATS_SERVER are given),
# the OpenAI frontend in --router-mode kv, a pool of PREFILL_WORKERS vLLM prefill workers (the router picks
# the one holding the longest cached prefix of each prompt, from their KV events) and a pool of DECODE_WORKERS
# vLLM decode workers (picked by load), joined by vLLM's NixlConnector. Engines are pinned to the machine's
# cores round-robin (VLLM_CPU_OMP_THREADS_BIND=0, 1, ..., wrapping; CPU_COUNT overrides `nproc`).
# Stays in the foreground; Ctrl-C stops everything.
#
#   PREFILL_WORKERS=2 DECODE_WORKERS=1 bash launch/disagg_router.sh [--timeout SECS] [-- EXTRA WORKER ARGS...]
#
#   --timeout SECS  how long to wait for every worker to register (default 900)
#   --engine mocker simulated workers (dynamo_lite.mocker) instead of vLLM: the same stack in seconds
#
# Each CPU engine takes ~2-3 GB of memory (VLLM_CPU_KVCACHE_SPACE GiB of it KV cache). Frontend flags go in
# FRONTEND_ARGS (e.g. "--disagg-min-prefill-tokens 128 --max-prefill-queue 2"); inspect a decision with
#   curl -s localhost:8000/debug/route -H 'content-type: application/json' \
#        -d '{"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "prompt": "..."}'    (see its "prefill" part)
# Other environment: see launch/common.sh.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
dl_launch 2,18 disagg_router "$@"
