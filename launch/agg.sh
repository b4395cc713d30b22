#!/usr/bin/env bash
# Aggregated serving: etcd + NATS (unless ETCD_ENDPOINTS / NATS_SERVER are given), the OpenAI frontend and
# one vLLM worker that runs both prefill and decode. Stays in the foreground; Ctrl-C stops everything.
#
#   bash launch/agg.sh [--no-frontend] [--timeout SECS] [-- EXTRA WORKER ARGS...]
#
#   --no-frontend   start only the worker (a second node of a multi-node setup: export ETCD_ENDPOINTS,
#                   NATS_SERVER and ADVERTISE_HOST first; see docs/multi-node.md)
#   --timeout SECS  how long to wait for the worker to serve the model (default 600)
#   --engine mocker simulated workers (dynamo_lite.mocker) instead of vLLM: the same stack in seconds
#
# Environment: see launch/common.sh (HTTP_PORT, MODEL_PATH, SERVED_MODEL_NAME, VLLM_CPU_KVCACHE_SPACE,
# WORKER_ARGS, FRONTEND_ARGS, RUN_DIR, ...). Run scripts/setup.sh once first (scripts/run.sh does).
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
dl_launch 2,13 agg "$@"
