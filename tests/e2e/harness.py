"""Start dynamo_lite processes the way a user does (`python -m ...`), bounded and always stopped.

Every process logs to a file in the test's run dir; on a failed wait the log tail is put in the
error so a CI failure explains itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_PATH = Path(os.environ.get(
    "DYN_MODEL_PATH", Path.home() / ".cache/dynamo_lite/models/SmolLM2-135M-Instruct"))
SERVED_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (graceful: deregister + drain), then SIGKILL after timeout."""
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)

    def kill(self) -> None:
        """SIGKILL: the worker dies without deregistering (its lease must expire)."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


@dataclass
class ProcGroup:
    """Processes started by one fixture; stop() stops them in reverse order."""

    run_dir: Path
    env: dict[str, str]
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, module: str, *args: str, extra_env: dict[str, str] | None = None) -> Proc:
        log_path = self.run_dir / f"{name}.log"
        env = {**os.environ, **self.env, **(extra_env or {})}
        log = open(log_path, "wb")
        popen = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()


def wait_until(predicate, timeout: float, what: str, procs: list[Proc] = (), interval: float = 0.2):
    """Poll predicate until truthy; fail with the logs of `procs` if it never is or one dies."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited ({proc.popen.returncode}) while waiting for "
                                     f"{what}:\n{proc.log_tail()}")
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - the thing we poll may not be up yet
            last_error = e
        time.sleep(interval)
    logs = "\n".join(f"--- {p.name} ---\n{p.log_tail()}" for p in procs)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})\n{logs}")


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
