#!/usr/bin/env bash
# Disaggregated serving: etcd + NATS (unless ETCD_ENDPOINTS / NATS_SERVER are given), the OpenAI frontend,
# one vLLM prefill worker and one vLLM decode worker joined by vLLM's NixlConnector. Each engine is pinned to
# its own core (prefill VLLM_CPU_OMP_THREADS_BIND=PREFILL_CPUS (0), decode DECODE_CPUS (1)). A prompt whose
# uncached part reaches --disagg-min-prefill-tokens (frontend flag, default 256) is prefilled on the prefill
# worker, whose KV blocks the decode worker then pulls; shorter prompts prefill on the decode worker.
# Stays in the foreground; Ctrl-C stops everything.
#
#   bash launch/disagg.sh [--timeout SECS] [-- EXTRA WORKER ARGS...]
#
#   --timeout SECS  how long to wait for both workers to register (default 600)
#   --engine mocker simulated workers (dynamo_lite.mocker) instead of vLLM: the same stack in seconds
#
# Frontend flags go in FRONTEND_ARGS (e.g. "--disagg-min-prefill-tokens 128 --enforce-disagg"); see
# `python -m dynamo_lite.frontend --help`. Other environment: see launch/common.sh.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
dl_launch 2,15 disagg "$@"
