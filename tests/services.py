"""Real etcd and nats-server processes for integration and end-to-end tests.

Each service runs on free loopback ports with its own temporary data directory, is waited for
with a bound (it must answer within `start_timeout`), and is stopped by its pid in a `finally`
(terminate, then kill after a grace period). `ServiceHandle.restart()` stops the process and
starts it again on the same port and data directory, for tests of reconnects and recovery.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

ETCD_BINARY = os.environ.get("DYN_TEST_ETCD", "/usr/bin/etcd")
NATS_BINARY = os.environ.get("DYN_TEST_NATS", "/usr/sbin/nats-server")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _etcd_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1.0) as resp:
            return b"true" in resp.read()
    except (OSError, urllib.error.URLError):
        return False


def _nats_ready(port: int) -> bool:
    # nats-server greets every client with an INFO line as soon as it accepts connections.
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.settimeout(1.0)
            return sock.recv(4).startswith(b"INFO")
    except OSError:
        return False


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
    proc: subprocess.Popen | None = None

    @property
    def log_path(self) -> str:
        return os.path.join(self.data_dir, f"{self.name}.log")

    def _log_tail(self, limit: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as log:
                return log.read()[-limit:].decode(errors="replace")
        except OSError:
            return ""

    def start(self) -> None:
        """Start the process and wait (bounded) until it answers."""
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is already running"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self.ready(self.port):
                return
            time.sleep(0.05)
        exited = self.proc.poll()
        self.stop()
        state = f"exited with {exited}" if exited is not None else f"not ready after {self.start_timeout}s"
        raise RuntimeError(f"{self.name} on port {self.port} {state}; log tail:\n{self._log_tail()}")

    def stop(self) -> None:
        """Terminate the process by pid; kill it if it does not exit within STOP_TIMEOUT."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)

    def restart(self, downtime: float = 0.0) -> None:
        """Stop, stay down for `downtime` seconds, start again on the same port and data dir."""
        self.stop()
        if downtime > 0:
            time.sleep(downtime)
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@contextlib.contextmanager
def _running(handle: ServiceHandle) -> Iterator[ServiceHandle]:
    try:
        handle.start()
        yield handle
    finally:
        handle.stop()
        shutil.rmtree(handle.data_dir, ignore_errors=True)


@contextlib.contextmanager
def start_etcd(port: int | None = None) -> Iterator[ServiceHandle]:
    """A single-member etcd on 127.0.0.1:port (a free port if None) with a temporary data dir."""
    port = port or free_port()
    peer_port = free_port()
    data_dir = tempfile.mkdtemp(prefix="dynamo-lite-etcd-")
    client_url = f"http://127.0.0.1:{port}"
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
    with _running(ServiceHandle("etcd", client_url, port, data_dir, argv, _etcd_ready)) as handle:
        yield handle


@contextlib.contextmanager
def start_nats(port: int | None = None) -> Iterator[ServiceHandle]:
    """A nats-server with JetStream on 127.0.0.1:port (a free port if None), temporary store dir."""
    port = port or free_port()
    data_dir = tempfile.mkdtemp(prefix="dynamo-lite-nats-")
    argv = [
        NATS_BINARY, "-js", "-a", "127.0.0.1", "-p", str(port),
        "--store_dir", os.path.join(data_dir, "store"),
    ]
    with _running(ServiceHandle("nats-server", f"nats://127.0.0.1:{port}", port, data_dir, argv,
                                _nats_ready)) as handle:
        yield handle
