"""Keeping a vLLM CPU engine on the cores it was bound to (VLLM_CPU_OMP_THREADS_BIND).

Two engines on one small machine starve each other unless each is pinned to its own cores. On the CPU
platform vLLM's NIXL worker re-pins the engine's compute thread while it initialises; these helpers put
it back. psutil walks the process tree and sets the affinity (Linux, macOS has no affinity API).
"""

from __future__ import annotations

import logging

import psutil

logger = logging.getLogger(__name__)

WORKER_PROCESS_PREFIX = "VLLM::Worker"  # vLLM's process title of its model-running workers


def bound_cpus(omp_threads_bind: str) -> set[int] | None:
    """The CPU set of a single-rank `VLLM_CPU_OMP_THREADS_BIND` value ("1", "0-3", "0,2-3").

    None for values that do not name one fixed set ("", "auto", "nobind", or "a|b" per-rank lists).
    Raises ValueError for a value it cannot read.
    """
    spec = omp_threads_bind.strip()
    if not spec or spec in ("auto", "nobind") or "|" in spec:
        return None
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def restore_worker_affinity(root_pid: int, cpus: set[int]) -> list[int]:
    """Re-pin the main thread of every `VLLM::Worker` process under `root_pid` to `cpus`.

    Why: on the CPU platform vLLM's NIXL worker calls `os.sched_setaffinity(0, last core of each
    NUMA node)` while it initialises, from the worker's main thread, which is also the thread
    that runs the model (the OpenMP master). On a 2-core box that moves the compute of an engine
    bound to core 0 onto core 1, where the other engine runs. Call this once the engine has
    started (AsyncLLM returned). A process's affinity is its main thread's, so only that thread
    moves: the OpenMP threads keep the places vLLM gave them. Returns the pids re-pinned.
    """
    wanted = sorted(cpus)
    repinned: list[int] = []
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return repinned
    for child in children:
        try:
            if child.name().startswith(WORKER_PROCESS_PREFIX) and sorted(child.cpu_affinity()) != wanted:
                child.cpu_affinity(wanted)
                repinned.append(child.pid)
        except psutil.Error:
            continue  # the process went away or is not ours to pin
    if repinned:
        logger.info("re-pinned vLLM worker main thread(s) %s to cpus %s", repinned, wanted)
    return repinned
