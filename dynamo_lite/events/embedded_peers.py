"""The two ends of a connection between embedded event buses (events/embedded.py).

- `PeerLink`: the connection this bus dialed to a peer. Over it this bus says what it subscribes to and
  sends its requests; the peer sends back the matching messages, the answers and the subjects it serves.
  It redials (with backoff) while the peer's endpoint stays in discovery.
- `PeerSubscriber`: the listening side of a peer's link: what that peer subscribed to, and a bounded
  queue of frames for it, written by one task. A peer that reads too slowly loses messages, never
  memory or the publisher's time.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from typing import TYPE_CHECKING

import msgspec

from dynamo_lite.events.memory import subject_matches
from dynamo_lite.protocol.errors import TransportError
from dynamo_lite.protocol.peer_messages import (
    EventEndpoint, PeerAck, PeerHello, PeerMessage, PeerReply, PeerServes, PeerSubscribe, PeerWelcome,
    peer_frame_decoder)
from dynamo_lite.transport.framing import encode_frame, read_frame, tune_stream_socket

if TYPE_CHECKING:
    from dynamo_lite.events.embedded import EmbeddedEventBus

logger = logging.getLogger(__name__)

DIAL_TIMEOUT = 2.0  # to connect and be welcomed
REDIAL_MIN, REDIAL_MAX = 0.05, 1.0  # backoff between dials (seconds)
# What a link may fail on: the peer went away, or spoke nonsense. Either way: hang up and redial.
LINK_ERRORS = (OSError, TimeoutError, TransportError, msgspec.DecodeError, EOFError)


def has_wildcard(subject: str) -> bool:
    return any(token in ("*", ">") for token in subject.split("."))


class SubjectSet:
    """Subjects (NATS-style patterns) with a fast path for the exact ones, which is all the project uses."""

    def __init__(self, subjects: list[str] = ()):
        self.exact: set[str] = set()
        self.patterns: set[str] = set()
        for subject in subjects:
            self.add(subject)

    def add(self, subject: str) -> None:
        (self.patterns if has_wildcard(subject) else self.exact).add(subject)

    def discard(self, subject: str) -> None:
        self.exact.discard(subject)
        self.patterns.discard(subject)

    def clear(self) -> None:
        self.exact.clear()
        self.patterns.clear()

    def matches(self, subject: str) -> bool:
        return subject in self.exact or any(subject_matches(p, subject) for p in self.patterns)


class PeerSubscriber:
    """A peer that dialed us: the subjects it wants and the frames queued for it."""

    def __init__(self, bus_id: int, subjects: list[str], writer: asyncio.StreamWriter, max_queued_bytes: int):
        self.bus_id = bus_id
        self.subjects = SubjectSet(subjects)
        self.dropped = 0  # messages lost because the peer read too slowly
        self._writer = writer
        self._max_queued_bytes = max_queued_bytes
        self._frames: collections.deque[bytes | bytearray] = collections.deque()
        self._queued_bytes = 0
        self._dropping = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def send(self, frame: bytes | bytearray) -> None:
        """Queue a frame; never waits. Dropped (logged once per episode) when the queue is full."""
        if self._queued_bytes + len(frame) > self._max_queued_bytes:
            self.dropped += 1
            if not self._dropping:
                self._dropping = True
                logger.warning("event bus peer %x reads too slowly: dropping messages for it (%d bytes "
                               "queued); its routers resync what they miss", self.bus_id, self._queued_bytes)
            return
        if self._dropping:
            self._dropping = False
            logger.info("event bus peer %x caught up (%d messages dropped so far)", self.bus_id, self.dropped)
        self._frames.append(frame)
        self._queued_bytes += len(frame)
        self._idle.clear()
        self._wake.set()

    async def write_frames(self) -> None:
        """Write queued frames until cancelled (or the connection fails: then it raises)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._frames:
                frames = list(self._frames)
                self._frames.clear()
                self._queued_bytes = 0
                self._writer.writelines(frames)
                # drain() blocks while the socket buffer is over its high-water mark: the back-pressure that
                # fills our queue, so a slow peer costs at most max_queued_bytes plus one socket buffer.
                await self._writer.drain()
            self._idle.set()

    async def flushed(self) -> None:
        await self._idle.wait()


