#!/usr/bin/env bash
# Aggregated serving: etcd + NATS (unless ETCD_ENDPOINTS / NATS_SERVER are given), the OpenAI frontend and
# one vLLM worker that runs both prefill and decode. Stays in the foreground; Ctrl-C stops everything.
#
#   bash launch/agg.sh [--no-frontend] [--timeout SECS] [-- EXTRA WORKER ARGS...]
#
#   --no-frontend   start only the worker (a second node of a multi-node setup: export ETCD_ENDPOINTS,
#                   NATS_SERVER and ADVERTISE_HOST first; see docs/multi-node.md)
#   --timeout SECS  how long to wait for the worker to serve the model (default 600)
#
# Environment: see launch/common.sh (HTTP_PORT, MODEL_PATH, SERVED_MODEL_NAME, VLLM_CPU_KVCACHE_SPACE,
# WORKER_ARGS, FRONTEND_ARGS, RUN_DIR, ...). Run scripts/setup.sh once first (scripts/run.sh does).
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

frontend=1
timeout=600
worker_args=()
while (( $# )); do
    case "$1" in
        --no-frontend) frontend=0 ;;
        --timeout) timeout="$2"; shift ;;
        --) shift; worker_args=("$@"); break ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) dl_die "unknown argument $1 (worker arguments go after --)" ;;
    esac
    shift
done

[[ -x "${PYTHON}" ]] || dl_die "${PYTHON} not found: run 'bash scripts/setup.sh' first"

dl_check_model
dl_init_run_dir agg
dl_log "run dir: ${RUN_DIR}"
dl_start_etcd
dl_start_nats
if (( frontend )); then
    dl_pick_http_port
    # shellcheck disable=SC2119  # extra frontend args come from FRONTEND_ARGS
    dl_start_frontend
fi
dl_start_vllm_worker worker "${VLLM_CPU_OMP_THREADS_BIND:-0}" "${worker_args[@]}"

if (( frontend )); then
    dl_log "waiting (up to ${timeout}s) for the worker to serve ${SERVED_MODEL_NAME}; log: ${RUN_DIR}/worker.log"
    dl_wait_model "${timeout}" worker || exit 1
    dl_log "ready: http://127.0.0.1:${HTTP_PORT}/v1  (model ${SERVED_MODEL_NAME})"
fi
dl_log "press Ctrl-C to stop everything (or: kill $$)"
dl_wait_any || exit 1
