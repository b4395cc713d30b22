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
#
# Each CPU engine takes ~2-3 GB of memory (VLLM_CPU_KVCACHE_SPACE GiB of it KV cache). Frontend flags go in
# FRONTEND_ARGS (e.g. "--disagg-min-prefill-tokens 128 --max-prefill-queue 2"); inspect a decision with
#   curl -s localhost:8000/debug/route -H 'content-type: application/json' \
#        -d '{"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "prompt": "..."}'    (see its "prefill" part)
# Other environment: see launch/common.sh.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${PREFILL_WORKERS:=2}"
: "${DECODE_WORKERS:=1}"
: "${CPU_COUNT:=$(nproc)}"
timeout=900
worker_args=()
while (( $# )); do
    case "$1" in
        --timeout) timeout="$2"; shift ;;
        --) shift; worker_args=("$@"); break ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) dl_die "unknown argument $1 (worker arguments go after --)" ;;
    esac
    shift
done

[[ -x "${PYTHON}" ]] || dl_die "${PYTHON} not found: run 'bash scripts/setup.sh' first"
[[ "${PREFILL_WORKERS}" =~ ^[0-9]+$ && "${DECODE_WORKERS}" =~ ^[1-9][0-9]*$ ]] \
    || dl_die "PREFILL_WORKERS must be >= 0 and DECODE_WORKERS >= 1 (got ${PREFILL_WORKERS} / ${DECODE_WORKERS})"
(( CPU_COUNT >= 1 )) || dl_die "CPU_COUNT must be >= 1"
if (( PREFILL_WORKERS + DECODE_WORKERS > CPU_COUNT )); then
    dl_log "warning: ${PREFILL_WORKERS} prefill + ${DECODE_WORKERS} decode engines on ${CPU_COUNT} cores: some" \
           "share a core and slow each other down (on CPU engines, use at most one engine per core)"
fi

# dl_wait_role_counts TIMEOUT NAMES...: wait until /health lists PREFILL_WORKERS prefill and DECODE_WORKERS
# decode instances.
dl_wait_role_counts() {
    local timeout="$1" deadline=$((SECONDS + $1)) health prefill decode name
    shift
    while true; do
        health="$(curl -fsS --max-time 2 "http://127.0.0.1:${HTTP_PORT}/health" 2>/dev/null || true)"
        prefill="$(grep -oF '"role":"prefill"' <<<"${health}" | wc -l || true)"
        decode="$(grep -oF '"role":"decode"' <<<"${health}" | wc -l || true)"
        (( prefill >= PREFILL_WORKERS && decode >= DECODE_WORKERS )) && return 0
        for name in "$@"; do dl_check_alive "${name}" || return 1; done
        if (( SECONDS >= deadline )); then
            dl_log "timed out after ${timeout}s: ${prefill}/${PREFILL_WORKERS} prefill, ${decode}/${DECODE_WORKERS} decode up"
            for name in "$@"; do dl_tail_log "${name}"; done
            return 1
        fi
        sleep 1
    done
}

dl_check_model
dl_init_run_dir disagg_router
dl_log "run dir: ${RUN_DIR}"
dl_start_etcd
dl_start_nats
dl_pick_http_port
dl_start_frontend --router-mode kv
names=()
core=0
for (( i = 0; i < PREFILL_WORKERS; i++ )); do
    dl_start_vllm_worker "prefill${i}" "$(( core++ % CPU_COUNT ))" --is-prefill-worker --connector nixl \
        "${worker_args[@]}"
    names+=("prefill${i}")
done
for (( i = 0; i < DECODE_WORKERS; i++ )); do
    dl_start_vllm_worker "decode${i}" "$(( core++ % CPU_COUNT ))" --connector nixl "${worker_args[@]}"
    names+=("decode${i}")
done

dl_log "waiting (up to ${timeout}s) for ${PREFILL_WORKERS} prefill + ${DECODE_WORKERS} decode workers"
dl_wait_role_counts "${timeout}" "${names[@]}" || exit 1
dl_log "ready: http://127.0.0.1:${HTTP_PORT}/v1  (model ${SERVED_MODEL_NAME}, kv-routed prefill pool of" \
       "${PREFILL_WORKERS}, decode pool of ${DECODE_WORKERS})"
dl_log "press Ctrl-C to stop everything (or: kill $$)"
dl_wait_any || exit 1
