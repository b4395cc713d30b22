# shellcheck shell=bash
# Shared functions for the launch scripts (launch/*.sh, scripts/run.sh). Source it; do not run it.
#
#   dl_init_run_dir NAME       make $RUN_DIR (default ./runs/NAME-YYYYmmdd-HHMMSS-PID) and install the stop trap
#   dl_start NAME CMD...       start CMD in the background (own session), log to $RUN_DIR/NAME.log, record its pid
#   dl_wait_tcp HOST PORT SECS [NAME]   wait (bounded) for a TCP listener; fail early if NAME died
#   dl_wait_http URL SECS [NAME]        wait (bounded) for an HTTP 2xx
#   dl_free_port               print a free TCP port on 127.0.0.1
#   dl_stop_all                stop every recorded process, newest first (TERM, then KILL after a timeout)
#   dl_start_etcd / dl_start_nats / dl_start_frontend / dl_start_vllm_worker   the pieces of a stack
#   dl_check_model             fail early if MODEL_PATH has no config.json
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
DL_DEFAULT_MODEL_PATH="${HOME}/.cache/dynamo_lite/models/SmolLM2-135M-Instruct"

: "${PYTHON:=${DL_ROOT}/.venv/bin/python}"
: "${MODEL_PATH:=${DYN_MODEL_PATH:-${DL_DEFAULT_MODEL_PATH}}}"
: "${SERVED_MODEL_NAME:=HuggingFaceTB/SmolLM2-135M-Instruct}"
: "${VLLM_CPU_KVCACHE_SPACE:=1}"
: "${MAX_MODEL_LEN:=2048}"
: "${INFRA_HOST:=127.0.0.1}"
: "${STOP_TIMEOUT:=45}"
# Workers on a node that joins a remote etcd (ETCD_ENDPOINTS set, ADVERTISE_HOST not) let the worker
# detect its address: the interface that reaches etcd. Otherwise everything is local to this node.
WORKER_DETECTS_ADDRESS=0
if [[ -z "${ADVERTISE_HOST:-}" ]]; then
    [[ -n "${ETCD_ENDPOINTS:-}" ]] && WORKER_DETECTS_ADDRESS=1
    if [[ "${INFRA_HOST}" == "0.0.0.0" ]]; then ADVERTISE_HOST=127.0.0.1; else ADVERTISE_HOST="${INFRA_HOST}"; fi
fi
export MODEL_PATH SERVED_MODEL_NAME VLLM_CPU_KVCACHE_SPACE

DL_PIDS=()   # in start order
DL_NAMES=()
DL_STOPPED=0

dl_log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
dl_die() { dl_log "error: $*"; exit 1; }

