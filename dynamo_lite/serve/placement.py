"""Which cores or GPUs each engine of `serve` gets.

On CPU every engine gets its own cores: two vLLM CPU engines sharing cores starve each other (a
remote-prefill decode took ~60 s unpinned, ~3 s pinned; DESIGN §4). The cores are split evenly and
the remainder is left to the frontend. With CUDA every engine gets its own GPUs (CUDA_VISIBLE_DEVICES),
as many as its tensor x pipeline parallel size. Too few of either is an error that names the numbers,
raised before anything starts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dynamo_lite.launch.supervisor import LaunchError


class PlacementError(LaunchError):
    """There are fewer cores or GPUs than the engines need (the message says how many of each)."""


@dataclass(frozen=True)
class Placement:
    """Where one engine runs: its CPU cores, or its GPUs (CUDA_VISIBLE_DEVICES entries)."""

    cpus: tuple[int, ...] = ()
    gpus: tuple[str, ...] = ()

    def omp_bind(self) -> str | None:
        """VLLM_CPU_OMP_THREADS_BIND for a CPU engine ("0", "2-3", "0,2"); None for a GPU engine."""
        return cpu_list(self.cpus) if self.cpus else None

    def env(self) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": ",".join(self.gpus)} if self.gpus else {}

    def describe(self) -> str:
        if self.gpus:
            return f"GPU {','.join(self.gpus)}"
        return f"CPU {cpu_list(self.cpus)}"


def cpu_list(cpus: Sequence[int]) -> str:
    """Cores as VLLM_CPU_OMP_THREADS_BIND and taskset write them: runs as ranges ("0-3,6")."""
    parts: list[str] = []
    ordered = sorted(set(cpus))
    start = prev = None
    for cpu in [*ordered, None]:
        if cpu is not None and prev is not None and cpu == prev + 1:
            prev = cpu
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = cpu
    return ",".join(parts)


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """ "0-3,6" -> (0, 1, 2, 3, 6); ValueError for anything else."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        first, last = int(lo), int(hi) if sep else int(lo)
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {part!r}")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError("no CPUs")
    return tuple(sorted(cpus))


def available_cpus() -> tuple[int, ...]:
    """The cores this process may run on (what `nproc` counts: a taskset or cgroup limit applies)."""
    return tuple(sorted(os.sched_getaffinity(0)))


def visible_gpus(env: Mapping[str, str], nvidia_smi: str | None = None) -> tuple[str, ...]:
    """The GPUs engines may use: CUDA_VISIBLE_DEVICES when set ("" = none), else the indices that
    `nvidia-smi -L` lists (none without the tool). No torch import: serve starts in well under a second."""
    if "CUDA_VISIBLE_DEVICES" in env:
        return tuple(d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip())
    tool = nvidia_smi or shutil.which("nvidia-smi")
    if tool is None:
        return ()
    try:
        listing = subprocess.run([tool, "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(str(i) for i, line in enumerate(line for line in listing.splitlines()
                                                  if line.startswith("GPU ")))


def parallel_size(worker_args: Sequence[str]) -> int:
    """GPUs one vLLM engine needs: its --tensor-parallel-size times --pipeline-parallel-size (1 each
    unless given; the last one given counts, as in vLLM's parser)."""
    sizes = {"tp": 1, "pp": 1}
    names = {"--tensor-parallel-size": "tp", "-tp": "tp", "--pipeline-parallel-size": "pp", "-pp": "pp"}
    args = list(worker_args)
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag not in names:
            continue
        if not eq:
            value = args[i + 1] if i + 1 < len(args) else ""
        try:
            sizes[names[flag]] = int(value)
        except ValueError:
            raise PlacementError(f"{flag} takes a number of GPUs (got {value!r})") from None
    return sizes["tp"] * sizes["pp"]


def split_cpus(cpus: Sequence[int], names: Sequence[str]) -> list[Placement]:
    """Each engine the same number of cores (at least one), in order; what is left goes to nobody
    (the frontend and the planes run there)."""
    engines = len(names)
    if engines > len(cpus):
        raise PlacementError(
            f"{engines} engines ({', '.join(names)}) need {engines} CPU cores, one each, but this process "
            f"may use {len(cpus)} ({cpu_list(cpus)}): start fewer workers, or give more cores "
            "(--cpus, taskset)")
    per = len(cpus) // engines
    return [Placement(cpus=tuple(cpus[i * per:(i + 1) * per])) for i in range(engines)]


def split_gpus(gpus: Sequence[str], names: Sequence[str], per_engine: int) -> list[Placement]:
    """`per_engine` GPUs for each engine, in order."""
    engines, need = len(names), len(names) * per_engine
    if need > len(gpus):
        raise PlacementError(
            f"{engines} engines ({', '.join(names)}) x {per_engine} GPU(s) each need {need} GPUs, but "
            f"{len(gpus)} are visible ({','.join(gpus) or 'none'}): start fewer workers, or lower "
            "--tensor-parallel-size / --pipeline-parallel-size")
    return [Placement(gpus=tuple(gpus[i * per_engine:(i + 1) * per_engine])) for i in range(engines)]


def place_engines(names: Sequence[str], *, engine: str, worker_args: Sequence[str], cpus: Sequence[int],
                  gpus: Sequence[str]) -> list[Placement]:
    """GPUs for vLLM engines when any are visible, else cores; the mocker always runs on cores."""
    if engine == "vllm" and gpus:
        return split_gpus(gpus, names, parallel_size(worker_args))
    return split_cpus(cpus, names)
