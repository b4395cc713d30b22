"""Real etcd and nats-server processes for integration and end-to-end tests.

Each service runs on free loopback ports with its own temporary data directory, started and waited for
with the project's supervisor (dynamo_lite.launch.supervisor: it must answer within `start_timeout`, or
the error names it with its log tail) and stopped by its pid in a `finally` (SIGTERM, then SIGKILL after
a grace period). `ServiceHandle.restart()` stops the process and starts it again on the same port and
data directory, for tests of reconnects and recovery.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dynamo_lite.launch.stack import is_nats
from dynamo_lite.launch.supervisor import Process, http_get, start_process, wait_until
from dynamo_lite.runtime.net import free_tcp_port

__all__ = ["ServiceHandle", "free_tcp_port", "start_etcd", "start_nats"]

ETCD_BINARY = os.environ.get("DYN_TEST_ETCD", "/usr/bin/etcd")
NATS_BINARY = os.environ.get("DYN_TEST_NATS", "/usr/sbin/nats-server")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


def _etcd_ready(host: str, port: int) -> bool:
    status, body = http_get(f"http://{host}:{port}/health", timeout=1.0)
    return status == 200 and b"true" in body


def _nats_ready(host: str, port: int) -> bool:
    return is_nats(host, port)


@dataclass
class ServiceHandle:
    """A running service: `url` is what clients connect to."""

    name: str
    url: str
    port: int
    data_dir: str
    argv: list[str]
    ready: Callable[[int], bool] = field(repr=False)
    start_timeout: float = START_TIMEOUT
    proc: Process | None = None

    @property
    def log_path(self) -> str:
        return os.path.join(self.data_dir, f"{self.name}.log")

    def start(self) -> None:
        """Start the process and wait (bounded) until it answers."""
        assert not self.running, f"{self.name} is already running"
        self.proc = start_process(self.name, self.argv, Path(self.log_path))
        try:
            wait_until(lambda: self.ready(self.port), self.start_timeout, f"{self.name} on port {self.port}",
                       [self.proc], interval=0.05)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Terminate the process by pid; kill it if it does not exit within STOP_TIMEOUT."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.stop(STOP_TIMEOUT)

    def restart(self, downtime: float = 0.0) -> None:
        """Stop, stay down for `downtime` seconds, start again on the same port and data dir."""
        self.stop()
        if downtime > 0:
            time.sleep(downtime)
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.alive()


@contextlib.contextmanager
def _running(handle: ServiceHandle) -> Iterator[ServiceHandle]:
    try:
        handle.start()
        yield handle
    finally:
        handle.stop()
        shutil.rmtree(handle.data_dir, ignore_errors=True)


@contextlib.contextmanager
def start_etcd(port: int | None = None, host: str = "127.0.0.1") -> Iterator[ServiceHandle]:
    """A single-member etcd on host:port (a free port if None) with a temporary data dir; `host` other
    than loopback for clients in other network namespaces (tests/e2e/chaos.py)."""
    port = port or free_tcp_port(host)
    peer_port = free_tcp_port()
    data_dir = tempfile.mkdtemp(prefix="dynamo-lite-etcd-")
    client_url = f"http://{host}:{port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    argv = [
        ETCD_BINARY,
        "--name", "test",
        "--data-dir", os.path.join(data_dir, "data"),
        "--listen-client-urls", client_url,
        "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url,
        "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"test={peer_url}",
        "--initial-cluster-state", "new",
        "--log-level", "warn",
    ]
    with _running(ServiceHandle("etcd", client_url, port, data_dir, argv,
                                lambda p: _etcd_ready(host, p))) as handle:
        yield handle


@contextlib.contextmanager
def start_nats(port: int | None = None, host: str = "127.0.0.1") -> Iterator[ServiceHandle]:
    """A nats-server with JetStream on host:port (a free port if None), temporary store dir."""
    port = port or free_tcp_port(host)
    data_dir = tempfile.mkdtemp(prefix="dynamo-lite-nats-")
    argv = [
        NATS_BINARY, "-js", "-a", host, "-p", str(port),
        "--store_dir", os.path.join(data_dir, "store"),
    ]
    with _running(ServiceHandle("nats-server", f"nats://{host}:{port}", port, data_dir, argv,
                                lambda p: _nats_ready(host, p))) as handle:
        yield handle