# dl_init_run_dir NAME: create $RUN_DIR and stop everything recorded when this shell exits.
dl_init_run_dir() {
    : "${RUN_DIR:=${DL_ROOT}/runs/$1-$(date +%Y%m%d-%H%M%S)-$$}"
    mkdir -p "${RUN_DIR}"
    RUN_DIR="$(cd "${RUN_DIR}" && pwd)"
    export RUN_DIR
    trap dl_stop_all EXIT
    # Ctrl-C / kill: leave through the EXIT trap with the conventional status.
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

dl_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# dl_port_open HOST PORT: true if something accepts TCP connections there.
dl_port_open() {
    # shellcheck disable=SC2016  # $1/$2 expand in the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# dl_alive PID: running and not a zombie.
dl_alive() {
    local state
    kill -0 "$1" 2>/dev/null || return 1
    state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || echo X)"
    [[ "${state}" != "Z" && "${state}" != "X" ]]
}

dl_pid_of() {
    local i
    for i in "${!DL_NAMES[@]}"; do
        [[ "${DL_NAMES[$i]}" == "$1" ]] && { echo "${DL_PIDS[$i]}"; return 0; }
    done
    return 1
}

# dl_tail_log NAME: show the end of a process's log (for failures).
dl_tail_log() {
    local log="${RUN_DIR}/$1.log"
    [[ -f "${log}" ]] || return 0
    dl_log "last lines of ${log}:"
    tail -n "${2:-25}" "${log}" | sed 's/^/    /' >&2
}

# dl_start NAME CMD...: run CMD in its own session (so Ctrl-C reaches only this script, which then stops
# the processes in order, and so a KILL can reach the process's children through its process group).
dl_start() {
    local name="$1"; shift
    [[ -n "${RUN_DIR:-}" ]] || dl_die "dl_start called before dl_init_run_dir"
    # Not a process-group leader here (no job control), so setsid execs in place and $! is the real pid.
    setsid "$@" >"${RUN_DIR}/${name}.log" 2>&1 </dev/null &
    local pid=$!
    DL_PIDS+=("${pid}")
    DL_NAMES+=("${name}")
    echo "${pid} ${name}" >>"${RUN_DIR}/pids"
    dl_log "started ${name} (pid ${pid}, log ${RUN_DIR}/${name}.log)"
}

# dl_stop_pid PID NAME: TERM the process, wait up to STOP_TIMEOUT s, then KILL its whole process group.
dl_stop_pid() {
    local pid="$1" name="$2" waited=0
    if dl_alive "${pid}"; then
        kill -TERM "${pid}" 2>/dev/null || true
        while dl_alive "${pid}" && (( waited < STOP_TIMEOUT * 10 )); do
            sleep 0.1; waited=$((waited + 1))
        done
        if dl_alive "${pid}"; then
            dl_log "${name} (pid ${pid}) still running after ${STOP_TIMEOUT}s: KILL"
        fi
    fi
    # Children left behind in its process group (e.g. a vLLM engine core) go too. The group id is the pid
    # we started (setsid), so this reaches only our own processes.
    kill -KILL -- "-${pid}" 2>/dev/null || true
    wait "${pid}" 2>/dev/null || true
}

# dl_stop_all: newest first, so workers deregister while etcd is still up.
dl_stop_all() {
    local status=$? i
    (( DL_STOPPED )) && return "${status}"
    DL_STOPPED=1
    trap - INT TERM
    if (( ${#DL_PIDS[@]} )); then
        dl_log "stopping ${#DL_PIDS[@]} process(es)"
        for (( i = ${#DL_PIDS[@]} - 1; i >= 0; i-- )); do
            dl_stop_pid "${DL_PIDS[$i]}" "${DL_NAMES[$i]}"
        done
        dl_log "stopped; logs are in ${RUN_DIR}"
    fi
    return "${status}"
}

# dl_check_alive NAME: fail with its log if it died.
dl_check_alive() {
    local pid
    pid="$(dl_pid_of "$1")" || return 0
    if ! dl_alive "${pid}"; then
        wait "${pid}" 2>/dev/null; local rc=$?
        dl_log "$1 (pid ${pid}) exited with status ${rc}"
        dl_tail_log "$1"
        return 1
    fi
}

# dl_wait_tcp HOST PORT TIMEOUT [NAME]
dl_wait_tcp() {
    local host="$1" port="$2" timeout="$3" name="${4:-}" deadline=$((SECONDS + $3))
    until dl_port_open "${host}" "${port}"; do
        if [[ -n "${name}" ]] && ! dl_check_alive "${name}"; then return 1; fi
        if (( SECONDS >= deadline )); then
            dl_log "timed out after ${timeout}s waiting for ${host}:${port}${name:+ (${name})}"
            [[ -n "${name}" ]] && dl_tail_log "${name}"
            return 1
        fi
        sleep 0.2
    done
}

# dl_wait_http URL TIMEOUT [NAME]
dl_wait_http() {
    local url="$1" timeout="$2" name="${3:-}" deadline=$((SECONDS + $2))
    until curl -fsS --max-time 2 -o /dev/null "${url}" 2>/dev/null; do
        if [[ -n "${name}" ]] && ! dl_check_alive "${name}"; then return 1; fi
        if (( SECONDS >= deadline )); then
            dl_log "timed out after ${timeout}s waiting for ${url}${name:+ (${name})}"
            [[ -n "${name}" ]] && dl_tail_log "${name}"
            return 1
        fi
        sleep 0.5
    done
}

# dl_start_etcd: unless ETCD_ENDPOINTS is set, reuse an etcd already on ETCD_PORT or start one with its
# data dir in the run dir. Exports ETCD_ENDPOINTS (the components read it as their --etcd-endpoints twin).
dl_start_etcd() {
    if [[ -n "${ETCD_ENDPOINTS:-}" ]]; then
        dl_log "etcd: using ETCD_ENDPOINTS=${ETCD_ENDPOINTS}"
        return 0
    fi
    local port="${ETCD_PORT:-2379}" probe="${ADVERTISE_HOST}"
    [[ "${INFRA_HOST}" != "0.0.0.0" ]] && probe="${INFRA_HOST}"
    if dl_port_open "${probe}" "${port}"; then
        curl -fsS --max-time 2 "http://${probe}:${port}/health" >/dev/null 2>&1 \
            || dl_die "port ${port} is in use but is not a healthy etcd: free it or set ETCD_PORT / ETCD_ENDPOINTS"
        export ETCD_ENDPOINTS="http://${probe}:${port}"
        dl_log "etcd: reusing the one already listening on ${ETCD_ENDPOINTS}"
        return 0
    fi
    command -v etcd >/dev/null 2>&1 || dl_die "etcd not found: run scripts/setup.sh (apt package etcd-server)"
    local peer
    peer="$(dl_free_port)"
    # Debian's etcd 3.4 refuses to start on arm64 without this.
    [[ "$(uname -m)" == "aarch64" ]] && export ETCD_UNSUPPORTED_ARCH=arm64
    dl_start etcd etcd --name dynamo-lite --data-dir "${RUN_DIR}/etcd" \
        --listen-client-urls "http://${INFRA_HOST}:${port}" \
        --advertise-client-urls "http://${ADVERTISE_HOST}:${port}" \
        --listen-peer-urls "http://127.0.0.1:${peer}" \
        --initial-advertise-peer-urls "http://127.0.0.1:${peer}" \
        --initial-cluster "dynamo-lite=http://127.0.0.1:${peer}"
    dl_wait_http "http://${probe}:${port}/health" 30 etcd || dl_die "etcd did not start"
    export ETCD_ENDPOINTS="http://${probe}:${port}"
    dl_log "etcd: ready at ${ETCD_ENDPOINTS}"
}

# dl_is_nats HOST PORT: a NATS server greets every connection with "INFO {...}".
dl_is_nats() {
    local greeting
    # shellcheck disable=SC2016  # $1/$2 expand in the inner bash
    greeting="$(timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"; head -c 4 <&3' _ "$1" "$2" 2>/dev/null || true)"
    [[ "${greeting}" == "INFO" ]]
}

# dl_start_nats: unless NATS_SERVER is set, reuse a NATS already on NATS_PORT or start one (JetStream on,
# store in the run dir). Exports NATS_SERVER.
dl_start_nats() {
    if [[ -n "${NATS_SERVER:-}" ]]; then
        dl_log "nats: using NATS_SERVER=${NATS_SERVER}"
        return 0
    fi
    local port="${NATS_PORT:-4222}" monitor="${NATS_MONITOR_PORT:-8222}" probe="${ADVERTISE_HOST}"
    [[ "${INFRA_HOST}" != "0.0.0.0" ]] && probe="${INFRA_HOST}"
    if dl_port_open "${probe}" "${port}"; then
        dl_is_nats "${probe}" "${port}" \
            || dl_die "port ${port} is in use but is not a NATS server: free it or set NATS_PORT / NATS_SERVER"
        export NATS_SERVER="nats://${probe}:${port}"
        dl_log "nats: reusing the one already listening on ${NATS_SERVER}"
        return 0
    fi
    command -v nats-server >/dev/null 2>&1 || dl_die "nats-server not found: run scripts/setup.sh"
    # The monitoring port is optional: take another one if something already has it.
    dl_port_open 127.0.0.1 "${monitor}" && monitor="$(dl_free_port)"
    dl_start nats nats-server -js -a "${INFRA_HOST}" -p "${port}" -m "${monitor}" -sd "${RUN_DIR}/nats"
    dl_wait_tcp "${probe}" "${port}" 30 nats || dl_die "nats-server did not start"
    export NATS_SERVER="nats://${probe}:${port}"
    dl_log "nats: ready at ${NATS_SERVER} (monitoring http://${probe}:${monitor})"
}

# dl_pick_http_port: keep HTTP_PORT if given (fail if busy); else 8000, or a free port if 8000 is busy.
dl_pick_http_port() {
    : "${HTTP_PORT:=${DYN_HTTP_PORT:-}}"
    if [[ -n "${HTTP_PORT:-}" ]]; then
        dl_port_open 127.0.0.1 "${HTTP_PORT}" \
            && dl_die "HTTP_PORT=${HTTP_PORT} is already in use: choose another (HTTP_PORT=8001 ...)"
    elif dl_port_open 127.0.0.1 8000; then
        HTTP_PORT="$(dl_free_port)"
        dl_log "port 8000 is in use: the frontend takes ${HTTP_PORT} instead (set HTTP_PORT to choose)"
    else
        HTTP_PORT=8000
    fi
    export HTTP_PORT
}

# dl_start_frontend [EXTRA ARGS...]: the OpenAI frontend on HTTP_PORT (call dl_pick_http_port first).
dl_start_frontend() {
    local -a args=(--http-port "${HTTP_PORT}")
    [[ -n "${HTTP_HOST:-}" ]] && args+=(--http-host "${HTTP_HOST}")
    local -a extra=()
    # shellcheck disable=SC2206  # FRONTEND_ARGS is a word list on purpose
    [[ -n "${FRONTEND_ARGS:-}" ]] && extra=(${FRONTEND_ARGS})
    dl_start frontend "${PYTHON}" -m dynamo_lite.frontend "${args[@]}" "${extra[@]}" "$@"
    # /live answers as soon as HTTP is up; /health stays 503 until a worker serves a model.
    dl_wait_http "http://127.0.0.1:${HTTP_PORT}/live" 60 frontend || dl_die "the frontend did not start"
    dl_log "frontend: ready at http://127.0.0.1:${HTTP_PORT}"
}

# dl_check_model: fail early (before starting anything) if MODEL_PATH is not a model folder.
dl_check_model() {
    [[ -f "${MODEL_PATH}/config.json" ]] && return 0
    if [[ "${MODEL_PATH}" == "${DL_DEFAULT_MODEL_PATH}" ]]; then
        dl_die "the default model folder ${MODEL_PATH} is missing: run 'bash scripts/setup.sh'"
    fi
    dl_die "MODEL_PATH=${MODEL_PATH} is not a model folder (no config.json); nothing is downloaded here"
}

# dl_start_vllm_worker NAME CPU_BIND [EXTRA ARGS...]: one vLLM worker, its OMP threads pinned to CPU_BIND
# (two engines on one small box starve each other unpinned). Returns at once; wait for the model with
# dl_wait_model.
dl_start_vllm_worker() {
    local name="$1" bind="$2"; shift 2
    dl_check_model
    local -a args=(--model "${MODEL_PATH}" --served-model-name "${SERVED_MODEL_NAME}"
                   --max-model-len "${MAX_MODEL_LEN}")
    case "${ENFORCE_EAGER:-}" in
        1) args+=(--enforce-eager) ;;
        0) args+=(--no-enforce-eager) ;;
    esac
    local -a extra=()
    # shellcheck disable=SC2206  # WORKER_ARGS is a word list on purpose
    [[ -n "${WORKER_ARGS:-}" ]] && extra=(${WORKER_ARGS})
    # The worker registers ADVERTISE_HOST as its address (and vLLM's NIXL side-channel host), unless
    # it joins a remote etcd without one given: then it detects the address that reaches etcd.
    local -a advertise=()
    if [[ -n "${DYN_ADVERTISE_HOST:-}" ]]; then advertise=("DYN_ADVERTISE_HOST=${DYN_ADVERTISE_HOST}")
    elif (( ! WORKER_DETECTS_ADDRESS )); then advertise=("DYN_ADVERTISE_HOST=${ADVERTISE_HOST}"); fi
    dl_start "${name}" env VLLM_CPU_OMP_THREADS_BIND="${bind}" "${advertise[@]}" \
        "${PYTHON}" -m dynamo_lite.vllm "${args[@]}" "${extra[@]}" "$@"
}

# dl_wait_model TIMEOUT NAME...: wait until the frontend lists SERVED_MODEL_NAME (a worker registered it);
# fail early if one of the named workers dies.
dl_wait_model() {
    local timeout="$1"; shift
    local deadline=$((SECONDS + timeout)) name
    until curl -fsS --max-time 2 "http://127.0.0.1:${HTTP_PORT}/v1/models" 2>/dev/null \
            | grep -qF "\"${SERVED_MODEL_NAME}\""; do
        for name in "$@"; do dl_check_alive "${name}" || return 1; done
        if (( SECONDS >= deadline )); then
            dl_log "timed out after ${timeout}s waiting for model ${SERVED_MODEL_NAME} to be served"
            for name in "$@"; do dl_tail_log "${name}"; done
            return 1
        fi
        sleep 1
    done
}

# dl_wait_any: block until a recorded process exits (or a signal arrives); name the one that died.
dl_wait_any() {
    local i
    while true; do
        for i in "${!DL_PIDS[@]}"; do
            if ! dl_alive "${DL_PIDS[$i]}"; then
                dl_log "${DL_NAMES[$i]} exited"
                dl_tail_log "${DL_NAMES[$i]}"
                return 1
            fi
        done
        sleep 1
    done
}
