"""A worker process's HTTP side port (--metrics-endpoint-port): /live, /ready and /metrics.

Kubernetes probes and Prometheus scrapes are plain `GET`s, so this is a small HTTP/1.1 server on
asyncio's streams rather than a web framework: it must not take signal handlers from the worker
(uvicorn's Server.serve installs its own), and it answers even while the engine is busy loading,
because nothing here waits on the engine.

- `/live`: 200 while the process's event loop runs (a hung loop fails the probe; a loading engine does not).
- `/ready`: 200 once every engine of the process has loaded and registered in discovery, 503 before
  that and again from the moment shutdown starts (deregistered, draining), so a load balancer stops
  sending while in-flight requests finish.
- `/metrics`: Prometheus text of every registry given (the engine's own, e.g. vLLM's `vllm:` metrics,
  and the shell's, engine.worker_metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from dynamo_lite.protocol.errors import ConfigError

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16384  # a probe or a scrape sends a few hundred; anything larger is not ours
READ_TIMEOUT = 10.0  # seconds a client may take to send its request head


def render_registries(registries: list[CollectorRegistry]) -> bytes:
    """One exposition of several registries (their metric names must not overlap)."""
    return b"".join(generate_latest(registry) for registry in registries)


class SidePortServer:
    """Serves the three paths on host:port. `ready()` decides /ready; `metrics()` renders /metrics."""

    def __init__(self, host: str, port: int, *, ready: Callable[[], bool], metrics: Callable[[], bytes]):
        self._host, self._port = host, port
        self._ready = ready
        self._metrics = metrics
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> int:
        """Bind (a taken port is a ConfigError naming the flag) and serve; returns the port."""
        try:
            self._server = await asyncio.start_server(self._serve_connection, self._host, self._port,
                                                      limit=MAX_HEADER_BYTES, reuse_address=True)
        except OSError as e:
            raise ConfigError(f"cannot bind the metrics endpoint to {self._host}:{self._port} "
                              f"({e.strerror or e}): choose another --metrics-endpoint-port",
                              param="--metrics-endpoint-port") from e
        logger.info("side port serving /live, /ready, /metrics on %s:%d", self._host, self.port)
        return self.port

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._server.wait_closed()
        self._server = None

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            status, content_type, body = self._answer(head)
        except asyncio.LimitOverrunError:
            head, status, content_type, body = b"", "431 Request Header Fields Too Large", "text/plain", b""
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            status, content_type, body = None, "", b""
        try:
            if status is not None:
                head_out = (b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                            b"Connection: close\r\n\r\n" % (status.encode(), content_type.encode(),
                                                                len(body)))
                writer.write(head_out)
                if not head.startswith(b"HEAD "):
                    writer.write(body)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._connections.discard(task)

    def _answer(self, head: bytes) -> tuple[str, str, bytes]:
        """(status line tail, content type, body) for one request head. One request per connection."""
        try:
            method, target, _version = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        except ValueError:
            return "400 Bad Request", "text/plain", b"malformed request line\n"
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"only GET and HEAD\n"
        path = target.split("?", 1)[0]
        if path == "/live":
            return "200 OK", "text/plain", b"live\n"
        if path == "/ready":
            if self._ready():
                return "200 OK", "text/plain", b"ready\n"
            return "503 Service Unavailable", "text/plain", b"not ready\n"
        if path == "/metrics":
            try:
                return "200 OK", CONTENT_TYPE_LATEST, self._metrics()
            except Exception:
                logger.exception("rendering /metrics failed")
                return "500 Internal Server Error", "text/plain", b"metrics failed\n"
        return "404 Not Found", "text/plain", b"not found: /live, /ready, /metrics\n"
