#!/usr/bin/env bash
# Set up, start the whole stack on this machine, ask it one question, and leave it running.
#
#   bash scripts/run.sh [--once] [--timeout SECS] [-- EXTRA WORKER ARGS...]
#
# Runs scripts/setup.sh, starts etcd and NATS (unless something already listens on their ports, or
# ETCD_ENDPOINTS / NATS_SERVER are set), the OpenAI frontend on HTTP_PORT (8000) and one vLLM worker,
# waits until /health lists the model (200 once a worker serves it), sends "What is the capital of France?"
# and prints the answer.
# Then it stays in the foreground until Ctrl-C, which stops everything it started.
#
#   --once          stop everything after the answer and exit (0 on success)
#   --timeout SECS  how long to wait for the worker to serve the model (default 600)
#
# Logs and etcd/NATS data go to ./runs/run-<time>-<pid>/ (or $RUN_DIR). More settings: launch/common.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The arguments are checked before the setup runs; `python -m dynamo_lite.launch run` then does the rest.
args=("$@")
for (( i = 0; i < ${#args[@]}; i++ )); do
    case "${args[$i]}" in
        --once) ;;
        --timeout) (( i + 1 < ${#args[@]} )) || { echo "--timeout needs SECS" >&2; exit 2; }; i=$((i + 1)) ;;
        --) break ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument ${args[$i]} (see --help)" >&2; exit 2 ;;
    esac
done

bash "${ROOT}/scripts/setup.sh"

# shellcheck source=launch/common.sh
source "${ROOT}/launch/common.sh"
dl_launch 2,15 run "$@"
