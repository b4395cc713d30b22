"""Hung workers on the request plane: heartbeats keep a quiet stream alive, silence fails it.

A worker's RequestServer sends a Heartbeat while a stream has nothing to say; a RequestClient with a
silence_timeout fails a stream that hears nothing at all for that long (a stopped process keeps its
connection open, so nothing else would end the wait). Through the frontend, the hung attempt migrates
and the worker stays excluded until it answers a probe.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from dynamo_lite.protocol.errors import WorkerFailedError
from dynamo_lite.protocol.messages import GenerateFrame, GenerateRequest, Request, SamplingOptions
from dynamo_lite.transport.client import RequestClient
from dynamo_lite.transport.server import RequestServer
from tests.integration.test_frontend_app import (PreferRouter, assert_migrates_after_4_tokens, model_dir,
                                                 running_stack, scripted_frames)

__all__ = ["model_dir"]  # a fixture, used by name below

WAIT = 10.0


def generate(request_id: str, max_tokens: int = 3) -> GenerateRequest:
    return GenerateRequest(request_id=request_id, token_ids=[1, 2, 3],
                           sampling=SamplingOptions(max_tokens=max_tokens))


def quiet_then_counting(delay: float):
    """Says nothing for `delay` seconds (a queued or prefilling request), then streams max_tokens tokens."""

    async def handler(request: Request) -> AsyncIterator:
        await asyncio.sleep(delay)
        n = request.sampling.max_tokens
        for i in range(n):
            yield GenerateFrame(token_ids=[i], last=i == n - 1)

    return handler


async def stream_all(client: RequestClient, address: str, request: GenerateRequest, *, silence: float,
                     pause: float = 0.0) -> list[GenerateFrame]:
    frames = []
    async with aclosing(client.stream(address, request, silence_timeout=silence)) as replies:
        async for frame in replies:
            frames.append(frame)
            await asyncio.sleep(pause)
    return frames


async def test_heartbeats_carry_a_quiet_stream_past_the_silence_timeout():
    server = RequestServer(quiet_then_counting(1.0), "127.0.0.1", 0, heartbeat_interval=0.1)
    client = RequestClient(connect_timeout=2.0)
    try:
        address = f"127.0.0.1:{await server.start()}"
        frames = await stream_all(client, address, generate("quiet"), silence=0.5)
        assert [f.token_ids for f in frames] == [[0], [1], [2]]  # no heartbeat reaches the caller
        assert all(isinstance(f, GenerateFrame) for f in frames)
        frames = await stream_all(client, address, generate("pooled"), silence=0.5)  # the same connection
        assert [f.token_ids for f in frames] == [[0], [1], [2]]
    finally:
        await client.close()
        await server.close()


async def test_a_worker_without_heartbeats_is_hung_after_the_silence_timeout():
    cancelled = asyncio.Event()

    async def stuck(request: Request) -> AsyncIterator:
        try:
            yield GenerateFrame(token_ids=[7])
            await asyncio.Event().wait()
            yield GenerateFrame(last=True)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    server = RequestServer(stuck, "127.0.0.1", 0, heartbeat_interval=0)  # as a blocked event loop
    client = RequestClient(connect_timeout=2.0)
    try:
        address = f"127.0.0.1:{await server.start()}"
        started = time.monotonic()
        with pytest.raises(WorkerFailedError, match="not even a heartbeat, for 0.4 s"):
            await stream_all(client, address, generate("stuck"), silence=0.4)
        assert 0.4 <= time.monotonic() - started < 3.0
        await asyncio.wait_for(cancelled.wait(), WAIT)  # the connection was dropped: the worker aborts it
    finally:
        await client.close()
        await server.close()


async def test_a_slow_reader_is_not_a_hung_worker():
    server = RequestServer(quiet_then_counting(0.0), "127.0.0.1", 0, heartbeat_interval=0)
    client = RequestClient(connect_timeout=2.0)
    try:
        address = f"127.0.0.1:{await server.start()}"
        # The caller holds each frame longer than the timeout (an HTTP client pushing back): only the
        # time spent waiting for the worker counts.
        frames = await stream_all(client, address, generate("slow-reader"), silence=0.2, pause=0.4)
        assert [f.token_ids for f in frames] == [[0], [1], [2]]
    finally:
        await client.close()
        await server.close()


STOPPABLE_WORKER = textwrap.dedent("""
    import asyncio
    from dynamo_lite.protocol.messages import GenerateFrame
    from dynamo_lite.transport.server import RequestServer

    async def handler(request):
        yield GenerateFrame(token_ids=[5])
        await asyncio.Event().wait()  # a long prefill of the next tokens: only heartbeats go out
        yield GenerateFrame(last=True)

    async def main():
        port = await RequestServer(handler, "127.0.0.1", 0).start()  # the default heartbeat interval
        print(port, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
""")


async def test_a_stopped_worker_process_is_detected_while_a_quiet_one_is_not():
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", STOPPABLE_WORKER,
                                                stdout=asyncio.subprocess.PIPE)
    client = RequestClient(connect_timeout=2.0)
    silence = 2.5  # over two of the worker's 1 s heartbeat intervals
    try:
        port = int(await asyncio.wait_for(proc.stdout.readline(), timeout=20))
        loop = asyncio.get_running_loop()
        stopped_at: list[float] = []

        def stop() -> None:
            os.kill(proc.pid, signal.SIGSTOP)
            stopped_at.append(time.monotonic())

        started = time.monotonic()
        with pytest.raises(WorkerFailedError, match="hung"):
            async with aclosing(client.stream(f"127.0.0.1:{port}", generate("doomed"),
                                              silence_timeout=silence)) as frames:
                async for _ in frames:
                    loop.call_later(3.0, stop)  # quiet but alive for 3 s: longer than the timeout
        failed_at = time.monotonic()
        assert stopped_at and stopped_at[0] - started >= 3.0
        # Silence counts from the last heartbeat, up to 2 intervals before the stop.
        assert 0 < failed_at - stopped_at[0] < silence + 2.0
    finally:
        await client.close()
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        await asyncio.wait_for(proc.wait(), timeout=WAIT)


def hanging_worker_handler(tokens_before_hang: int):
    """Streams the reply's first tokens, then hangs: no tokens, no heartbeats (a stopped process)."""

    async def handler(request: Request) -> AsyncIterator:
        frames = scripted_frames(request)
        for _ in range(tokens_before_hang):
            yield await anext(frames)
        await asyncio.Event().wait()

    return handler


@pytest.mark.parametrize("stream", [False, True])
async def test_a_hung_worker_migrates_its_stream_and_stays_excluded(model_dir, stream):
    router = PreferRouter()
    async with running_stack(router, heartbeat_timeout=0.5) as stack:
        hung = RequestServer(hanging_worker_handler(4), "127.0.0.1", 0, heartbeat_interval=0)
        stack.servers.append(hung)
        # The hung worker's 4 tokens, then the rest from the other one, as after a worker's death.
        await assert_migrates_after_4_tokens(stack, router, model_dir, f"127.0.0.1:{await hung.start()}", stream)
        assert router.preferred not in [r.instance_id for r in stack.watcher.instances()]
