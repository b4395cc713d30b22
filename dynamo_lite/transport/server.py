"""The worker side of the request plane: a TCP server that runs one request per connection at a time.

Connections are persistent: after a stream's last frame the server waits for the next request on
the same connection. While a stream runs, the connection's reader keeps waiting for the next frame;
if it sees EOF or a reset instead, the client has gone away and the handler's stream is cancelled
at once (that is how a client aborts a request on the engine).

While a stream runs but has nothing to send (the request waits in the engine's queue or prefills),
the server sends a Heartbeat frame about every HEARTBEAT_INTERVAL_S seconds, from one ticker task for
all connections: a client that hears nothing at all for a few seconds knows the worker is hung (a
stopped process, a blocked event loop) even though its connection is still open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from dynamo_lite.protocol.errors import DynamoLiteError, TransportError
from dynamo_lite.protocol.messages import ErrorFrame, Heartbeat, Reply, Request
from dynamo_lite.transport.auth import SECRET_OPTIONS, PlaneAuth
from dynamo_lite.transport.framing import decode_request, encode_frame, read_frame, tune_stream_socket

logger = logging.getLogger(__name__)

Handler = Callable[[Request], AsyncIterator[Reply]]

HEARTBEAT_INTERVAL_S = 1.0
_HEARTBEAT_FRAME = bytes(encode_frame(Heartbeat()))


# What a peer without the plane secret (or a raw TCP client) gets instead of an answer to its request.
_REFUSAL = encode_frame(ErrorFrame(message="request plane: this worker serves only peers that prove the "
                                   f"plane secret ({SECRET_OPTIONS}, the same on every component)",
                                   status=503))


class _Connection:
    """One client connection and the stream it is running, if any."""

    __slots__ = ("writer", "stream_task", "streaming", "frames_sent", "frames_at_tick")

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.stream_task: asyncio.Task | None = None
        self.streaming = False  # a stream runs and has not written its last frame yet
        self.frames_sent = 0  # by the stream (the heartbeat ticker compares it between its ticks)
        self.frames_at_tick = 0


class RequestServer:
    """Serve `handler` on host:port. `handler(request)` returns an async iterator of Reply frames,
    the final one with last=True. With `auth`, a connection is served only once its peer has proven the
    plane secret (transport/auth.py)."""

    def __init__(self, handler: Handler, host: str, port: int = 0, *, auth: PlaneAuth | None = None,
                 heartbeat_interval: float = HEARTBEAT_INTERVAL_S):
        self._handler = handler
        self._auth = auth
        self._host = host
        self._port = port
        self._heartbeat_interval = heartbeat_interval  # 0 = no heartbeats
        self._heartbeats: asyncio.Task | None = None
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task, _Connection] = {}
        self._accepting = True
        self._closed = False

    async def start(self) -> int:
        """Listen and return the bound port."""
        self._server = await asyncio.start_server(self._serve_connection, self._host, self._port)
        self._port = self._server.sockets[0].getsockname()[1]
        if self._heartbeat_interval > 0:
            self._heartbeats = asyncio.ensure_future(self._send_heartbeats())
        logger.info("request plane listening on %s:%s", self._host, self._port)
        return self._port

    @property
    def port(self) -> int:
        return self._port

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    @property
    def active_streams(self) -> int:
        return sum(1 for c in self._connections.values() if c.stream_task is not None)

    def stream_tasks(self) -> set[asyncio.Task]:
        """The streams running now (for a drain with runtime.lifecycle.drain)."""
        return {c.stream_task for c in self._connections.values() if c.stream_task is not None}

    def stop_accepting(self) -> None:
        """Refuse new connections and new requests; running streams go on (drain).

        Idle connections are closed now, so a client's pool finds them dead instead of sending a
        request that would never be served.
        """
        self._accepting = False
        if self._server is not None:
            self._server.close()
        for conn in self._connections.values():
            if conn.stream_task is None:
                conn.writer.close()

    async def close(self) -> None:
        """Stop accepting, cancel running streams, close every connection. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.stop_accepting()
        if self._heartbeats is not None:
            self._heartbeats.cancel()
        # Cancel the streams and close the sockets: each connection loop then sees its stream end
        # or its reader hit EOF and returns on its own. (Cancelling the connection tasks instead
        # makes asyncio's stream callback log the CancelledError as an error on Python 3.11.)
        for conn in self._connections.values():
            if conn.stream_task is not None:
                conn.stream_task.cancel()
            conn.writer.close()
        tasks = list(self._connections)
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=5.0)
            for task in stuck:
                task.cancel()
            if stuck:
                await asyncio.wait(stuck, timeout=1.0)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=5.0)
        logger.info("request plane on port %s closed", self._port)

    async def _send_heartbeats(self) -> None:
        """Every interval, a Heartbeat on each stream that sent nothing since the previous tick (so a
        stream is never silent for more than two intervals while this process runs)."""
        while True:
            await asyncio.sleep(self._heartbeat_interval)
            for conn in self._connections.values():
                quiet = conn.frames_sent == conn.frames_at_tick
                if conn.streaming and quiet and not conn.writer.is_closing():
                    # One write of a whole frame: it never lands inside another frame of the stream.
                    conn.writer.write(_HEARTBEAT_FRAME)
                conn.frames_at_tick = conn.frames_sent

    # ------------------------------------------------------------------ connection handling

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if not self._accepting:
            writer.close()
            return
        tune_stream_socket(writer)
        conn = _Connection(writer)
        self._connections[task] = conn  # before the handshake: close() hangs up on it too
        if self._auth is not None and not await self._auth.accept(reader, writer, refusal=_REFUSAL):
            self._connections.pop(task, None)
            writer.close()
            return
        # One reader task at a time: it waits for the next request while idle, and watches for EOF
        # while a stream runs. Cancelling it before it has a whole frame would lose stream bytes,
        # so it is only ever cancelled when the connection is dropped.
        next_frame = asyncio.ensure_future(read_frame(reader))
        try:
            while True:
                payload = await next_frame
                if payload is None or not self._accepting:
                    break
                next_frame = asyncio.ensure_future(read_frame(reader))
                try:
                    request = decode_request(payload)
                except TransportError as e:
                    writer.write(encode_frame(ErrorFrame(message=str(e), status=400)))
                    continue
                conn.stream_task = asyncio.ensure_future(self._run_stream(request, conn))
                try:
                    if not await self._watch_stream(conn.stream_task, next_frame):
                        break
                finally:
                    conn.stream_task = None
        except (TransportError, ConnectionError, OSError) as e:
            logger.debug("connection dropped: %s", e)
        except asyncio.CancelledError:
            if not self._closed:
                raise
        finally:
            if not next_frame.done():
                next_frame.cancel()
            elif not next_frame.cancelled():
                next_frame.exception()  # retrieved: the connection is gone either way
            self._connections.pop(task, None)
            writer.close()

    async def _watch_stream(self, stream_task: asyncio.Task, next_frame: asyncio.Future) -> bool:
        """Wait for the stream to end. Returns False if the client went away (stream cancelled)."""
        try:
            await asyncio.wait((stream_task, next_frame), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            stream_task.cancel()
            raise
        if stream_task.done():
            return self._stream_ended_cleanly(stream_task)
        if next_frame.exception() is None and next_frame.result() is not None:
            # A request before the last frame went out: the client broke the protocol, or it read
            # the last frame and answered before this loop saw the stream end. Either way, let the
            # stream finish and serve the frame next.
            await asyncio.wait((stream_task,))
            return self._stream_ended_cleanly(stream_task)
        logger.debug("client closed the connection mid-stream: cancelling the request")
        stream_task.cancel()
        await asyncio.wait((stream_task,))
        return False

    @staticmethod
    def _stream_ended_cleanly(stream_task: asyncio.Task) -> bool:
        if stream_task.cancelled():
            return False
        error = stream_task.exception()
        if error is not None:
            logger.debug("stream ended by a connection error: %s", error)
            return False
        return True

    async def _run_stream(self, request: Request, conn: _Connection) -> None:
        """Send every frame of handler(request); turn failures into a last ErrorFrame."""
        writer = conn.writer
        stream: AsyncIterator[Reply] | None = None
        sent_last = False
        error: ErrorFrame | None = None
        conn.streaming = True
        try:
            stream = self._handler(request)
            async for reply in stream:
                writer.write(encode_frame(reply))
                conn.frames_sent += 1
                if reply.last:
                    sent_last = True
                    conn.streaming = False  # no heartbeat after the last frame
                    break
                await writer.drain()  # back-pressure, and raises if the connection is gone
        except DynamoLiteError as e:
            error = ErrorFrame(message=e.message, status=e.status)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as e:
            logger.exception("request handler failed")
            error = ErrorFrame(message=f"worker error: {type(e).__name__}: {e}", status=500)
        finally:
            if not sent_last:
                conn.streaming = False
            aclose = getattr(stream, "aclose", None)  # None too if the handler raised at once
            if aclose is not None:
                await aclose()
        if not sent_last:
            if error is None:
                logger.error("request handler ended without a last frame")
                error = ErrorFrame(message="worker stream ended without a last frame", status=500)
            writer.write(encode_frame(error))
        await writer.drain()
