#!/usr/bin/env bash
# Set up, serve the default model on this machine, ask it one question, and leave it running.
#
#   bash scripts/run.sh [--once] [--timeout SECS] [-- EXTRA WORKER ARGS...]
#
# Runs scripts/setup.sh, then `python -m dynamo_lite.serve` (docs/serve.md): the OpenAI frontend on
# HTTP_PORT (8000, or a free port when 8000 is busy) and one vLLM worker on the default model. When the
# model is served it sends "What is the capital of France?" and prints the answer and the URL.
# Then it stays in the foreground until Ctrl-C, which stops everything it started.
#
#   --once          stop everything after the answer and exit (0 on success)
#   --timeout SECS  how long to wait for the worker to serve the model (default 600)
#
# Logs go to ./runs/serve-<time>-<pid>/ (or $RUN_DIR). Environment: HTTP_PORT, MODEL_PATH (with
# SERVED_MODEL_NAME), MAX_MODEL_LEN (2048), PYTHON. Everything else: python -m dynamo_lite.serve --help.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
QUESTION="What is the capital of France?"
# The arguments are checked before the setup runs.
args=("$@") once=() timeout=600 extra=()
for (( i = 0; i < ${#args[@]}; i++ )); do
    case "${args[$i]}" in
        --once) once=(--once) ;;
        --timeout) (( i + 1 < ${#args[@]} )) || { echo "--timeout needs SECS" >&2; exit 2; }
                   i=$((i + 1)); timeout="${args[$i]}" ;;
        --) extra=("${args[@]:$((i + 1))}"); break ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument ${args[$i]} (see --help)" >&2; exit 2 ;;
    esac
done

bash "${ROOT}/scripts/setup.sh"

: "${PYTHON:=${ROOT}/.venv/bin/python}"
[[ -x "${PYTHON}" ]] || { echo "${PYTHON} not found: run 'bash scripts/setup.sh' first" >&2; exit 1; }
model=()  # none: serve's default model, under its hub name
if [[ -n "${MODEL_PATH:-}" ]]; then
    model=("${MODEL_PATH}" --served-model-name "${SERVED_MODEL_NAME:-${MODEL_PATH}}")
fi
port=()
[[ -n "${HTTP_PORT:-}" ]] && port=(--port "${HTTP_PORT}")
# Run dirs go under the repository's runs/ wherever the script is called from.
export DL_RUNS_ROOT="${ROOT}/runs"
cd "${ROOT}"
exec "${PYTHON}" -m dynamo_lite.serve "${model[@]}" "${port[@]}" --ask "${QUESTION}" "${once[@]}" \
    --startup-timeout "${timeout}" -- --max-model-len "${MAX_MODEL_LEN:-2048}" "${extra[@]}"
