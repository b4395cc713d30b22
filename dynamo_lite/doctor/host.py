"""Checks of this host alone: GPU / driver / CUDA, NIXL and its backends, the RDMA fabric, ports, and
whether the model's files, disk and memory are there. Each takes what it reads as arguments (a command
runner, a sysfs root, sizes) so that tests give it a fake machine."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dynamo_lite.doctor.report import Check, fail, info, ok, warn
from dynamo_lite.runtime import fabric as fabric_mod
from dynamo_lite.runtime import fingerprint

GiB = 1 << 30
# (argv) -> (returncode, stdout); a missing program raises FileNotFoundError.
Runner = Callable[[Sequence[str]], tuple[int, str]]


def run_command(argv: Sequence[str], timeout: float = 10.0) -> tuple[int, str]:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    return out.returncode, out.stdout + out.stderr


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    driver: str
    memory_bytes: int  # 0 when the GPU reports none of its own (unified memory: DGX Spark's GB10)


def check_gpus(run: Runner = run_command) -> tuple[list[Check], list[Gpu]]:
    """nvidia-smi's view: GPUs, driver, CUDA version; "no GPU" (info) when there is no nvidia-smi."""
    try:
        code, out = run(["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total",
                         "--format=csv,noheader,nounits"])
    except FileNotFoundError:
        return [info("gpu", "no GPU: nvidia-smi not found (vLLM's CPU build serves here; "
                            "VLLM_CPU_KVCACHE_SPACE sizes its KV cache)")], []
    except (OSError, subprocess.SubprocessError) as e:
        return [fail("gpu", f"nvidia-smi could not run: {e}")], []
    if code != 0:
        first = out.strip().splitlines()[0] if out.strip() else f"exit status {code}"
        return [fail("gpu", f"nvidia-smi failed: {first}",
                     "is the NVIDIA driver loaded (lsmod | grep nvidia)? a reboot after a driver "
                     "update?")], []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4 or not parts[0].isdigit():
            continue
        mib = parts[3]
        gpus.append(Gpu(int(parts[0]), parts[1], parts[2], int(float(mib)) << 20 if _number(mib) else 0))
    if not gpus:
        return [fail("gpu", "nvidia-smi lists no GPU", "check CUDA_VISIBLE_DEVICES and the driver")], []
    cuda = ""
    try:
        _, header = run(["nvidia-smi"])
        m = re.search(r"CUDA Version:\s*([\d.]+)", header)
        cuda = m[1] if m else ""
    except (OSError, subprocess.SubprocessError):
        pass
    checks = []
    for g in gpus:
        memory = f"{g.memory_bytes / GiB:.0f} GiB" if g.memory_bytes else "unified memory"
        checks.append(ok("gpu", f"GPU {g.index}: {g.name}, {memory}, driver {g.driver}"
                                f"{', CUDA ' + cuda if cuda else ''}"))
    if not cuda:
        checks.append(warn("gpu", "nvidia-smi does not say which CUDA version the driver supports"))
    return checks, gpus


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def nixl_libs_dir() -> Path | None:
    """The folder of NIXL's backend plugins in its wheel (nixl_cu12.libs/nixl), found without importing
    NIXL (its import loads CUDA libraries)."""
    for package in ("nixl_cu12", "nixl_cu13", "nixl"):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        if spec and spec.origin:
            libs = Path(spec.origin).parent.parent / f"{package}.libs"
            if (libs / "nixl").is_dir():
                return libs
    return None


def check_nixl(libs: Path | None, fab: fabric_mod.Fabric, version: str) -> list[Check]:
    """NIXL installed, its UCX backend present, UCX built with IB verbs, and RDMA devices to use them."""
    if not version:
        return [warn("nixl", "NIXL is not installed: disaggregated serving (--connector nixl) cannot start",
                     "scripts/setup.sh installs nixl and nixl-cu12 with --no-deps")]
    if libs is None:
        return [warn("nixl", f"NIXL {version} installed, but its backend plugins were not found")]
    plugins = (libs / "nixl").glob("libplugin_*.so*")
    backends = sorted(p.name[len("libplugin_"):].split(".")[0] for p in plugins)
    checks = []
    if "UCX" not in backends:
        checks.append(fail("nixl", f"NIXL {version} has no UCX backend (backends: {', '.join(backends)}): "
                                   "vLLM's NixlConnector needs it"))
    else:
        checks.append(ok("nixl", f"NIXL {version}, backends {', '.join(backends)}"))
    ib = sorted(p.name.split(".")[0] for p in (libs / "ucx").glob("libuct_ib*.so*"))
    if not ib:
        checks.append(warn("nixl", "NIXL's UCX has no InfiniBand transport (libuct_ib): KV moves over TCP"))
    elif not fab.active_ports:
        checks.append(warn("nixl", "UCX has RDMA transports but this host has no active RDMA port: KV "
                                   "transfers between hosts go over TCP"))
    else:
        devices = ", ".join(f"{p.hca}:{p.port}" for p in fab.active_ports)
        checks.append(ok("nixl", f"UCX RDMA transports ({', '.join(ib)}) over {devices}"))
    return checks


