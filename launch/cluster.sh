#!/usr/bin/env bash
# One-command cluster, run on the head node: etcd, NATS and the frontend here, workers on every host
# over SSH; waits until the model answers. docs/multi-node.md, "One command".
#
#   bash launch/cluster.sh start  [CONFIG]   start everything (CONFIG default: launch/config.env)
#   bash launch/cluster.sh status [CONFIG]   each process alive?, and the frontend's /health
#   bash launch/cluster.sh stop   [CONFIG]   stop everything it started (TERM, then KILL)
#
# CONFIG (bash, see launch/config.env.example):
#   HEAD_HOST        this node's address as the workers reach it (its fabric address on a Spark pair)
#   AGG_HOSTS        hosts running an aggregated worker each ("10.0.0.2 10.0.0.3"; HEAD_HOST allowed)
#   PREFILL_HOSTS, DECODE_HOSTS   disaggregated pools instead (or beside): one worker per host listed
#   TP_HOSTS         a tensor-parallel group over Ray: the first host runs the worker with
#                    --tensor-parallel-size TP --distributed-executor-backend ray, the others join its Ray
#                    cluster (needs `ray` on every host: pip install ray)
#   TP (1)           tensor parallel size of TP_HOSTS' worker
#   RAY_START_ARGS   more arguments for every `ray start` (word-split: --num-cpus 1, --temp-dir DIR)
#   SSH_USER (root), SSH_OPTS ("")   how to reach the hosts (key authentication: no password prompt)
#   REMOTE_ROOT      this repository's path on the hosts (default: the same path as here)
#   REMOTE_PYTHON    the interpreter there (default: the same as here)
#   ENGINE (vllm)    vllm, or mocker (simulated engines: try the cluster without GPUs or weights)
#   PRESET           a model preset (docs/presets.md), or MODEL_PATH + SERVED_MODEL_NAME
#   WORKER_ARGS, FRONTEND_ARGS   more arguments (word-split)
#   ETCD_PORT (2379), NATS_PORT (4222), HTTP_PORT (8000), RAY_PORT (6379)
#   STATE_DIR        where pids and logs go (default runs/cluster); STARTUP_TIMEOUT (900) seconds
set -euo pipefail

DL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
command="${1:-}"
config="${2:-${DL_ROOT}/launch/config.env}"
[[ "${command}" =~ ^(start|stop|status)$ ]] || { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ -f "${config}" ]] || {
    echo "error: no config file ${config} (copy launch/config.env.example)" >&2; exit 2; }
# shellcheck disable=SC1090
source "${config}"

: "${HEAD_HOST:?HEAD_HOST must be set in ${config}}"
: "${AGG_HOSTS:=}" "${PREFILL_HOSTS:=}" "${DECODE_HOSTS:=}" "${TP_HOSTS:=}" "${TP:=1}"
: "${SSH_USER:=root}" "${SSH_OPTS:=}" "${ENGINE:=vllm}"
: "${PRESET:=}" "${MODEL_PATH:=}" "${SERVED_MODEL_NAME:=}"
: "${PYTHON:=${DL_ROOT}/.venv/bin/python}" "${REMOTE_ROOT:=${DL_ROOT}}" "${REMOTE_PYTHON:=${PYTHON}}"
: "${ETCD_PORT:=2379}" "${NATS_PORT:=4222}" "${HTTP_PORT:=8000}" "${RAY_PORT:=6379}"
: "${WORKER_ARGS:=}" "${FRONTEND_ARGS:=}" "${RAY_START_ARGS:=}" "${STATE_DIR:=${DL_ROOT}/runs/cluster}" "${STARTUP_TIMEOUT:=900}"
: "${STOP_TIMEOUT:=45}"
PIDS="${STATE_DIR}/pids"   # lines: HOST PID NAME  (HOST "-" = here)

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
ssh_to() { local host="$1"; shift; ssh ${SSH_OPTS} -o BatchMode=yes "${SSH_USER}@${host}" "$@"; }

# Start NAME here in its own session; its pid goes to the state file.
start_here() {
    local name="$1"; shift
    setsid "$@" > "${STATE_DIR}/${name}.log" 2>&1 < /dev/null &
    echo "- $! ${name}" >> "${PIDS}"
    log "started ${name} here (pid $!, log ${STATE_DIR}/${name}.log)"
}

