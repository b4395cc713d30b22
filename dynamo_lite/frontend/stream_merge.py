"""Several async streams read as one, items in the order they arrive."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")

_END = object()


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """The items of every stream as they come, until all have ended. The first stream to raise ends the
    merge with its error; that, or the consumer closing the merge, closes the streams still open (each
    is read by a task, which is cancelled)."""
    # One slot per stream: a stream runs at most one item ahead of its consumer.
    queue: asyncio.Queue[tuple[object, BaseException | None]] = asyncio.Queue(maxsize=len(streams))

    async def pump(stream: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    await queue.put((item, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((_END, e))
            return
        await queue.put((_END, None))

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        open_streams = len(tasks)
        while open_streams:
            item, error = await queue.get()
            if item is _END:
                if error is not None:
                    raise error
                open_streams -= 1
                continue
            yield item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
