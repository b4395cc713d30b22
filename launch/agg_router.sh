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
#
# Inspect a routing decision without running it:
#   curl -s localhost:8000/debug/route -H 'content-type: application/json' \
#        -d '{"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "prompt": "..."}'
# Router flags go in FRONTEND_ARGS (e.g. "--kv-overlap-score-weight 2 --router-temperature 0.5", or
# "--no-kv-events" for approximate routing without NATS). Other environment: see launch/common.sh.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

timeout=600
worker_args=()
while (( $# )); do
    case "$1" in
        --timeout) timeout="$2"; shift ;;
        --) shift; worker_args=("$@"); break ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) dl_die "unknown argument $1 (worker arguments go after --)" ;;
    esac
    shift
done

[[ -x "${PYTHON}" ]] || dl_die "${PYTHON} not found: run 'bash scripts/setup.sh' first"

# dl_wait_instances COUNT TIMEOUT NAME...: wait until /health lists COUNT instances of SERVED_MODEL_NAME.
dl_wait_instances() {
    local count="$1" timeout="$2"; shift 2
    local deadline=$((SECONDS + timeout)) name seen
    while true; do
        seen="$(curl -fsS --max-time 2 "http://127.0.0.1:${HTTP_PORT}/health" 2>/dev/null \
                | grep -oF "\"model\":\"${SERVED_MODEL_NAME}\"" | wc -l || true)"
        (( seen >= count )) && return 0
        for name in "$@"; do dl_check_alive "${name}" || return 1; done
        if (( SECONDS >= deadline )); then
            dl_log "timed out after ${timeout}s waiting for ${count} workers of ${SERVED_MODEL_NAME} (${seen} up)"
            for name in "$@"; do dl_tail_log "${name}"; done
            return 1
        fi
        sleep 1
    done
}

dl_init_run_dir agg_router
dl_log "run dir: ${RUN_DIR}"
dl_start_etcd
dl_start_nats
dl_pick_http_port
dl_start_frontend --router-mode kv
dl_start_vllm_worker worker0 0 "${worker_args[@]}"
dl_start_vllm_worker worker1 1 "${worker_args[@]}"

dl_log "waiting (up to ${timeout}s) for both workers to serve ${SERVED_MODEL_NAME}; logs: ${RUN_DIR}/worker{0,1}.log"
dl_wait_instances 2 "${timeout}" worker0 worker1 || exit 1
dl_log "ready: http://127.0.0.1:${HTTP_PORT}/v1  (model ${SERVED_MODEL_NAME}, kv routing over 2 workers)"
dl_log "press Ctrl-C to stop everything (or: kill $$)"
dl_wait_any || exit 1
