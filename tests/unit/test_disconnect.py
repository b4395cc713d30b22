"""unless_disconnected: the work starts at once in the caller, and a client that leaves cancels it."""

from __future__ import annotations

import asyncio

import pytest

from dynamo_lite.frontend.disconnect import ClientDisconnected, unless_disconnected


class FakeRequest:
    """The ASGI side of a request whose body was read: receive() waits for the next message."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[dict] = asyncio.Queue()

    async def receive(self) -> dict:
        return await self.messages.get()

    def disconnect(self) -> None:
        self.messages.put_nowait({"type": "http.disconnect"})


async def test_work_runs_before_tasks_queued_ahead_of_it():
    # In a burst, a request's routing and send must not wait until every request queued before
    # it has been tokenized: the work runs up to its first real wait before the loop moves on.
    order = []

    async def queued_earlier() -> None:
        order.append("other request")

    async def work() -> int:
        order.append("dispatched")
        await asyncio.sleep(0)
        return 7

    other = asyncio.ensure_future(queued_earlier())
    assert await unless_disconnected(FakeRequest(), work()) == 7
    assert order == ["dispatched", "other request"]
    await other


async def test_client_leaving_cancels_the_work_and_raises_client_disconnected():
    request = FakeRequest()
    started, unwound = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        finally:
            unwound.set()

    async def caller() -> None:
        await unless_disconnected(request, work())

    task = asyncio.ensure_future(caller())
    await started.wait()
    request.disconnect()
    with pytest.raises(ClientDisconnected):
        await asyncio.wait_for(task, 5)
    assert unwound.is_set()
    assert task.cancelling() == 0  # the cancellation was absorbed, not left pending on the caller


async def test_a_disconnect_after_the_work_is_done_leaves_the_caller_alone():
    request = FakeRequest()

    async def caller() -> str:
        result = await unless_disconnected(request, asyncio.sleep(0, "answer"))
        request.disconnect()  # the client leaves while the answer is being sent
        await asyncio.sleep(0.05)  # the caller goes on (e.g. streaming the rest)
        return result

    assert await asyncio.wait_for(caller(), 5) == "answer"


async def test_cancellation_from_elsewhere_stays_a_cancellation():
    started = asyncio.Event()

    async def work() -> None:
        started.set()
        await asyncio.sleep(60)

    task = asyncio.ensure_future(unless_disconnected(FakeRequest(), work()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_errors_of_the_work_reach_the_caller():
    async def work() -> None:
        raise ValueError("bad prompt")

    with pytest.raises(ValueError, match="bad prompt"):
        await unless_disconnected(FakeRequest(), work())
