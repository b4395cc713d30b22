"""The caller side of the request plane: send one request, iterate its reply frames.

Connections are pooled per address and reused once a stream has ended with its last frame. A stream
the caller abandons early closes its connection (never pooled), which makes the worker abort the
request. Everything that means "this worker did not answer properly" is a WorkerFailedError, which
the frontend may answer by migrating the request.

A worker sends Heartbeat frames while a stream has nothing else to say (transport.server); they are
consumed here. With a `silence_timeout`, a stream that receives no frame at all, heartbeat or reply,
for that long is a hung worker (a stopped process, a blocked loop: its connection stays open, so
nothing else would ever end the wait): the connection is aborted and the stream raises
WorkerFailedError.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

from dynamo_lite.protocol.errors import TransportError, WorkerFailedError
from dynamo_lite.protocol.messages import Heartbeat, Reply, Request, WorkerStatsRequest
from dynamo_lite.transport.auth import PlaneAuth, PlaneAuthError
from dynamo_lite.transport.framing import decode_reply, encode_frame, read_frame, tune_stream_socket

logger = logging.getLogger(__name__)


def split_address(address: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise WorkerFailedError(f"bad worker address {address!r} (want host:port)")
    return host.strip("[]"), int(port)


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    def looks_alive(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class _StaleConnection(Exception):
    """A pooled connection was closed by the worker before it answered: retry on a fresh one."""


class _SilenceWatchdog:
    """Aborts a stream's connection once it waited `timeout` seconds for a frame and none came.

    Only waiting counts: while the caller holds a frame (a slow HTTP client pushing back), the worker's
    pace is not in question. One timer per stream, re-armed only when it fires: the hot path (every
    token frame) just stamps the time. Aborting the transport ends the pending read at once (EOF), and
    `tripped` tells why.
    """

    __slots__ = ("conn", "tripped", "_handle", "_last", "_loop", "_timeout", "_waiting")

    def __init__(self, timeout: float):
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._last = self._loop.time()
        self._waiting = True
        self._handle = self._loop.call_at(self._last + timeout, self._check)
        self.conn: _Connection | None = None  # the connection the stream reads now
        self.tripped = False

    def waiting(self) -> None:
        """The stream waits for the next frame from now on."""
        self._last = self._loop.time()
        self._waiting = True

    def handed_over(self) -> None:
        """The caller holds a frame: its time does not count until waiting() again."""
        self._waiting = False

    def cancel(self) -> None:
        self._handle.cancel()

    def _check(self, confirming: bool = False) -> None:
        now = self._loop.time()
        due = self._last + self._timeout
        if not self._waiting or now < due:
            self._handle = self._loop.call_at(due if self._waiting else now + self._timeout, self._check)
        elif not confirming:
            # Look once more after the callbacks already queued: if this loop itself was blocked, a frame
            # that arrived meanwhile is read by then, and the worker was not silent.
            self._handle = self._loop.call_soon(self._check, True)
        elif self.conn is not None:
            self.tripped = True
            self.conn.writer.transport.abort()


class RequestClient:
    def __init__(self, *, connect_timeout: float = 5.0, max_idle_per_address: int = 32,
                 auth: PlaneAuth | None = None):
        self._connect_timeout = connect_timeout
        self._auth = auth  # the plane-secret handshake on each new connection (transport/auth.py)
        self._max_idle = max_idle_per_address
        self._idle: dict[str, list[_Connection]] = {}
        self._closed = False

    async def stream(self, address: str, request: Request, *,
                     silence_timeout: float = 0.0) -> AsyncIterator[Reply]:
        """Send `request` to the worker at `address` and yield its reply frames up to the last one.

        ErrorFrame replies are yielded like any other frame; heartbeats are not. Raises WorkerFailedError
        on connect failure, on EOF before a last frame, on a frame that cannot be decoded, and when
        `silence_timeout` > 0 and no frame arrived for that many seconds.
        """
        frame = encode_frame(request)
        conn = self._take_idle(address)
        finished = False
        watchdog = _SilenceWatchdog(silence_timeout) if silence_timeout > 0 else None
        try:
            if conn is not None:
                try:
                    if watchdog is not None:
                        watchdog.conn = conn
                    payload = await self._send(conn, frame, address, may_be_stale=True)
                except _StaleConnection as e:
                    conn.close()
                    conn = None
                    if watchdog is not None and watchdog.tripped:  # it was not stale: we hung up on it
                        raise WorkerFailedError(f"worker {address} went silent") from e
                    logger.debug("pooled connection to %s was closed by the worker: reconnecting", address)
            if conn is None:
                conn = await self._connect(address)
                if watchdog is not None:
                    watchdog.conn = conn
                payload = await self._send(conn, frame, address, may_be_stale=False)
            while True:
                if watchdog is not None:
                    watchdog.handed_over()
                try:
                    reply = decode_reply(payload)
                except TransportError as e:
                    raise WorkerFailedError(f"worker {address}: {e.message}") from e
                if reply.last:
                    finished = True  # set before yielding: a caller that stops now still read it all
                    yield reply
                    return
                if type(reply) is not Heartbeat:
                    yield reply
                if watchdog is not None:
                    watchdog.waiting()
                payload = await self._read(conn, address)
        except WorkerFailedError as e:
            if watchdog is not None and watchdog.tripped:
                raise WorkerFailedError(f"worker {address} sent nothing, not even a heartbeat, for "
                                        f"{silence_timeout:g} s: it is hung (stopped, or its event loop "
                                        "blocked)") from e
            raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if conn is not None:
                if finished:
                    self._release(address, conn)
                else:
                    conn.close()

    async def call(self, address: str, request: Request, timeout: float) -> Reply:
        """Send a request that is answered with one frame (tokenizer files, stats) and return it.

        Raises WorkerFailedError also when no last frame arrives within `timeout` seconds.
        """
        try:
            async with asyncio.timeout(timeout):
                async with aclosing(self.stream(address, request)) as replies:
                    async for reply in replies:
                        if reply.last:
                            return reply
        except TimeoutError as e:
            raise WorkerFailedError(f"worker {address} gave no reply within {timeout} s") from e
        raise AssertionError("stream() ends with a last frame or raises")

    async def answers(self, address: str, timeout: float) -> bool:
        """Whether the worker at `address` answers a stats request within `timeout` seconds (a probe:
        is a worker that failed, or hung, serving again?)."""
        try:
            await self.call(address, WorkerStatsRequest(), timeout)
        except WorkerFailedError:
            return False
        return True

    async def close(self) -> None:
        """Close idle connections; streams running now close theirs when they end. Safe twice."""
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    # ------------------------------------------------------------------ internals

    def _take_idle(self, address: str) -> _Connection | None:
        conns = self._idle.get(address)
        while conns:
            conn = conns.pop()
            if conn.looks_alive():
                return conn
            conn.close()
        return None

    def _release(self, address: str, conn: _Connection) -> None:
        conns = self._idle.setdefault(address, [])
        if self._closed or len(conns) >= self._max_idle or not conn.looks_alive():
            conn.close()
        else:
            conns.append(conn)

    async def _connect(self, address: str) -> _Connection:
        host, port = split_address(address)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                    timeout=self._connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise WorkerFailedError(f"cannot connect to worker {address}: {e!r}") from e
        tune_stream_socket(writer)
        if self._auth is not None:
            await self._authenticate(reader, writer, address)
        return _Connection(reader, writer)

    async def _authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            address: str) -> None:
        try:
            await self._auth.dial(reader, writer, f"worker {address}")
        except (PlaneAuthError, ConnectionError, OSError) as e:
            writer.close()
            message = e.message if isinstance(e, PlaneAuthError) else f"worker {address}: {e!r} in handshake"
            logger.error("request plane: %s", message)  # a deployment error: say it where operators look
            raise WorkerFailedError(message) from e

    async def _send(self, conn: _Connection, frame: bytearray, address: str, *, may_be_stale: bool) -> bytes:
        """Write the request and read the first reply frame."""
        try:
            conn.writer.write(frame)
            payload = await read_frame(conn.reader)
        except (ConnectionError, OSError, TransportError) as e:
            if may_be_stale and isinstance(e, ConnectionError):
                raise _StaleConnection() from e
            raise WorkerFailedError(f"worker {address}: connection broke before a reply: {e}") from e
        if payload is None:
            if may_be_stale:
                raise _StaleConnection()
            raise WorkerFailedError(f"worker {address} closed the connection before replying")
        return payload

    async def _read(self, conn: _Connection, address: str) -> bytes:
        try:
            payload = await read_frame(conn.reader)
        except (ConnectionError, OSError, TransportError) as e:
            raise WorkerFailedError(f"worker {address}: connection broke mid-stream: {e}") from e
        if payload is None:
            raise WorkerFailedError(f"worker {address} closed the stream before its last frame")
        return payload
