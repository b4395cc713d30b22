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
from collections.abc import AsyncIterator, Awaitable, Callable


class Subscription(abc.ABC):
    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[bytes]: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Unsubscribe. Safe to call twice."""


class EventBus(abc.ABC):
    @abc.abstractmethod
    async def publish(self, subject: str, data: bytes) -> None: ...

    @abc.abstractmethod
    async def subscribe(self, subject: str) -> Subscription: ...

    @abc.abstractmethod
    async def request(self, subject: str, data: bytes, timeout: float) -> bytes: ...

    @abc.abstractmethod
    async def serve(self, subject: str, handler: Callable[[bytes], Awaitable[bytes]]) -> Subscription:
        """Answer requests on subject with handler's result."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush and close. Safe to call twice."""
