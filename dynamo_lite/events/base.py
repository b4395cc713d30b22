"""The EventBus interface: subject-based publish/subscribe plus request-reply (NATS's model).

Invariants:
- Messages from one publisher on one subject arrive in publish order (at most once; a subscriber
  that needs completeness checks sequence numbers in the payload and resyncs).
- A subscription's iterator ends only when it is closed or the bus is closed; a lost connection is
  retried inside the implementation.
- `request` raises TimeoutError if no reply arrives within timeout.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

logger = logging.getLogger(__name__)

Handler = Callable[[bytes], Awaitable[bytes]]


class Subscription(abc.ABC):
    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[bytes]: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Unsubscribe. Safe to call twice."""


class QueuedSubscription(Subscription):
    """A subscription its bus feeds with deliver(): payloads wait in a queue for the iterator. With
    max_pending, a consumer that falls behind loses what comes beyond it (as nats-py drops for a slow
    consumer) rather than growing the queue without bound; the payloads' sequence numbers show the gap."""

    def __init__(self, subject: str, max_pending: int | None = None):
        self.subject = subject
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._max_pending = max_pending
        self._dropping = False
        self._closed = False

    def deliver(self, data: bytes) -> None:
        if self._closed:
            return
        if self._max_pending is not None and self._queue.qsize() >= self._max_pending:
            if not self._dropping:
                logger.warning("subscription to %s is not consumed fast enough: dropping messages", self.subject)
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
        await self._release()

    async def _release(self) -> None:
        """What the bus undoes for this subscription once it is closed (once)."""


class ServedSubscription(Subscription):
    """A responder registered with serve(). Iterating yields nothing and ends when it is closed."""

    def __init__(self, subject: str, handler: Handler):
        self.subject = subject
        self.handler = handler
        self._closed = asyncio.Event()

    async def _wait_closed(self) -> AsyncIterator[bytes]:
        await self._closed.wait()
        return
        yield  # an async generator that never yields

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._wait_closed()

    async def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        await self._release()

    async def _release(self) -> None:
        """What the bus undoes for this responder once it is closed (once)."""


class EventBus(abc.ABC):
    @abc.abstractmethod
    async def publish(self, subject: str, data: bytes) -> None: ...

    @abc.abstractmethod
    async def subscribe(self, subject: str) -> Subscription: ...

    @abc.abstractmethod
    async def request(self, subject: str, data: bytes, timeout: float) -> bytes: ...

    @abc.abstractmethod
    async def serve(self, subject: str, handler: Handler) -> Subscription:
        """Answer requests on subject with handler's result."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush and close. Safe to call twice."""