class PeerLink:
    """Our connection to one peer bus, kept up while its endpoint is in discovery."""

    _acks = itertools.count(1)

    def __init__(self, bus: EmbeddedEventBus, endpoint: EventEndpoint):
        self.bus = bus
        self.endpoint = endpoint
        self.serves = SubjectSet()
        self.attempted = asyncio.Event()  # the first dial is over, welcomed or not
        self.welcomed = False
        self._writer: asyncio.StreamWriter | None = None
        self._pending_acks: dict[int, asyncio.Future] = {}
        self._task: asyncio.Task | None = None

    @property
    def bus_id(self) -> int:
        return self.endpoint.bus_id

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name=f"event-bus-link-{self.bus_id:x}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def send(self, message: msgspec.Struct) -> bool:
        """Write a frame to the peer at once; False when not connected."""
        if self._writer is None or self._writer.is_closing():
            return False
        self._writer.write(encode_frame(message))
        return True

    def subscribe(self, subject: str) -> asyncio.Future | None:
        """Send a subscription; the future resolves when the peer has it (or the connection is gone)."""
        ack = next(self._acks)
        if not self.send(PeerSubscribe(subject, ack)):
            return None
        future = asyncio.get_running_loop().create_future()
        self._pending_acks[ack] = future
        return future

    async def _run(self) -> None:
        delay, failures = REDIAL_MIN, 0
        while self.bus.wants_link(self):
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.endpoint.host, self.endpoint.port), DIAL_TIMEOUT)
            except LINK_ERRORS as e:
                failures += 1
                (logger.warning if failures == 1 else logger.debug)(
                    "event bus: cannot reach peer %x (%s) at %s:%d: %r; retrying", self.bus_id,
                    self.endpoint.name, self.endpoint.host, self.endpoint.port, e)
            else:
                try:
                    await self._converse(reader, writer)
                except LINK_ERRORS as e:
                    if self.welcomed:  # it was up: redial at once, and warn again if that fails
                        delay, failures = REDIAL_MIN, 0
                        logger.info("event bus: connection to peer %x (%s) lost: %r; redialing", self.bus_id,
                                    self.endpoint.name, e)
                    else:
                        failures += 1
                        (logger.warning if failures == 1 else logger.debug)(
                            "event bus: peer %x (%s) refused the link: %r; retrying", self.bus_id,
                            self.endpoint.name, e)
                finally:
                    self._hang_up(writer)
            self.attempted.set()
            self.bus.links_changed()
            await asyncio.sleep(delay)
            delay = min(delay * 2, REDIAL_MAX)

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tune_stream_socket(writer)
        if self.bus.auth is not None:  # PlaneAuthError is a TransportError: logged as a refused link
            await self.bus.auth.dial(reader, writer, f"event bus peer {self.bus_id:x} ({self.endpoint.name})")
        # The hello lists our subscriptions as they are now, and from here on subscribe() writes on this
        # connection too (no await in between): none is missed.
        self._writer = writer
        writer.write(encode_frame(PeerHello(bus_id=self.bus.bus_id, namespace=self.bus.namespace,
                                            subscriptions=self.bus.subjects())))
        payload = await asyncio.wait_for(read_frame(reader), DIAL_TIMEOUT)
        welcome = peer_frame_decoder.decode(payload) if payload is not None else None
        if not isinstance(welcome, PeerWelcome) or welcome.bus_id != self.bus_id:
            raise TransportError(f"peer {self.bus_id:x} did not welcome us (got {type(welcome).__name__})")
        self.serves = SubjectSet(welcome.serves)
        self.welcomed = True
        self.attempted.set()
        self.bus.links_changed()
        logger.info("event bus: linked to peer %x (%s) at %s:%d", self.bus_id, self.endpoint.name,
                    self.endpoint.host, self.endpoint.port)
        while (payload := await read_frame(reader)) is not None:
            frame = peer_frame_decoder.decode(payload)
            if isinstance(frame, PeerMessage):
                self.bus.deliver(frame.subject, frame.data)
            elif isinstance(frame, PeerReply):
                self.bus.on_reply(frame)
            elif isinstance(frame, PeerAck):
                future = self._pending_acks.pop(frame.ack, None)
                if future is not None and not future.done():
                    future.set_result(None)
            elif isinstance(frame, PeerServes):
                (self.serves.add if frame.serving else self.serves.discard)(frame.subject)
                self.bus.links_changed()
        raise EOFError("the peer closed the connection")

    def _hang_up(self, writer: asyncio.StreamWriter) -> None:
        self._writer = None
        self.welcomed = False
        self.serves.clear()
        writer.close()
        # Nobody waits for the acks of a connection that is gone: the next hello carries the subscriptions.
        for future in self._pending_acks.values():
            if not future.done():
                future.set_result(None)
        self._pending_acks.clear()
