#!/usr/bin/env bash
# Data-parallel serving with KV routing to ranks: etcd + NATS (unless ETCD_ENDPOINTS / NATS_SERVER are given),
# the OpenAI frontend in --router-mode kv and ONE worker with --data-parallel-size DP_SIZE (default 2): one
# instance, one address, DP_SIZE ranks that each hold their own KV cache (vLLM: one engine core per rank,
# rank r pinned to core r via VLLM_CPU_OMP_THREADS_BIND="0|1|..."). The worker registers its ranks and relays
# each rank's KV events; the router picks a (worker, rank) for every request and the worker runs it there.
# Stays in the foreground; Ctrl-C stops everything.
#
#   bash launch/dep.sh [--timeout SECS] [--engine mocker] [-- EXTRA WORKER ARGS...]
#
#   --timeout SECS  how long to wait for the worker to serve the model (default 600)
#   --engine mocker a simulated worker (dynamo_lite.mocker --data-parallel-size): the same stack in seconds
#
# Environment: DP_SIZE (2) ranks; CPU_COUNT (nproc) cores the ranks are pinned over. Which rank a prompt
# would go to: POST /debug/route (its "choice_dp_rank"). Other environment: see launch/common.sh.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
dl_launch 2,15 dep "$@"
