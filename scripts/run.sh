#!/usr/bin/env bash
# Set up, start the whole stack on this machine, ask it one question, and leave it running.
#
#   bash scripts/run.sh [--once] [--timeout SECS] [-- EXTRA WORKER ARGS...]
#
# Runs scripts/setup.sh, starts etcd and NATS (unless something already listens on their ports, or
# ETCD_ENDPOINTS / NATS_SERVER are set), the OpenAI frontend on HTTP_PORT (8000) and one vLLM worker,
# waits for the model, sends "What is the capital of France?" with curl and prints the answer.
# Then it stays in the foreground until Ctrl-C, which stops everything it started.
#
#   --once          stop everything after the answer and exit (0 on success)
#   --timeout SECS  how long to wait for the worker to serve the model (default 600)
#
# Logs and etcd/NATS data go to ./runs/run-<time>-<pid>/ (or $RUN_DIR). More settings: launch/common.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
once=0
timeout=600
worker_args=()
while (( $# )); do
    case "$1" in
        --once) once=1 ;;
        --timeout) timeout="$2"; shift ;;
        --) shift; worker_args=("$@"); break ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

started="${SECONDS}"
bash "${ROOT}/scripts/setup.sh"

# shellcheck source=launch/common.sh
source "${ROOT}/launch/common.sh"
dl_check_model
dl_init_run_dir run
dl_log "run dir: ${RUN_DIR}"
dl_start_etcd
dl_start_nats
dl_pick_http_port
# shellcheck disable=SC2119  # extra frontend args come from FRONTEND_ARGS
dl_start_frontend
dl_start_vllm_worker worker "${VLLM_CPU_OMP_THREADS_BIND:-0}" "${worker_args[@]}"
dl_log "waiting (up to ${timeout}s) for the vLLM worker to load ${SERVED_MODEL_NAME} (~1 min on 2 CPU cores)"
dl_wait_model "${timeout}" worker || exit 1
dl_log "model served after $((SECONDS - started))s in total"

url="http://127.0.0.1:${HTTP_PORT}"
question="What is the capital of France?"
body="$(printf '{"model": "%s", "messages": [{"role": "user", "content": "%s"}], "max_tokens": 48, "temperature": 0}' \
    "${SERVED_MODEL_NAME}" "${question}")"
dl_log "POST ${url}/v1/chat/completions: ${question}"
reply_file="${RUN_DIR}/answer.json"
code="$(curl -sS --max-time 120 -o "${reply_file}" -w '%{http_code}' "${url}/v1/chat/completions" \
    -H 'Content-Type: application/json' -d "${body}" || echo 000)"
if [[ "${code}" != 200 ]]; then
    dl_log "the request failed with HTTP ${code}: $(cat "${reply_file}" 2>/dev/null)"
    dl_tail_log frontend
    dl_tail_log worker
    exit 1
fi
answer="$("${PYTHON}" -c 'import json, sys; print(json.load(open(sys.argv[1]))["choices"][0]["message"]["content"])' \
    "${reply_file}")" || { dl_log "unexpected reply: $(cat "${reply_file}")"; exit 1; }
if [[ -z "${answer//[[:space:]]/}" ]]; then
    dl_log "the model returned an empty answer: $(cat "${reply_file}")"
    exit 1
fi
printf '\nQ: %s\nA: %s\n\n' "${question}" "${answer}"

if (( once )); then
    dl_log "--once: stopping everything"
    exit 0
fi

cat <<EOF
The stack is up (logs in ${RUN_DIR}):
  OpenAI API   ${url}/v1   (model "${SERVED_MODEL_NAME}")
  health       ${url}/health (200 once a worker serves a model)   metrics ${url}/metrics
  try it       curl ${url}/v1/chat/completions -H 'Content-Type: application/json' \\
                 -d '{"model": "${SERVED_MODEL_NAME}", "messages": [{"role": "user", "content": "Hi!"}]}'
Stop it: press Ctrl-C here (or run: kill $$). Everything started by this script stops with it.
EOF
dl_wait_any || exit 1
