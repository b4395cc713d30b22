"""What EmbeddedEventBus.subscribe() and serve() return (events/embedded.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dynamo_lite.events.base import Handler, QueuedSubscription, ServedSubscription

if TYPE_CHECKING:
    from dynamo_lite.events.embedded import EmbeddedEventBus


class EmbeddedSubscription(QueuedSubscription):
    def __init__(self, bus: EmbeddedEventBus, subject: str, max_pending: int):
        super().__init__(subject, max_pending)
        self._bus = bus

    async def _release(self) -> None:
        self._bus._unsubscribe(self)


class EmbeddedServedSubscription(ServedSubscription):
    def __init__(self, bus: EmbeddedEventBus, subject: str, handler: Handler):
        super().__init__(subject, handler)
        self._bus = bus

    async def _release(self) -> None:
        self._bus._unserve(self)
