"""Request plane over loopback TCP: RequestServer + RequestClient."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from dynamo_lite.protocol.errors import InvalidRequestError, WorkerFailedError
from dynamo_lite.protocol.messages import (ErrorFrame, GenerateFrame, GenerateRequest, Request,
                                           SamplingOptions, WorkerStats, WorkerStatsRequest)
from dynamo_lite.transport.client import RequestClient
from dynamo_lite.transport.server import RequestServer

WAIT = 5.0  # bound on every wait in these tests


def generate(request_id: str, max_tokens: int = 4) -> GenerateRequest:
    return GenerateRequest(request_id=request_id, token_ids=[1, 2, 3],
                           sampling=SamplingOptions(max_tokens=max_tokens))


async def counting_handler(request: Request) -> AsyncIterator:
    """Streams tokens 0..max_tokens-1, one per frame; stats requests get one frame."""
    if isinstance(request, WorkerStatsRequest):
        yield WorkerStats(active_requests=0, completed_requests=7, aborted_requests=0, generated_tokens=0)
        return
    n = request.sampling.max_tokens
    for i in range(n):
        yield GenerateFrame(token_ids=[i], prompt_tokens=len(request.token_ids) if i == 0 else None,
                            finish_reason="length" if i == n - 1 else None, last=i == n - 1)


@contextlib.asynccontextmanager
async def serving(handler) -> AsyncIterator[tuple[RequestServer, str, RequestClient]]:
    server = RequestServer(handler, "127.0.0.1", 0)
    client = RequestClient(connect_timeout=2.0)
    try:
        port = await server.start()
        yield server, f"127.0.0.1:{port}", client
    finally:
        await client.close()
        await server.close()


async def collect(client: RequestClient, address: str, request: Request) -> list:
    return [frame async for frame in client.stream(address, request)]


async def wait_until(predicate, timeout: float = WAIT) -> bool:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.01)
    try:
        await asyncio.wait_for(poll(), timeout)
        return True
    except TimeoutError:
        return False


async def test_stream_delivers_every_frame_in_order():
    async with serving(counting_handler) as (server, address, client):
        frames = await collect(client, address, generate("a", max_tokens=5))
    assert [f.token_ids for f in frames] == [[0], [1], [2], [3], [4]]
    assert frames[0].prompt_tokens == 3
    assert frames[-1].last and frames[-1].finish_reason == "length"
    assert not any(f.last for f in frames[:-1])


async def test_connection_is_reused_after_last_frame():
    async with serving(counting_handler) as (server, address, client):
        for i in range(5):
            frames = await collect(client, address, generate(f"r{i}", max_tokens=2))
            assert [f.token_ids for f in frames] == [[0], [1]]
        assert server.open_connections == 1
        reply = await client.call(address, WorkerStatsRequest(), timeout=WAIT)
        assert isinstance(reply, WorkerStats) and reply.completed_requests == 7
        assert server.open_connections == 1


async def test_concurrent_streams_use_separate_connections():
    async with serving(counting_handler) as (server, address, client):
        results = await asyncio.gather(*(collect(client, address, generate(f"c{i}", max_tokens=3))
                                         for i in range(8)))
    assert all([f.token_ids for f in frames] == [[0], [1], [2]] for frames in results)


def blocking_handler(started: asyncio.Event, cancelled: asyncio.Event):
    async def handler(request: Request) -> AsyncIterator:
        try:
            yield GenerateFrame(token_ids=[42])
            started.set()
            await asyncio.Event().wait()  # an engine that never finishes on its own
            yield GenerateFrame(last=True)
        except (asyncio.CancelledError, GeneratorExit):
            cancelled.set()
            raise
    return handler


async def test_consumer_leaving_early_cancels_the_handler():
    started, cancelled = asyncio.Event(), asyncio.Event()
    async with serving(blocking_handler(started, cancelled)) as (server, address, client):
        async with aclosing(client.stream(address, generate("early"))) as frames:
            async for frame in frames:
                assert frame.token_ids == [42]
                break
        await asyncio.wait_for(cancelled.wait(), WAIT)
        assert await wait_until(lambda: server.active_streams == 0)
        assert await wait_until(lambda: server.open_connections == 0)


async def test_cancelling_the_consumer_task_cancels_the_handler():
    started, cancelled = asyncio.Event(), asyncio.Event()
    async with serving(blocking_handler(started, cancelled)) as (server, address, client):
        consumer = asyncio.create_task(collect(client, address, generate("cancel-me")))
        await asyncio.wait_for(started.wait(), WAIT)
        assert server.active_streams == 1
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        await asyncio.wait_for(cancelled.wait(), WAIT)


async def test_handler_errors_become_error_frames_and_the_connection_survives():
    async def handler(request: Request) -> AsyncIterator:
        if request.request_id == "bad":
            raise InvalidRequestError("prompt too long")
        if request.request_id == "crash":
            yield GenerateFrame(token_ids=[1])
            raise ValueError("boom")
        if request.request_id == "no-last":
            yield GenerateFrame(token_ids=[1])
            return
        yield GenerateFrame(token_ids=[9], last=True)

    async with serving(handler) as (server, address, client):
        bad = await collect(client, address, generate("bad"))
        assert bad == [ErrorFrame(message="prompt too long", status=400)]
        crash = await collect(client, address, generate("crash"))
        assert crash[0].token_ids == [1]
        assert isinstance(crash[-1], ErrorFrame) and crash[-1].status == 500 and "boom" in crash[-1].message
        no_last = await collect(client, address, generate("no-last"))
        assert isinstance(no_last[-1], ErrorFrame) and "without a last frame" in no_last[-1].message
        ok = await collect(client, address, generate("ok"))
        assert [f.token_ids for f in ok] == [[9]]
        assert server.open_connections == 1


async def test_connect_failure_is_a_worker_failure():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = RequestClient(connect_timeout=2.0)
    try:
        with pytest.raises(WorkerFailedError, match="cannot connect"):
            await collect(client, f"127.0.0.1:{port}", generate("x"))
    finally:
        await client.close()


async def test_restarted_worker_on_same_address_is_reached_through_a_fresh_connection():
    first = RequestServer(counting_handler, "127.0.0.1", 0)
    client = RequestClient(connect_timeout=2.0)
    second = None
    try:
        port = await first.start()
        address = f"127.0.0.1:{port}"
        assert len(await collect(client, address, generate("before", 2))) == 2  # pools a connection
        await first.close()
        second = RequestServer(counting_handler, "127.0.0.1", port)
        await second.start()
        frames = await collect(client, address, generate("after", 3))
        assert [f.token_ids for f in frames] == [[0], [1], [2]]
    finally:
        await client.close()
        await first.close()
        if second is not None:
            await second.close()


async def test_call_without_reply_in_time_is_a_worker_failure():
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def silent(request: Request) -> AsyncIterator:
        try:
            started.set()
            await asyncio.Event().wait()
            yield WorkerStats(active_requests=0, completed_requests=0, aborted_requests=0, generated_tokens=0)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with serving(silent) as (server, address, client):
        with pytest.raises(WorkerFailedError, match="no reply"):
            await client.call(address, WorkerStatsRequest(), timeout=0.3)
        await asyncio.wait_for(cancelled.wait(), WAIT)


SERVER_SCRIPT = textwrap.dedent("""
    import asyncio
    from dynamo_lite.protocol.messages import GenerateFrame
    from dynamo_lite.transport.server import RequestServer

    async def handler(request):
        yield GenerateFrame(token_ids=[5])
        await asyncio.Event().wait()
        yield GenerateFrame(last=True)

    async def main():
        port = await RequestServer(handler, "127.0.0.1", 0).start()
        print(port, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
""")


async def test_worker_process_killed_mid_stream_is_a_worker_failure():
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", SERVER_SCRIPT,
                                                stdout=asyncio.subprocess.PIPE)
    client = RequestClient(connect_timeout=2.0)
    try:
        port = int(await asyncio.wait_for(proc.stdout.readline(), timeout=20))
        received = []
        with pytest.raises(WorkerFailedError, match="before its last frame"):
            async with aclosing(client.stream(f"127.0.0.1:{port}", generate("doomed"))) as frames:
                async for frame in frames:
                    received.append(frame)
                    proc.kill()
        assert [f.token_ids for f in received] == [[5]]
    finally:
        await client.close()
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), timeout=WAIT)


async def test_pooled_connection_closed_by_the_worker_is_retried_once_on_a_fresh_one(monkeypatch):
    async with serving(counting_handler) as (server, address, client):
        assert len(await collect(client, address, generate("pool", 2))) == 2
        # The worker drops the idle connection; make the pool's liveness check miss it, as when the
        # FIN arrives just after the check: the request is then written to a dead connection.
        server.stop_accepting()
        assert await wait_until(lambda: server.open_connections == 0)
        monkeypatch.setattr("dynamo_lite.transport.client._Connection.looks_alive", lambda self: True)
        # The fresh connection is refused too (the worker stopped accepting): a worker failure.
        with pytest.raises(WorkerFailedError, match="cannot connect"):
            await collect(client, address, generate("stale", 2))

    async with serving(counting_handler) as (server, address, client):
        assert len(await collect(client, address, generate("pool", 2))) == 2
        idle = client._idle[address][0]
        idle.writer.transport.abort()  # as if the worker had reset it; the pool still holds it
        frames = await collect(client, address, generate("retried", 3))
        assert [f.token_ids for f in frames] == [[0], [1], [2]]


async def test_request_plane_sockets_probe_a_silent_peer():
    """Both ends turn on TCP keepalive, so a peer host that vanishes without a FIN is noticed."""
    from dynamo_lite.transport.framing import KEEPALIVE_IDLE_S, tune_stream_socket

    accepted: list[asyncio.StreamWriter] = []

    async def on_connect(reader, writer):
        tune_stream_socket(writer)
        accepted.append(writer)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        tune_stream_socket(writer)
        for _ in range(100):
            if accepted:
                break
            await asyncio.sleep(0.01)
        for end in (writer, accepted[0]):
            sock = end.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            if sys.platform == "linux":
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE_S
            end.close()
    finally:
        server.close()
        await server.wait_closed()
