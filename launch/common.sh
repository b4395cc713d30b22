# shellcheck shell=bash
# Shared by the launch scripts (launch/*.sh, scripts/run.sh). Source it; do not run it.
#
#   dl_launch HELP_LINES TOPOLOGY ARGS...   print the calling script's header lines HELP_LINES (e.g. 2,12)
#                                           for -h/--help, else exec `python -m dynamo_lite.launch TOPOLOGY ARGS`
#
# The supervision itself is Python (dynamo_lite/launch/): it starts each process in its own session with
# its log in $RUN_DIR (default ./runs/NAME-YYYYmmdd-HHMMSS-PID, with a `pids` file), waits for each with a
# bound, and on Ctrl-C, SIGTERM or a process's exit stops everything newest first (TERM, then KILL of the
# process group after STOP_TIMEOUT; a second Ctrl-C kills what is left at once).
#
# Environment (all optional):
#   ETCD_ENDPOINTS, NATS_SERVER   use these instead of starting local etcd / NATS
#   ETCD_PORT (2379), NATS_PORT (4222), NATS_MONITOR_PORT (8222)   ports for the local ones
#   INFRA_HOST (127.0.0.1)        address local etcd / NATS listen on (0.0.0.0 on a multi-node head)
#   ADVERTISE_HOST                address other hosts use to reach this one (default: INFRA_HOST, or
#                                 127.0.0.1 when that is 0.0.0.0); workers get it as DYN_ADVERTISE_HOST
#   HTTP_PORT (8000)              frontend port (DYN_HTTP_PORT works too); HTTP_HOST is passed as --http-host when set
#   MODEL_PATH                    model folder (default ~/.cache/dynamo_lite/models/SmolLM2-135M-Instruct)
#   SERVED_MODEL_NAME             name clients use (default HuggingFaceTB/SmolLM2-135M-Instruct)
#   VLLM_CPU_KVCACHE_SPACE (1)    GiB of KV cache per CPU worker
#   ENFORCE_EAGER                 1 = --enforce-eager, 0 = --no-enforce-eager; unset = the worker's default
#                                 (eager on a CPU build of vLLM: no torch.compile at start-up)
#   MAX_MODEL_LEN (2048)          --max-model-len for workers
#   WORKER_ARGS                   extra worker arguments (word-split), e.g. "--namespace test"
#   FRONTEND_ARGS                 extra frontend arguments (word-split), e.g. "--router-mode round-robin"
#   STOP_TIMEOUT (45)             seconds between TERM and KILL when stopping: more than a worker's
#                                 --drain-timeout (30) plus stopping its engine, so requests can finish
#   PYTHON                        interpreter (default: the repo's .venv/bin/python)

DL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${PYTHON:=${DL_ROOT}/.venv/bin/python}"

dl_log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
dl_die() { dl_log "error: $*"; exit 1; }

dl_launch() {
    local lines="$1" topology="$2" arg
    shift 2
    for arg in "$@"; do
        [[ "${arg}" == -- ]] && break
        if [[ "${arg}" == -h || "${arg}" == --help ]]; then
            sed -n "${lines}p" "$0" | sed 's/^# \{0,1\}//'
            exit 0
        fi
    done
    [[ -x "${PYTHON}" ]] || dl_die "${PYTHON} not found: run 'bash scripts/setup.sh' first"
    # Run dirs go under the repository's runs/ wherever the script is called from.
    export PYTHON DL_RUNS_ROOT="${DL_ROOT}/runs"
    exec "${PYTHON}" -m dynamo_lite.launch "${topology}" "$@"
}