# Start NAME on HOST over SSH (the command line is quoted for the remote shell); its log stays there.
start_on() {
    local host="$1" name="$2"; shift 2
    # The head is one of the hosts (a TP group's first box): started here, no SSH to itself.
    [[ "${host}" == "${HEAD_HOST}" ]] && { start_here "${name}" env PYTHONPATH="${DL_ROOT}" "$@"; return; }
    local cmd log_dir="${REMOTE_ROOT}/runs/cluster" pid
    cmd="$(printf '%q ' "$@")"
    # Only the command goes to the background (a backgrounded `a && b` would hold the SSH channel open),
    # every descriptor redirected, so ssh returns at once with its pid.
    pid="$(ssh_to "${host}" "mkdir -p ${log_dir} && cd ${REMOTE_ROOT} || exit 1; PYTHONPATH=${REMOTE_ROOT} \
setsid ${cmd} > ${log_dir}/${name}.log 2>&1 < /dev/null & echo \$!")" || die "ssh ${SSH_USER}@${host} failed"
    echo "${host} ${pid} ${name}" >> "${PIDS}"
    log "started ${name} on ${host} (pid ${pid}, log ${host}:${log_dir}/${name}.log)"
}

model_args() {  # the preset, or the model folder (the mocker calls its flag --model-path)
    [[ -n "${PRESET}" ]] && { echo "--preset ${PRESET}"; return; }
    local flag=--model
    [[ "${ENGINE}" == mocker ]] && flag=--model-path
    echo "${MODEL_PATH:+${flag} ${MODEL_PATH}} ${SERVED_MODEL_NAME:+--served-model-name ${SERVED_MODEL_NAME}}"
}

start_worker() {  # HOST NAME ROLE-FLAGS...
    local host="$1" name="$2"; shift 2
    # shellcheck disable=SC2046,SC2086
    local argv=(env ${WORKER_ENV:-} "${REMOTE_PYTHON}" -m "dynamo_lite.${ENGINE}" $(model_args) "$@"
                --etcd-endpoints "http://${HEAD_HOST}:${ETCD_PORT}"
                --nats-server "nats://${HEAD_HOST}:${NATS_PORT}"
                --advertise-host "${host}" ${WORKER_ARGS})
    start_on "${host}" "${name}" "${argv[@]}"
}

