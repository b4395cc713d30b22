"""frontend/stream_merge.merge: several streams read as one."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from dynamo_lite.frontend.stream_merge import merge


class Source:
    def __init__(self, items, delay: float, error: Exception | None = None):
        self.items, self.delay, self.error = items, delay, error
        self.closed = False

    async def stream(self):
        try:
            for item in self.items:
                await asyncio.sleep(self.delay)
                yield item
            if self.error is not None:
                raise self.error
        finally:
            self.closed = True


async def test_items_come_as_they_arrive_until_every_stream_ends():
    slow, fast = Source(["s1", "s2"], 0.03), Source(["f1", "f2", "f3"], 0.005)
    items = [item async for item in merge([slow.stream(), fast.stream()])]
    assert items == ["f1", "f2", "f3", "s1", "s2"]
    assert slow.closed and fast.closed


async def test_an_error_ends_the_merge_and_closes_the_other_streams():
    failing, endless = Source(["a"], 0.01, RuntimeError("worker gone")), Source(list(range(1000)), 0.01)
    seen = []
    with pytest.raises(RuntimeError, match="worker gone"):
        async for item in merge([failing.stream(), endless.stream()]):
            seen.append(item)
    assert "a" in seen and len(seen) < 10
    assert endless.closed


async def test_closing_the_merge_closes_every_stream():
    first, second = Source(list(range(1000)), 0.01), Source(list(range(1000)), 0.01)
    async with contextlib.aclosing(merge([first.stream(), second.stream()])) as merged:
        async for item in merged:
            if item == 2:
                break
    assert first.closed and second.closed
