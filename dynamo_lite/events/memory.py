"""In-process EventBus with NATS core semantics, for unit tests.

Subjects match like NATS: tokens split on ".", "*" matches one token, ">" matches the rest.
Messages from one publisher on one subject arrive in publish order. `request` with no responder
fails at once with TimeoutError (NATS answers "no responders" the same way), and so does a
request whose responder raises (over NATS the requester would wait out its timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable

from dynamo_lite.events.base import EventBus, Handler, QueuedSubscription, ServedSubscription, Subscription
from dynamo_lite.protocol.errors import TransportError

logger = logging.getLogger(__name__)


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: "a.*.c" matches "a.b.c"; "a.>" matches "a.b" and "a.b.c"."""
    pattern_tokens = pattern.split(".")
    subject_tokens = subject.split(".")
    for i, token in enumerate(pattern_tokens):
        if token == ">":
            return len(subject_tokens) > i
        if i >= len(subject_tokens) or (token != "*" and token != subject_tokens[i]):
            return False
    return len(pattern_tokens) == len(subject_tokens)


class MemorySubscription(QueuedSubscription):
    def __init__(self, bus: MemoryEventBus, subject: str):
        super().__init__(subject)
        self._bus = bus

    async def _release(self) -> None:
        self._bus._subscriptions.discard(self)


class MemoryServedSubscription(ServedSubscription):
    def __init__(self, bus: MemoryEventBus, subject: str, handler: Handler):
        super().__init__(subject, handler)
        self._bus = bus

    async def _release(self) -> None:
        self._bus._servers.discard(self)


class MemoryEventBus(EventBus):
    def __init__(self) -> None:
        self._subscriptions: set[MemorySubscription] = set()
        self._servers: set[MemoryServedSubscription] = set()
        self._inflight: set[asyncio.Task] = set()
        self._closed = False

    async def publish(self, subject: str, data: bytes) -> None:
        if self._closed:
            logger.debug("publish on %s dropped: bus closed", subject)
            return
        for sub in list(self._subscriptions):
            if subject_matches(sub.subject, subject):
                sub.deliver(bytes(data))
        # A plain publish also reaches responders (as in NATS); their answer goes nowhere.
        for served in list(self._servers):
            if subject_matches(served.subject, subject):
                self._spawn(self._run_handler(served, data), subject)

    async def subscribe(self, subject: str) -> Subscription:
        self._check_open()
        sub = MemorySubscription(self, subject)
        self._subscriptions.add(sub)
        return sub

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        self._check_open()
        responders = [s for s in self._servers if subject_matches(s.subject, subject)]
        for sub in list(self._subscriptions):
            if subject_matches(sub.subject, subject):
                sub.deliver(bytes(data))
        if not responders:
            if any(subject_matches(s.subject, subject) for s in self._subscriptions):
                await asyncio.sleep(timeout)  # listeners that never answer: the requester waits it out
                raise TimeoutError(f"no reply on {subject} within {timeout:g}s")
            raise TimeoutError(f"no responder on {subject}")
        # NATS delivers to every responder and the first answer wins; one responder is enough here.
        try:
            return await asyncio.wait_for(self._run_handler(responders[0], data), timeout)
        except TimeoutError as e:
            raise TimeoutError(f"no reply on {subject} within {timeout:g}s") from e
        except Exception as e:
            # Over NATS a failing responder sends nothing and the requester times out; here the
            # requester learns it at once, which keeps unit tests fast.
            logger.exception("handler for %s failed", subject)
            raise TimeoutError(f"no reply on {subject}: the responder failed") from e

    async def serve(self, subject: str, handler: Handler) -> Subscription:
        self._check_open()
        served = MemoryServedSubscription(self, subject, handler)
        self._servers.add(served)
        return served

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subscriptions):
            await sub.close()
        for served in list(self._servers):
            await served.close()
        for task in list(self._inflight):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._inflight, return_exceptions=True)

    @staticmethod
    async def _run_handler(served: MemoryServedSubscription, data: bytes) -> bytes:
        return await served.handler(bytes(data))

    def _spawn(self, coro: Awaitable[bytes], subject: str) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception:
                logger.exception("handler for %s failed", subject)

        task = asyncio.get_running_loop().create_task(run())
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("event bus is closed")
