#!/usr/bin/env bash
# Aggregated serving with KV-aware routing: etcd + NATS (unless ETCD_ENDPOINTS / NATS_SERVER are given), the
# OpenAI frontend in --router-mode kv and two vLLM workers, each pinned to its own core
# (VLLM_CPU_OMP_THREADS_BIND=0 and =1: two engines on a small box starve each other unpinned). The router
# follows both workers' KV events over NATS and sends each prompt where its prefix is cached.
# Stays in the foreground; Ctrl-C stops everything.
#
#   bash launch/agg_router.sh [--timeout SECS] [-- EXTRA WORKER ARGS...]
#
#   --timeout SECS  how long to wait for both workers to serve the model (default 600)
#   --engine mocker simulated workers (dynamo_lite.mocker) instead of vLLM: the same stack in seconds
#
# Inspect a routing decision without running it:
#   curl -s localhost:8000/debug/route -H 'content-type: application/json' \
#        -d '{"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "prompt": "..."}'
# Router flags go in FRONTEND_ARGS (e.g. "--kv-overlap-score-weight 2 --router-temperature 0.5", or
# "--no-kv-events" for approximate routing without NATS). Other environment: see launch/common.sh.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
dl_launch 2,17 agg_router "$@"
