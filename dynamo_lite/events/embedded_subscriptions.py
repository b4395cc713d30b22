"""What EmbeddedEventBus.subscribe() and serve() return (events/embedded.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from dynamo_lite.events.base import Subscription

if TYPE_CHECKING:
    from dynamo_lite.events.embedded import EmbeddedEventBus

logger = logging.getLogger(__name__)

Handler = Callable[[bytes], Awaitable[bytes]]


class EmbeddedSubscription(Subscription):
    def __init__(self, bus: EmbeddedEventBus, subject: str, max_pending: int):
        self.subject = subject
        self._bus = bus
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._max_pending = max_pending
        self._dropping = False
        self._closed = False

    def deliver(self, data: bytes) -> None:
        if self._closed:
            return
        if self._queue.qsize() >= self._max_pending:  # as nats-py does for a slow consumer
            if not self._dropping:
                logger.warning("subscription to %s is not consumed fast enough: dropping messages",
                               self.subject)
            self._dropping = True
            return
        self._dropping = False
        self._queue.put_nowait(data)

    async def _payloads(self) -> AsyncIterator[bytes]:
        while (data := await self._queue.get()) is not None:
            yield data

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._payloads()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(None)
        self._bus._unsubscribe(self)


class EmbeddedServedSubscription(Subscription):
    """A responder registered with serve(). Iterating yields nothing and ends when it is closed."""

    def __init__(self, bus: EmbeddedEventBus, subject: str, handler: Handler):
        self.subject = subject
        self.handler = handler
        self._bus = bus
        self._closed = asyncio.Event()

    async def _wait_closed(self) -> AsyncIterator[bytes]:
        await self._closed.wait()
        return
        yield  # an async generator that never yields

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._wait_closed()

    async def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._bus._unserve(self)