def check_fabric(fab: fabric_mod.Fabric, advertise_host: str = "") -> list[Check]:
    checks = [ok("fabric", line) if "ACTIVE" in line else warn("fabric", line)
              for line in fabric_mod.describe(fab)]
    for text in fabric_mod.warnings(fab, advertise_host):
        checks.append(warn("fabric", text, "single host: nothing to do; two hosts: docs/multi-node.md, "
                                           "'Fabric'"))
    env = fabric_mod.settings(fab)
    if env:
        checks.append(ok("fabric", "settings: " + " ".join(f"{k}={v}" for k, v in env.items()) +
                          " (python -m dynamo_lite.doctor --fabric-env prints them as exports)"))
    return checks


def check_ports(ports: Sequence[int], host: str = "0.0.0.0") -> list[Check]:
    """Each port free to bind here (OK), or taken (WARN: a server already runs, or another program)."""
    checks = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
                checks.append(ok("ports", f"port {port} is free on {host}"))
            except OSError as e:
                checks.append(warn("ports", f"port {port} is in use on {host} ({e.strerror or e})",
                                   "fine if it is this deployment's own server; else pick another port"))
    return checks


def check_model(path: str, weights_gb: float = 0.0, tensor_parallel_size: int = 1,
                gpus: Sequence[Gpu] = (), memory_available: int | None = None,
                disk_free: Callable[[str], int] | None = None) -> list[Check]:
    """The model folder exists with its config; else enough free disk to download `weights_gb` there.
    Memory: each GPU (or, without GPU memory of its own, this host's RAM) holds its share of the weights."""
    import psutil

    folder = Path(path).expanduser()
    free = disk_free or (lambda p: shutil.disk_usage(p).free)
    checks = []
    if not folder.is_dir():
        parent = next((p for p in folder.parents if p.is_dir()), Path("/"))
        checks.append(fail("model", f"model folder {folder} does not exist",
                           "download the weights there (docs/presets.md) or pass --model FOLDER"))
        if weights_gb:
            have = free(str(parent)) / GiB
            status = ok if have >= weights_gb * 1.05 else fail
            checks.append(status("disk", f"{have:.0f} GiB free on {parent} for ~{weights_gb:.0f} GB of "
                                         "weights"))
        return checks
    if not (folder / "config.json").is_file():
        checks.append(fail("model", f"{folder} has no config.json: not a model folder (or a partial "
                                    "download)"))
        return checks
    size = fingerprint.weights_bytes(folder)
    if not size:
        checks.append(fail("model", f"{folder} holds no weight files (*.safetensors, *.bin, *.gguf)"))
        return checks
    checks.append(ok("model", f"{folder}: {size / GiB:.1f} GiB of weights, digest "
                              f"{fingerprint.model_digest(folder)}"))
    share = size / max(tensor_parallel_size, 1)
    own = [g for g in gpus if g.memory_bytes]
    if own:
        smallest = min(g.memory_bytes for g in own)
        text = (f"{share / GiB:.1f} GiB of weights per GPU (TP {tensor_parallel_size}) against "
                f"{smallest / GiB:.0f} GiB on the smallest GPU")
        checks.append(ok("memory", text) if share < 0.9 * smallest else
                      fail("memory", text, "raise --tensor-parallel-size or pick a smaller model"))
        return checks
    available = psutil.virtual_memory().available if memory_available is None else memory_available
    where = "unified memory" if gpus else "RAM"
    if share > 0.9 * available:
        checks.append(fail("memory", f"{share / GiB:.1f} GiB of weights per host (TP {tensor_parallel_size}) "
                                     f"but only {available / GiB:.1f} GiB of {where} available",
                           "stop other processes, raise --tensor-parallel-size, or pick a smaller model"))
    elif share > 0.6 * available:
        checks.append(warn("memory", f"{share / GiB:.1f} GiB of weights per host leave little of the "
                                     f"{available / GiB:.1f} GiB {where} available for the KV cache"))
    else:
        checks.append(ok("memory", f"{share / GiB:.1f} GiB of weights per host, {available / GiB:.1f} GiB of "
                                   f"{where} available"))
    return checks


def local_versions() -> dict[str, str]:
    return fingerprint.component_versions()


def hostname() -> str:
    return os.uname().nodename
