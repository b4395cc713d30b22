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
#
# Frontend flags go in FRONTEND_ARGS (e.g. "--disagg-min-prefill-tokens 128 --enforce-disagg"); see
# `python -m dynamo_lite.frontend --help`. Other environment: see launch/common.sh.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

timeout=600
worker_args=()
while (( $# )); do
    case "$1" in
        --timeout) timeout="$2"; shift ;;
        --) shift; worker_args=("$@"); break ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) dl_die "unknown argument $1 (worker arguments go after --)" ;;
    esac
    shift
done

[[ -x "${PYTHON}" ]] || dl_die "${PYTHON} not found: run 'bash scripts/setup.sh' first"

# dl_wait_roles TIMEOUT NAME...: wait until /health lists a prefill and a decode instance; fail early if one
# of the named processes dies.
dl_wait_roles() {
    local timeout="$1" deadline=$((SECONDS + $1)) health role missing name
    shift
    local -a roles=(prefill decode) names=("$@")
    while true; do
        health="$(curl -fsS --max-time 2 "http://127.0.0.1:${HTTP_PORT}/health" 2>/dev/null || true)"
        missing=""
        for role in "${roles[@]}"; do
            grep -qF "\"role\":\"${role}\"" <<<"${health}" || missing+=" ${role}"
        done
        [[ -z "${missing}" ]] && return 0
        for name in "${names[@]}"; do dl_check_alive "${name}" || return 1; done
        if (( SECONDS >= deadline )); then
            dl_log "timed out after ${timeout}s waiting for the${missing} worker(s) of ${SERVED_MODEL_NAME}"
            for name in "${names[@]}"; do dl_tail_log "${name}"; done
            return 1
        fi
        sleep 1
    done
}

dl_check_model
dl_init_run_dir disagg
dl_log "run dir: ${RUN_DIR}"
dl_start_etcd
dl_start_nats
dl_pick_http_port
# shellcheck disable=SC2119  # extra frontend args come from FRONTEND_ARGS
dl_start_frontend
dl_start_vllm_worker prefill "${PREFILL_CPUS:-0}" --is-prefill-worker --connector nixl "${worker_args[@]}"
dl_start_vllm_worker decode "${DECODE_CPUS:-1}" --connector nixl "${worker_args[@]}"

dl_log "waiting (up to ${timeout}s) for the prefill and decode workers; logs: ${RUN_DIR}/{prefill,decode}.log"
dl_wait_roles "${timeout}" prefill decode || exit 1
dl_log "ready: http://127.0.0.1:${HTTP_PORT}/v1  (model ${SERVED_MODEL_NAME}, 1 prefill + 1 decode worker)"
dl_log "press Ctrl-C to stop everything (or: kill $$)"
dl_wait_any || exit 1
