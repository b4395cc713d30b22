"""Faults under load, shared by the CI chaos test (tests/e2e/test_chaos.py) and benchmarks/bench_chaos.py.

One stack of real processes, started as a user starts them: its own etcd and nats-server (they get
restarted, so never the session's), a kv-mode frontend on a fixed port (a restarted frontend takes the
same one), and mocker workers, one process each (so one can be killed or stopped), whose model card
allows 3 migrations. `Load` keeps a steady number of streaming completions running from a thread of
its own; each stream asks for `max_tokens` with ignore_eos, so it is whole when it ends with
finish_reason "length" after exactly that many tokens. `run_scenario` tags the streams it starts,
applies one fault, and measures the seconds from the fault's end until every worker serves again.

With `remote_worker`, one of the workers runs on a host of its own (`WorkerHost`: a network namespace
joined to this one by a veth pair; needs root and `ip netns`), whose network `cut_network` cuts; etcd
and NATS then listen on this side's veth address so that both "hosts" reach them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from dynamo_lite.launch.supervisor import DEFAULT_STOP_TIMEOUT, Process, Supervisor, http_ok, wait_until
from tests.e2e.harness import DEFAULT_MODEL_PATH, REPO, healthy_instances, metric_sum
from tests.e2e.test_disagg_netns import _netns_unavailable as netns_unavailable
from tests.services import ServiceHandle, free_tcp_port, start_etcd, start_nats

__all__ = ["ChaosStack", "Load", "ScenarioReport", "WorkerHost", "netns_unavailable", "run_scenario"]

MODEL = "chaos-model"
MIGRATION_LIMIT = 3
REMOTE_SIDE_PORT = 9400  # the remote worker's /metrics, in its own namespace's port space


@dataclass
class StreamResult:
    scenario: str
    started: float
    ended: float = 0.0
    whole: bool = False
    error: str = ""


@dataclass
class ScenarioReport:
    name: str
    started: int
    whole: int
    failed: int
    recovery_s: float
    longest_s: float = 0.0  # the longest stream's duration (a stream stalled by the fault shows here)
    errors: list[str] = field(default_factory=list)

    def row(self) -> str:
        return f"| {self.name} | {self.started} | {self.whole} | {self.failed} | {self.recovery_s:.1f} |"


class Load:
    """`concurrency` streams at all times (while not paused), each a /v1/completions stream."""

    def __init__(self, base_url: str, *, concurrency: int, max_tokens: int, stream_timeout: float = 60.0):
        self.base_url = base_url
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.stream_timeout = stream_timeout
        self.scenario = "warm-up"
        self.results: list[StreamResult] = []
        self.in_flight = 0
        self._running = threading.Event()
        self._running.set()
        self._stop = False
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="chaos-load",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._running.set()
        self._thread.join(self.stream_timeout + 10)

    def pause(self) -> None:
        """Start no new stream (those running go on) until resume()."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency * 2)
        async with httpx.AsyncClient(timeout=self.stream_timeout, limits=limits) as http:
            await asyncio.gather(*(self._loop(http, i) for i in range(self.concurrency)))

    async def _loop(self, http: httpx.AsyncClient, index: int) -> None:
        number = 0
        while not self._stop:
            if not self._running.is_set():
                await asyncio.sleep(0.05)
                continue
            number += 1
            result = StreamResult(self.scenario, time.monotonic())
            self.results.append(result)
            self.in_flight += 1
            try:
                await self._one(http, result, f"chaos stream {index}-{number}")
            except Exception as e:  # any failure counts: connection, timeout, protocol
                result.error = f"{type(e).__name__}: {e}"
            finally:
                self.in_flight -= 1
                result.ended = time.monotonic()

    async def _one(self, http: httpx.AsyncClient, result: StreamResult, prompt: str) -> None:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": self.max_tokens, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        finish, tokens = None, None
        async with http.stream("POST", f"{self.base_url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = f"in-band error: {event['error'].get('message', '')[:200]}"
                    return
                for choice in event.get("choices") or ():
                    finish = choice.get("finish_reason") or finish
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
        result.whole = finish == "length" and tokens == self.max_tokens
        if not result.whole:
            result.error = f"incomplete: finish_reason {finish!r}, {tokens} of {self.max_tokens} tokens"


def _ip(*args: str) -> None:
    subprocess.run(args, capture_output=True, text=True, timeout=30, check=True)


class WorkerHost:
    """A second "host": network namespace NS, joined to this one by a veth pair (this side `link` =
    `gateway`/24, the namespace's eth0 = `address`/24). close() deletes the namespace and the pair.

    cut() makes both ends of the pair drop every packet they would send (a pfifo queue of length 0:
    this machine has neither nft nor iptables, nor netem), so the network vanishes the way a dead switch
    port does: no reset, no error, connections stay open and hear nothing; restore() removes the queues.
    The subnet is in 198.18.0.0/15 (reserved for benchmarks), away from any real network."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns, self.link = f"dlchaos-{tag}", f"dlc{tag}"
        taken = subprocess.run(["ip", "-4", "-o", "addr"], check=False, capture_output=True, text=True,
                               timeout=10).stdout
        third = random.choice([n for n in range(256) if f"198.18.{n}." not in taken])
        self.gateway, self.address = f"198.18.{third}.1", f"198.18.{third}.2"
        self._created = False
        self.cut_now = False

    def create(self) -> None:
        _ip("ip", "netns", "add", self.ns)
        self._created = True
        _ip("ip", "link", "add", "dev", self.link, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
        _ip("ip", "addr", "add", f"{self.gateway}/24", "dev", self.link)
        _ip("ip", "link", "set", "dev", self.link, "up")
        _ip("ip", "-n", self.ns, "addr", "add", f"{self.address}/24", "dev", "eth0")
        _ip("ip", "-n", self.ns, "link", "set", "dev", "eth0", "up")
        _ip("ip", "-n", self.ns, "link", "set", "dev", "lo", "up")

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    def cut(self) -> None:
        self.cut_now = True
        _ip("tc", "qdisc", "replace", "dev", self.link, "root", "pfifo", "limit", "0")
        _ip(*self.exec_prefix(), "tc", "qdisc", "replace", "dev", "eth0", "root", "pfifo", "limit", "0")

    def restore(self) -> None:
        _ip("tc", "qdisc", "del", "dev", self.link, "root")
        _ip(*self.exec_prefix(), "tc", "qdisc", "del", "dev", "eth0", "root")
        self.cut_now = False

    def close(self) -> None:
        """Delete the namespace (and with it both ends of the pair); its processes must be gone first."""
        if self._created:
            subprocess.run(["ip", "netns", "del", self.ns], check=False, capture_output=True, timeout=30)
            self._created = False


class ChaosStack:
    """etcd + NATS + frontend + `workers` mocker processes; close() stops everything it started.
    With `remote_worker`, the last of them runs on a WorkerHost (`self.remote`), with its own
    `remote_lease_ttl` (default: `lease_ttl`)."""

    def __init__(self, run_dir: Path, *, workers: int = 3, speedup_ratio: float = 0.2,
                 frontend_args: tuple[str, ...] = (), lease_ttl: float = 10.0, remote_worker: bool = False,
                 remote_lease_ttl: float | None = None):
        if not (DEFAULT_MODEL_PATH / "config.json").exists():
            raise RuntimeError(f"default model missing at {DEFAULT_MODEL_PATH}: run scripts/setup.sh")
        self.run_dir = run_dir
        self.n_workers = workers
        self.speedup_ratio = speedup_ratio
        self.frontend_args = frontend_args
        self.lease_ttl = lease_ttl
        self.remote_lease_ttl = remote_lease_ttl or lease_ttl
        self.host = WorkerHost() if remote_worker else None
        self.remote: Process | None = None
        self.namespace = f"chaos-{os.getpid()}-{int(time.time())}"
        self._services = contextlib.ExitStack()
        self.etcd: ServiceHandle | None = None
        self.nats: ServiceHandle | None = None
        self.supervisor: Supervisor | None = None
        self.http_port = free_tcp_port()
        self.base_url = f"http://127.0.0.1:{self.http_port}"
        self.frontend: Process | None = None
        self.workers: list[Process] = []
        self._started = 0

    def start(self) -> None:
        try:
            listen = "127.0.0.1"
            if self.host is not None:
                self.host.create()
                listen = self.host.gateway
            self.etcd = self._services.enter_context(start_etcd(host=listen))
            self.nats = self._services.enter_context(start_nats(host=listen))
            env = {**os.environ, "ETCD_ENDPOINTS": self.etcd.url, "NATS_SERVER": self.nats.url,
                   "PYTHONUNBUFFERED": "1"}
            self.supervisor = Supervisor(self.run_dir, stop_timeout=DEFAULT_STOP_TIMEOUT, env=env)
            self.start_frontend()
            local = self.n_workers - (self.host is not None)
            self.workers = [self.start_worker() for _ in range(local)]
            if self.host is not None:
                self.remote = self.start_remote_worker()
            self.wait_all_serving(60)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.supervisor is not None:
            for proc in self.supervisor.procs:  # a stopped process cannot handle SIGTERM
                if proc.alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGCONT)
            if self.host is not None and self.host.cut_now:
                self.host.restore()  # a worker cut off cannot deregister
            self.supervisor.stop_all()
        self._services.close()
        if self.host is not None:
            self.host.close()

    def _start(self, name: str, module: str, *args: str, prefix: tuple[str, ...] = ()) -> Process:
        assert self.supervisor is not None
        self._started += 1
        return self.supervisor.start(f"{name}-{self._started}",
                                     [*prefix, sys.executable, "-m", module, *args], cwd=REPO)

    def start_frontend(self) -> Process:
        self.frontend = self._start("frontend", "dynamo_lite.frontend", "--http-host", "127.0.0.1",
                                    "--http-port", str(self.http_port), "--namespace", self.namespace,
                                    "--router-mode", "kv", *self.frontend_args)
        wait_until(lambda: http_ok(f"{self.base_url}/live"), 30, "the frontend", [self.frontend])
        return self.frontend

    def _worker_args(self, lease_ttl: float) -> tuple[str, ...]:
        return ("--model-path", str(DEFAULT_MODEL_PATH), "--served-model-name", MODEL, "--speedup-ratio",
                str(self.speedup_ratio), "--migration-limit", str(MIGRATION_LIMIT), "--lease-ttl",
                str(lease_ttl), "--namespace", self.namespace)

    def start_worker(self) -> Process:
        return self._start("mocker", "dynamo_lite.mocker", *self._worker_args(self.lease_ttl))

    def start_remote_worker(self) -> Process:
        """A mocker on the WorkerHost, started there as an operator would (`ip netns exec`)."""
        assert self.host is not None
        return self._start("remote-mocker", "dynamo_lite.mocker", *self._worker_args(self.remote_lease_ttl),
                           "--advertise-host", self.host.address, "--metrics-endpoint-port",
                           str(REMOTE_SIDE_PORT), prefix=tuple(self.host.exec_prefix()))

    def remote_completed(self) -> float:
        """Requests the remote worker completed so far (its side port's counters, summed over the
        instance ids it registered under)."""
        assert self.host is not None
        text = httpx.get(f"http://{self.host.address}:{REMOTE_SIDE_PORT}/metrics", timeout=5).text
        return metric_sum(text, "dynamo_lite_worker_requests_total", outcome="completed")

    def remote_instance_ids(self) -> set[int]:
        """Instance ids the frontend routes to on the WorkerHost (its lease id: a new one after it
        re-registered)."""
        assert self.host is not None
        try:
            instances = healthy_instances(self.base_url, MODEL)
        except httpx.HTTPError:
            return set()
        return {i["instance_id"] for i in instances if i["address"].startswith(f"{self.host.address}:")}

    def migrations(self) -> float:
        """The frontend's migrations so far (since it started)."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=5).text
        return metric_sum(text, "dynamo_lite_frontend_migrations_total", model=MODEL)

    def serving_workers(self) -> int:
        try:
            return len(healthy_instances(self.base_url, MODEL))
        except httpx.HTTPError:
            return 0

    def wait_all_serving(self, timeout: float) -> float:
        """Seconds until the frontend routes to every worker again (each live, none excluded)."""
        start = time.monotonic()
        assert self.frontend is not None
        wait_until(lambda: self.serving_workers() == self.n_workers, timeout,
                   f"{self.n_workers} workers serving on {self.base_url}", [self.frontend],
                   interval=0.1)
        return time.monotonic() - start

    # ------------------------------------------------------------------ faults (each returns when it ended)

    def kill_worker(self) -> None:
        victim = self.workers.pop(0)
        victim.kill()
        self.workers.append(self.start_worker())  # what a supervisor (systemd, Kubernetes) does

    def stop_worker(self, seconds: float) -> None:
        victim = self.workers[0]
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(victim.pid, signal.SIGCONT)

    def restart_etcd(self, downtime: float) -> None:
        assert self.etcd is not None
        self.etcd.restart(downtime)

    def restart_nats(self, downtime: float) -> None:
        assert self.nats is not None
        self.nats.restart(downtime)

    def cut_network(self, seconds: float) -> None:
        """Cut the WorkerHost off for `seconds`: its streams must fail over (heartbeat timeout) and it
        must serve again on its own afterwards (re-registered if its lease expired meanwhile)."""
        assert self.host is not None
        self.host.cut()
        try:
            time.sleep(seconds)
        finally:
            self.host.restore()

    def restart_frontend(self, load: Load) -> int:
        """SIGKILL the frontend, start a new one on the same port; the streams in flight on the old one
        are its own losses. Returns how many were in flight."""
        assert self.frontend is not None
        load.pause()  # no new stream may be sent into the gap (a client would retry it elsewhere)
        in_flight = load.in_flight
        self.frontend.kill()
        try:
            self.start_frontend()
        finally:
            load.resume()
        return in_flight


def run_scenario(stack: ChaosStack, load: Load, name: str, fault: Callable[[], object], *,
                 settle: float, recovery_timeout: float = 60.0,
                 recovery_from_start: bool = False) -> tuple[ScenarioReport, object]:
    """Tag new streams with `name`, let them run `settle` s, apply `fault`, measure recovery, let the
    streams started meanwhile end; the report counts the streams started under `name`.

    Recovery: seconds from the end of the fault (the service back up, SIGCONT, the replacement worker
    started) until the frontend routes to every worker again; from its start with recovery_from_start
    (a frontend restart: the fault is the frontend's absence)."""
    load.scenario = name
    time.sleep(settle)
    began = time.monotonic()
    outcome = fault()
    ended = time.monotonic()
    recovery = stack.wait_all_serving(recovery_timeout) + (ended - began if recovery_from_start else 0.0)
    time.sleep(settle)
    load.scenario = f"after {name}"
    deadline = time.monotonic() + load.stream_timeout
    while any(r.scenario == name and not r.ended for r in load.results) and time.monotonic() < deadline:
        time.sleep(0.05)
    mine = [r for r in load.results if r.scenario == name]
    failed = [r for r in mine if r.ended and not r.whole]
    report = ScenarioReport(name, len(mine), sum(r.whole for r in mine),
                            len(failed) + sum(not r.ended for r in mine), recovery,
                            max((r.ended - r.started for r in mine if r.ended), default=0.0),
                            [r.error for r in failed][:5])
    return report, outcome


TABLE_HEADER = ("| scenario | streams started | completed whole | failed | recovery s |\n"
                "| --- | ---: | ---: | ---: | ---: |")
