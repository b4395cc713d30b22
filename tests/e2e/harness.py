"""Start dynamo_lite processes the way a user does (`python -m ...`), bounded and always stopped,
with the launch scripts' supervisor (dynamo_lite.launch.supervisor).

Every process logs to a file in the test's run dir; on a failed wait (`wait_until`) the log tail is
put in the error so a CI failure explains itself.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from dynamo_lite.runtime.models import DEFAULT_SERVED_MODEL_NAME, default_model_path
from dynamo_lite.launch.supervisor import DEFAULT_STOP_TIMEOUT, Process, Supervisor, wait_until

__all__ = ["DEFAULT_MODEL_PATH", "REPO", "SERVED_MODEL_NAME", "Proc", "ProcGroup", "healthy_instances",
           "metric_samples", "metric_sum", "wait_until"]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_PATH = Path(default_model_path())
SERVED_MODEL_NAME = DEFAULT_SERVED_MODEL_NAME


# A started process (name, pid, popen, log_path, alive(), log_tail(), stop(), kill()).
Proc = Process


class ProcGroup:
    """Processes started by one fixture with `python -m MODULE`; stop() stops them newest first."""

    def __init__(self, run_dir: Path, env: dict[str, str]):
        self.run_dir = run_dir
        self.supervisor = Supervisor(run_dir, stop_timeout=DEFAULT_STOP_TIMEOUT, env={**os.environ, **env})

    @property
    def procs(self) -> list[Proc]:
        return self.supervisor.procs

    def start(self, name: str, module: str, *args: str, extra_env: dict[str, str] | None = None) -> Proc:
        return self.supervisor.start(name, [sys.executable, "-m", module, *args], env=extra_env, cwd=REPO)

    def stop(self) -> None:
        """Stop every process at once: SIGTERM to each, then SIGKILL of its group if it has not exited
        after the stop timeout. Together, not newest first as a launcher does: the etcd and NATS they use
        are the session's, so no process waits on another's exit, and a stack of vLLM engines (each
        seconds to shut down) stops in its slowest member's time instead of the sum of theirs."""
        procs = list(reversed(self.supervisor.procs))
        try:
            if procs:
                with ThreadPoolExecutor(len(procs)) as pool:
                    for done in [pool.submit(proc.stop, DEFAULT_STOP_TIMEOUT) for proc in procs]:
                        done.result()
        finally:
            self.supervisor.stop_all()  # forgets them (and kills the group of any still running)


def healthy_instances(base_url: str, model: str | None = None) -> list[dict]:
    """Instances the frontend reports on /health (empty while unhealthy)."""
    r = httpx.get(f"{base_url}/health", timeout=5)
    if r.status_code != 200:
        return []
    instances = r.json().get("instances", [])
    return [i for i in instances if model is None or i.get("model") == model]


def metric_samples(text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of each sample called `name` in Prometheus text whose labels include `labels`."""
    return [(sample.labels, sample.value)
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == str(v) for k, v in labels.items())]


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 when there is none)."""
    return sum(value for _, value in metric_samples(text, name, **labels))
