#!/usr/bin/env bash
# Run the dynamo_lite image (container/build.sh builds it).
#
#   container/run.sh [--image IMAGE] [--gpus] [--worker] [--host-network] [--dry-run] [-- COMMAND...]
#
#   (nothing)        python -m dynamo_lite.serve: frontend + one worker on port 8000 (embedded planes)
#   --worker         python -m dynamo_lite.vllm with its side port on 9090 (/live, /ready, /metrics) and
#                    the health check on it; give it ETCD_ENDPOINTS / NATS_SERVER (passed on when set)
#   --gpus           all GPUs (the NVIDIA Container Toolkit's --gpus all)
#   --host-network   --network host: workers of a multi-host deployment must be reachable at the address
#                    they advertise, request plane and NIXL side channel (docs/multi-node.md)
#   -- COMMAND...    run COMMAND instead (e.g. -- python -m dynamo_lite.frontend --router-mode kv)
#
# The stop timeout (75 s) is above the workers' 30 s drain, so `docker stop` lets requests finish.
set -euo pipefail
# shellcheck source=container/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
image="dynamo-lite:0.1.0-cpu" gpus=0 worker=0 host_network=0 dry_run=0 command=()
while (( $# )); do
    case "$1" in
        --image|--image=*) value --image "$@"; image="${VALUE}"; shift "${shift_by}" ;;
        --gpus) gpus=1; shift ;;
        --worker) worker=1; shift ;;
        --host-network) host_network=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        --) shift; command=("$@"); break ;;
        -h|--help) show_help ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

cmd=(docker run --rm --shm-size 8g --stop-timeout 75 --name "dynamo-lite-$$")
(( gpus )) && cmd+=(--gpus all)
if (( host_network )); then
    cmd+=(--network host)
elif (( worker )); then
    cmd+=(-p 9090:9090)
else
    cmd+=(-p 8000:8000)
fi
for var in ETCD_ENDPOINTS NATS_SERVER DYN_ADVERTISE_HOST DYN_NAMESPACE UCX_NET_DEVICES HF_TOKEN; do
    [[ -n "${!var:-}" ]] && cmd+=(-e "${var}")
done
if (( worker )); then
    cmd+=(-e DYN_METRICS_ENDPOINT_PORT=9090 -e HEALTHCHECK_PORT=9090)
    (( ${#command[@]} )) || command=(python -m dynamo_lite.vllm)
fi
cmd+=("${image}" "${command[@]}")
run_docker "${dry_run}" "${cmd[@]}"
