"""The launch scripts' environment variables, read once (docs/configuration.md lists them)."""

from __future__ import annotations

import os
import platform
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dynamo_lite.runtime.models import DEFAULT_MODEL_PATH, DEFAULT_SERVED_MODEL_NAME
from dynamo_lite.serve.placement import cpu_list



@dataclass(frozen=True)
class LaunchSettings:
    etcd_endpoints: str          # use this etcd, start none ("" = start or reuse a local one)
    nats_server: str             # the same for NATS
    etcd_port: int
    nats_port: int
    nats_monitor_port: int
    infra_host: str              # address local etcd / NATS listen on
    advertise_host: str          # address other hosts reach this one at
    worker_detects_address: bool  # a worker joining a remote etcd with no ADVERTISE_HOST finds its own
    worker_advertise_host: str   # DYN_ADVERTISE_HOST given to the launcher itself
    http_port: int | None        # None: 8000, or a free port when 8000 is busy
    http_host: str
    model_path: str
    served_model_name: str
    kv_cache_space: str
    enforce_eager: str           # "1", "0" or "" (the worker's default)
    max_model_len: str
    worker_args: tuple[str, ...]
    frontend_args: tuple[str, ...]
    stop_timeout: float
    run_dir: str
    runs_root: str               # where RUN_DIR goes when not set: <repo>/runs
    python: str
    omp_bind: str                # VLLM_CPU_OMP_THREADS_BIND of a single worker
    prefill_cpus: str
    decode_cpus: str
    prefill_workers: str         # kept as text: the topology checks it and names the variable
    decode_workers: str
    dp_size: str                 # dep.sh: data-parallel ranks of its worker (checked by the topology)
    cpu_count: str

    @classmethod
    def from_env(cls, env: Mapping[str, str], python: str) -> LaunchSettings:
        def get(name: str, default: str = "") -> str:
            return env.get(name) or default

        infra_host = get("INFRA_HOST", "127.0.0.1")
        advertise_host = get("ADVERTISE_HOST")
        detects = False
        if not advertise_host:
            detects = bool(get("ETCD_ENDPOINTS"))
            advertise_host = "127.0.0.1" if infra_host == "0.0.0.0" else infra_host
        http_port = get("HTTP_PORT", get("DYN_HTTP_PORT"))
        return cls(
            etcd_endpoints=get("ETCD_ENDPOINTS"), nats_server=get("NATS_SERVER"),
            etcd_port=int(get("ETCD_PORT", "2379")), nats_port=int(get("NATS_PORT", "4222")),
            nats_monitor_port=int(get("NATS_MONITOR_PORT", "8222")),
            infra_host=infra_host, advertise_host=advertise_host, worker_detects_address=detects,
            worker_advertise_host=get("DYN_ADVERTISE_HOST"),
            http_port=int(http_port) if http_port else None, http_host=get("HTTP_HOST"),
            model_path=get("MODEL_PATH", get("DYN_MODEL_PATH", DEFAULT_MODEL_PATH)),
            served_model_name=get("SERVED_MODEL_NAME", DEFAULT_SERVED_MODEL_NAME),
            kv_cache_space=get("VLLM_CPU_KVCACHE_SPACE", "1"), enforce_eager=get("ENFORCE_EAGER"),
            max_model_len=get("MAX_MODEL_LEN", "2048"),
            worker_args=tuple(shlex.split(get("WORKER_ARGS"))),
            frontend_args=tuple(shlex.split(get("FRONTEND_ARGS"))),
            stop_timeout=float(get("STOP_TIMEOUT", "45")), run_dir=get("RUN_DIR"),
            runs_root=get("DL_RUNS_ROOT", os.path.join(os.getcwd(), "runs")),
            python=get("PYTHON", python),
            omp_bind=get("VLLM_CPU_OMP_THREADS_BIND", lone_worker_cpus(sorted(os.sched_getaffinity(0)))),
            prefill_cpus=get("PREFILL_CPUS", "0"), decode_cpus=get("DECODE_CPUS", "1"),
            prefill_workers=get("PREFILL_WORKERS", "2"), decode_workers=get("DECODE_WORKERS", "1"),
            dp_size=get("DP_SIZE", "2"),
            cpu_count=get("CPU_COUNT", str(len(os.sched_getaffinity(0)))),  # what `nproc` says
        )

    @property
    def probe_host(self) -> str:
        """Where this host reaches its own etcd / NATS."""
        return self.advertise_host if self.infra_host == "0.0.0.0" else self.infra_host

    def make_run_dir(self, name: str) -> Path:
        run_dir = Path(self.run_dir or os.path.join(
            self.runs_root, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"))
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir.resolve()


# With this many cores or more, a lone engine leaves only the first to the frontend, etcd and NATS.
LONE_WORKER_MIN_CORES = 4


def lone_worker_cpus(cpus: Sequence[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND of a lone CPU worker (agg.sh): every core of this process but the first
    on a machine of LONE_WORKER_MIN_CORES or more (the engine's compute scales with its cores; the
    frontend needs about one), the first core alone on a smaller one (the frontend gets the other)."""
    if len(cpus) >= LONE_WORKER_MIN_CORES:
        return cpu_list(cpus[1:])
    return str(cpus[0]) if cpus else "0"


def etcd_arch_env() -> dict[str, str]:
    """Debian's etcd 3.4 refuses to start on arm64 without this."""
    return {"ETCD_UNSUPPORTED_ARCH": "arm64"} if platform.machine() == "aarch64" else {}