expected_workers() {  # one per listed host, plus the TP group's one
    echo $(( $(wc -w <<< "${AGG_HOSTS} ${PREFILL_HOSTS} ${DECODE_HOSTS}") + (${#TP_HOSTS} > 0) ))
}

health_count() {
    curl -sf "http://${HEAD_HOST}:${HTTP_PORT}/health" 2>/dev/null \
        | "${PYTHON}" -c 'import json,sys;print(len(json.load(sys.stdin).get("instances",[])))' 2>/dev/null \
        || echo 0
}

do_start() {
    [[ -s "${PIDS}" ]] && die "a cluster is recorded in ${PIDS}: run 'cluster.sh stop' first"
    local want; want="$(expected_workers)"
    (( want > 0 )) || die "no worker host: set AGG_HOSTS, PREFILL_HOSTS/DECODE_HOSTS or TP_HOSTS"
    mkdir -p "${STATE_DIR}"; : > "${PIDS}"
    local host
    for host in ${AGG_HOSTS} ${PREFILL_HOSTS} ${DECODE_HOSTS} ${TP_HOSTS}; do  # reachable before anything
        [[ "${host}" == "${HEAD_HOST}" ]] || ssh_to "${host}" true \
            || die "cannot ssh ${SSH_USER}@${host} (key authentication)"
    done
    start_here etcd etcd --name head --data-dir "${STATE_DIR}/etcd" \
        --listen-client-urls "http://0.0.0.0:${ETCD_PORT}" \
        --advertise-client-urls "http://${HEAD_HOST}:${ETCD_PORT}" \
        --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
        --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
        --initial-cluster "head=http://127.0.0.1:$((ETCD_PORT + 1))"
    start_here nats nats-server -a 0.0.0.0 -p "${NATS_PORT}"
    # shellcheck disable=SC2086
    start_here frontend env PYTHONPATH="${DL_ROOT}" "${PYTHON}" -m dynamo_lite.frontend \
        --http-port "${HTTP_PORT}" \
        --etcd-endpoints "http://127.0.0.1:${ETCD_PORT}" --nats-server "nats://127.0.0.1:${NATS_PORT}" \
        ${PRESET:+--preset ${PRESET}} $( (( want > 1 )) && echo --router-mode kv ) ${FRONTEND_ARGS}
    local i=0
    for host in ${AGG_HOSTS}; do start_worker "${host}" "worker$((i++))"; done
    for host in ${PREFILL_HOSTS}; do
        start_worker "${host}" "prefill$((i++))" --is-prefill-worker --connector nixl
    done
    for host in ${DECODE_HOSTS}; do start_worker "${host}" "decode$((i++))" --connector nixl; done
    if [[ -n "${TP_HOSTS}" ]]; then
        local first rest; first="${TP_HOSTS%% *}"; rest="${TP_HOSTS#"${first}"}"
        # Ray's CLI from the hosts' interpreter (a venv's bin/ is not on a non-interactive SSH PATH).
        start_on "${first}" ray-head "${REMOTE_PYTHON}" -m ray.scripts.scripts start --head --block \
            --port "${RAY_PORT}" --node-ip-address "${first}" ${RAY_START_ARGS}
        for host in ${rest}; do
            start_on "${host}" "ray-${host}" "${REMOTE_PYTHON}" -m ray.scripts.scripts start --block \
                --address "${first}:${RAY_PORT}" --node-ip-address "${host}" ${RAY_START_ARGS}
        done
        # vLLM's Ray executor joins this cluster (RAY_ADDRESS), not a new local one.
        WORKER_ENV="RAY_ADDRESS=${first}:${RAY_PORT}" start_worker "${first}" tp-worker \
            --tensor-parallel-size "${TP}" --distributed-executor-backend ray
    fi
    log "waiting up to ${STARTUP_TIMEOUT}s for ${want} worker(s) at http://${HEAD_HOST}:${HTTP_PORT}/health"
    local deadline=$(( $(date +%s) + ${STARTUP_TIMEOUT%.*} ))
    until (( $(health_count) >= want )); do
        (( $(date +%s) < deadline )) || {
            do_status || true; die "the model did not answer in time (logs above)"; }
        sleep 1
    done
    log "serving at http://${HEAD_HOST}:${HTTP_PORT}/v1 ($(health_count) worker(s));" \
        "stop: bash launch/cluster.sh stop"
}

alive() {  # HOST PID
    if [[ "$1" == - ]]; then kill -0 "$2" 2>/dev/null; else ssh_to "$1" "kill -0 $2" 2>/dev/null; fi
}

do_status() {
    [[ -s "${PIDS}" ]] || { log "no cluster recorded in ${PIDS}"; return 1; }
    local host pid name down=0
    while read -r host pid name; do
        if alive "${host}" "${pid}"; then echo "running  ${name} (${host/#-/here} pid ${pid})"
        else echo "stopped  ${name} (${host/#-/here} pid ${pid})"; down=1; fi
    done < "${PIDS}"
    echo "health: $(health_count) worker(s) at http://${HEAD_HOST}:${HTTP_PORT}/health"
    return "${down}"
}

signal_group() {  # HOST PID SIGNAL: the whole session (setsid made the process its leader)
    if [[ "$1" == - ]]; then kill "-$3" -- "-$2" 2>/dev/null || true
    else ssh_to "$1" "kill -$3 -- -$2" 2>/dev/null || true; fi
}

do_stop() {
    [[ -s "${PIDS}" ]] || { log "nothing recorded in ${PIDS}"; return 0; }
    local host pid name lines
    mapfile -t lines < <(tac "${PIDS}")  # newest first: workers, then frontend, NATS, etcd
    for line in "${lines[@]}"; do
        read -r host pid name <<< "${line}"
        signal_group "${host}" "${pid}" TERM
    done
    local deadline=$(( $(date +%s) + STOP_TIMEOUT ))
    for line in "${lines[@]}"; do
        read -r host pid name <<< "${line}"
        while alive "${host}" "${pid}" && (( $(date +%s) < deadline )); do sleep 0.5; done
        if alive "${host}" "${pid}"; then signal_group "${host}" "${pid}" KILL; log "killed ${name}"; fi
        log "stopped ${name}"
    done
    rm -f "${PIDS}"
}

"do_${command}"
