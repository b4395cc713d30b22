"""EmbeddedEventBus: the EventBus with no broker, for hosts (or clusters) without NATS.

Why: a NATS server is one more process to install, run and keep up, for traffic that only ever goes from
a few workers to a few routers. Every process already has a Discovery (etcd, or the embedded one), so
buses can find each other there and talk directly.

How:
- Every bus listens on a TCP port (the component's advertise host, port 0) and records an EventEndpoint
  under keys.event_endpoint_key, attached to its own lease: a bus that dies vanishes with its lease.
- Every bus follows that prefix and dials every other bus (events/embedded_peers.py, PeerLink). Over
  the link it dialed, a bus sends what it subscribes to and its requests; the peer sends back the
  messages that match, its answers, and the subjects it serves. So a message crosses exactly one TCP
  connection from its publisher to each subscribed bus, and one publisher's messages on one subject
  arrive in publish order.
- publish() never waits: each subscribed peer has a bounded queue (PeerSubscriber); a peer that reads
  too slowly loses messages (logged), and the sequence numbers in KV event batches let its routers
  repair the gap by resync, as after any NATS loss.
- A link redials while its peer is in discovery and resends every subscription. request() goes to the
  peers that serve the subject (waiting, within its timeout, for one to appear); the first answer wins.

Limits: at most once, like NATS core (nothing is stored for a bus that is down or slow); one connection
per ordered pair of buses, fine for tens of processes, not thousands; a plain publish never reaches a
responder and a request never reaches a plain subscriber (the project uses neither; NATS does both).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
from collections.abc import Awaitable, Callable

import msgspec

from dynamo_lite.discovery.base import Discovery, Lease
from dynamo_lite.discovery.prefix_follower import PrefixFollower
from dynamo_lite.events.base import EventBus, Subscription
from dynamo_lite.events.embedded_peers import LINK_ERRORS, PeerLink, PeerSubscriber
from dynamo_lite.events.embedded_subscriptions import EmbeddedServedSubscription, EmbeddedSubscription
from dynamo_lite.events.memory import subject_matches
from dynamo_lite.protocol import keys
from dynamo_lite.protocol.errors import TransportError
from dynamo_lite.protocol.messages import json_encoder
from dynamo_lite.protocol.peer_messages import (
    EventEndpoint, PeerAck, PeerHello, PeerMessage, PeerReply, PeerRequest, PeerServes, PeerSubscribe,
    PeerUnsubscribe, PeerWelcome, endpoint_json_decoder, peer_frame_decoder)
from dynamo_lite.transport.auth import PlaneAuth
from dynamo_lite.transport.framing import encode_frame, read_frame, tune_stream_socket

logger = logging.getLogger(__name__)

Handler = Callable[[bytes], Awaitable[bytes]]

LEASE_TTL = 10.0  # seconds a dead bus stays listed (peers notice a closed connection at once anyway)
SETTLE_TIMEOUT = 2.0  # how long connect() and subscribe() wait for peers to confirm
FLUSH_TIMEOUT = 2.0  # how long close() lets queued messages go out
MAX_QUEUED_BYTES = 16 * 1024 * 1024  # per subscribed peer
MAX_PENDING_MESSAGES = 65536  # per subscription not consumed (nats-py's default)


class _PendingRequest:
    def __init__(self, future: asyncio.Future):
        self.future = future
        self.asked = 0  # responders the request went to
        self.failed = 0  # of them, those whose handler failed
        self.error = ""  # the last failure


class EmbeddedEventBus(EventBus):
    """Build it with `await EmbeddedEventBus.connect(discovery, namespace=..., host=...)`; the caller keeps
    ownership of `discovery` (close the bus first)."""

    def __init__(self, discovery: Discovery, namespace: str, *, name: str = "", lease_ttl: float = LEASE_TTL,
                 max_queued_bytes: int = MAX_QUEUED_BYTES, max_pending: int = MAX_PENDING_MESSAGES,
                 auth: PlaneAuth | None = None):
        self.bus_id = secrets.randbits(62) + 1
        self.auth = auth  # the plane-secret handshake on every link, both ends (transport/auth.py)
        self.namespace = namespace
        self.name = name
        self._discovery = discovery
        self._lease_ttl = lease_ttl
        self._max_queued_bytes = max_queued_bytes
        self._max_pending = max_pending
        self._key = keys.event_endpoint_key(namespace, self.bus_id)
        self._record = b""
        self._lease: Lease | None = None
        self._server: asyncio.Server | None = None
        self._follower: PrefixFollower | None = None
        self._links: dict[int, PeerLink] = {}  # peer bus id -> our link to it
        self._subscribers: dict[asyncio.StreamWriter, PeerSubscriber] = {}  # peers linked to us
        self._subscriptions: dict[str, set[EmbeddedSubscription]] = {}  # subject -> ours
        self._served: dict[str, list[EmbeddedServedSubscription]] = {}  # subject -> our responders
        self._requests: dict[int, _PendingRequest] = {}
        self._request_ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self._changed = asyncio.Event()
        self._closed = False

    @classmethod
    async def connect(cls, discovery: Discovery, *, namespace: str = "dynamo", host: str = "127.0.0.1",
                      name: str | None = None, settle_timeout: float = SETTLE_TIMEOUT,
                      **options) -> EmbeddedEventBus:
        """Listen on host, register in discovery and link to the buses already there (waiting up to
        settle_timeout for those that answer to link back, so a message published next reaches them).
        TransportError when it cannot listen or register."""
        bus = cls(discovery, namespace, name=name or "", **options)
        try:
            await bus._start(host, settle_timeout)
        except BaseException as e:  # cancelled (a caller's timeout) too: leave no server or record behind
            await bus.close()
            if isinstance(e, Exception):
                raise TransportError(f"embedded event bus: cannot start on {host}: {e!r}") from e
            raise
        return bus

    async def _start(self, host: str, settle_timeout: float) -> None:
        self._server = await asyncio.start_server(self._accept, host, 0)
        port = self._server.sockets[0].getsockname()[1]
        record = EventEndpoint(bus_id=self.bus_id, host=host, port=port, pid=os.getpid(), name=self.name)
        self._record = json_encoder.encode(record)
        await self._register()
        self._follower = PrefixFollower(self._discovery, keys.event_endpoints_prefix(self.namespace),
                                        self._endpoint_put, self._endpoint_deleted)
        await self._follower.start()
        initial = list(self._links.values())
        self._spawn(self._keep_registered(), "event-bus-lease")
        logger.info("embedded event bus %x listening on %s:%d (%d peer(s) in discovery)", self.bus_id, host,
                    port, len(initial))
        # Peers that answer our dial see our endpoint too and dial back: wait for that, so they get what we
        # publish from now on. Peers that are gone (their lease not yet expired) do not hold us up.
        await self._wait(lambda: all(link.attempted.is_set() for link in initial)
                         and all(link.bus_id in self._linked_back() for link in initial if link.welcomed),
                         settle_timeout)

    async def _register(self) -> None:
        self._lease = await self._discovery.grant_lease(self._lease_ttl)
        await self._discovery.put(self._key, self._record, lease=self._lease)

    async def _keep_registered(self) -> None:
        """Register again if the lease was lost (discovery unreachable longer than its ttl)."""
        while True:
            await asyncio.sleep(self._lease_ttl / 3)
            if self._lease is not None and self._lease.lost:
                try:
                    await self._register()
                    logger.warning("embedded event bus %x: lease was lost; registered again", self.bus_id)
                except Exception as e:
                    logger.warning("embedded event bus %x: cannot register again yet: %r", self.bus_id, e)

    # ------------------------------------------------------------------ EventBus

    async def publish(self, subject: str, data: bytes) -> None:
        if self._closed:
            logger.debug("publish on %s dropped: bus closed", subject)
            return
        self.deliver(subject, data)
        frame = None
        for subscriber in self._subscribers.values():
            if subscriber.subjects.matches(subject):
                if frame is None:  # encoded once, whatever the number of peers
                    frame = encode_frame(PeerMessage(subject, data))
                subscriber.send(frame)

    async def subscribe(self, subject: str) -> Subscription:
        self._check_open()
        subscription = EmbeddedSubscription(self, subject, self._max_pending)
        subscribers = self._subscriptions.setdefault(subject, set())
        subscribers.add(subscription)
        if len(subscribers) == 1:
            acks = [f for link in self._links.values() if (f := link.subscribe(subject)) is not None]
            if acks:  # like NATS's flush: once the peers have it, what they publish next reaches us
                await asyncio.wait(acks, timeout=SETTLE_TIMEOUT)
        return subscription

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        self._check_open()
        served = self._local_responder(subject)
        if served is not None:
            return await self._answer_locally(served, subject, data, timeout)
        request_id = next(self._request_ids)
        pending = _PendingRequest(asyncio.get_running_loop().create_future())
        self._requests[request_id] = pending
        message = PeerRequest(request_id, subject, data)
        try:
            async with asyncio.timeout(timeout):
                # A responder may not be linked yet (it just started, or we did): wait for one to appear.
                while not pending.asked:
                    pending.asked = sum(link.serves.matches(subject) and link.send(message)
                                        for link in list(self._links.values()))
                    if not pending.asked:
                        await self._changed.wait()
                reply = await pending.future
        except TimeoutError as e:
            what = "reply" if pending.asked else "responder"
            raise TimeoutError(f"no {what} on {subject} within {timeout:g}s") from e
        finally:
            self._requests.pop(request_id, None)
        if reply is None:  # as the memory bus does; over NATS the requester would wait out its timeout
            raise TimeoutError(f"no reply on {subject}: the responder failed ({pending.error})")
        return reply

    async def serve(self, subject: str, handler: Handler) -> Subscription:
        self._check_open()
        served = EmbeddedServedSubscription(self, subject, handler)
        responders = self._served.setdefault(subject, [])
        responders.append(served)
        if len(responders) == 1:
            self._tell_subscribers(PeerServes(subject, True))
        return served

    async def close(self) -> None:
        """Deregister, let queued messages go out (bounded), hang up. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._follower is not None:
            await self._follower.close()
        if self._lease is not None:
            with contextlib.suppress(Exception):
                await self._lease.revoke()
        if self._server is not None:
            self._server.close()
        for subscriptions in list(self._subscriptions.values()):
            for subscription in list(subscriptions):
                await subscription.close()
        for responders in list(self._served.values()):
            for served in list(responders):
                await served.close()
        if self._subscribers:
            await asyncio.wait([asyncio.ensure_future(s.flushed()) for s in self._subscribers.values()],
                               timeout=FLUSH_TIMEOUT)
        for writer in list(self._subscribers):
            writer.close()
        for link in list(self._links.values()):
            await link.stop()
        self._links.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for pending in self._requests.values():
            pending.future.cancel()
        logger.debug("embedded event bus %x closed", self.bus_id)

    # ------------------------------------------------------------------ what links report

    def _linked_back(self) -> set[int]:
        return {subscriber.bus_id for subscriber in self._subscribers.values()}

    def subjects(self) -> list[str]:
        return list(self._subscriptions)

    def wants_link(self, link: PeerLink) -> bool:
        return not self._closed and self._links.get(link.bus_id) is link

    def links_changed(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def deliver(self, subject: str, data: bytes) -> None:
        """Hand a message to our subscriptions on subject."""
        for pattern, subscriptions in self._subscriptions.items():
            if pattern == subject or subject_matches(pattern, subject):
                for subscription in subscriptions:
                    subscription.deliver(data)

    def on_reply(self, reply: PeerReply) -> None:
        pending = self._requests.get(reply.request_id)
        if pending is None or pending.future.done():
            return  # answered already (the first answer wins), or given up
        if not reply.error:
            pending.future.set_result(reply.data)
            return
        pending.failed += 1
        pending.error = reply.error
        if pending.failed >= pending.asked:  # every responder asked failed: nobody will answer
            pending.future.set_result(None)

    # ------------------------------------------------------------------ discovery of peers

    def _endpoint_put(self, key: str, value: bytes) -> None:
        try:
            endpoint = endpoint_json_decoder.decode(value)
        except msgspec.DecodeError as e:
            logger.warning("skipping undecodable event endpoint at %s: %s", key, e)
            return
        if endpoint.bus_id == self.bus_id or self._closed:
            return
        link = self._links.get(endpoint.bus_id)
        if link is not None and link.endpoint == endpoint:
            return
        if link is not None:
            self._spawn(link.stop(), "event-bus-link-stop")
        link = self._links[endpoint.bus_id] = PeerLink(self, endpoint)
        link.start()

    def _endpoint_deleted(self, key: str) -> None:
        link = self._links.pop(keys.parse_instance_id(key), None)
        if link is not None:
            logger.info("event bus peer %x (%s) left", link.bus_id, link.endpoint.name)
            self._spawn(link.stop(), "event-bus-link-stop")
            self.links_changed()

    # ------------------------------------------------------------------ peers linked to us

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tune_stream_socket(writer)
        subscriber: PeerSubscriber | None = None
        sender: asyncio.Task | None = None
        try:
            if self.auth is not None and not await self.auth.accept(reader, writer):
                return
            payload = await asyncio.wait_for(read_frame(reader), SETTLE_TIMEOUT)
            hello = peer_frame_decoder.decode(payload) if payload is not None else None
            if not isinstance(hello, PeerHello) or hello.namespace != self.namespace or self._closed:
                return
            subscriber = PeerSubscriber(hello.bus_id, hello.subscriptions, writer, self._max_queued_bytes)
            subscriber.send(encode_frame(PeerWelcome(bus_id=self.bus_id, serves=list(self._served))))
            self._subscribers[writer] = subscriber
            sender = asyncio.get_running_loop().create_task(subscriber.write_frames())
            self.links_changed()
            reading = asyncio.ensure_future(self._read_peer(reader, subscriber))
            await asyncio.wait([reading, sender], return_when=asyncio.FIRST_COMPLETED)
            reading.cancel()
            for task in (reading, sender):
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()
        except LINK_ERRORS as e:
            logger.debug("event bus peer %x hung up: %r", subscriber.bus_id if subscriber else 0, e)
        finally:
            self._subscribers.pop(writer, None)
            if sender is not None:
                sender.cancel()
            writer.close()

    async def _read_peer(self, reader: asyncio.StreamReader, subscriber: PeerSubscriber) -> None:
        while (payload := await read_frame(reader)) is not None:
            frame = peer_frame_decoder.decode(payload)
            if isinstance(frame, PeerSubscribe):
                subscriber.subjects.add(frame.subject)
                subscriber.send(encode_frame(PeerAck(frame.ack)))
            elif isinstance(frame, PeerUnsubscribe):
                subscriber.subjects.discard(frame.subject)
            elif isinstance(frame, PeerRequest):
                self._spawn(self._answer(frame, subscriber), f"event-bus-answer-{frame.subject}")

    async def _answer(self, request: PeerRequest, subscriber: PeerSubscriber) -> None:
        served = self._local_responder(request.subject)
        if served is None:
            return  # it stopped serving meanwhile: the requester times out (or another answers)
        try:
            reply = PeerReply(request.request_id, await served.handler(request.data))
        except Exception as e:
            logger.exception("handler for %s failed", request.subject)
            reply = PeerReply(request.request_id, b"", error=repr(e) or "failed")
        subscriber.send(encode_frame(reply))

    # ------------------------------------------------------------------ internals

    def _local_responder(self, subject: str) -> EmbeddedServedSubscription | None:
        for pattern, responders in self._served.items():
            if responders and (pattern == subject or subject_matches(pattern, subject)):
                return responders[0]
        return None

    async def _answer_locally(self, served: EmbeddedServedSubscription, subject: str, data: bytes,
                              timeout: float) -> bytes:
        try:
            return await asyncio.wait_for(served.handler(bytes(data)), timeout)
        except TimeoutError as e:
            raise TimeoutError(f"no reply on {subject} within {timeout:g}s") from e
        except Exception as e:
            logger.exception("handler for %s failed", subject)
            raise TimeoutError(f"no reply on {subject}: the responder failed") from e

    def _unsubscribe(self, subscription: EmbeddedSubscription) -> None:
        subscriptions = self._subscriptions.get(subscription.subject)
        if subscriptions is None:
            return
        subscriptions.discard(subscription)
        if not subscriptions:
            del self._subscriptions[subscription.subject]
            for link in self._links.values():
                link.send(PeerUnsubscribe(subscription.subject))

    def _unserve(self, served: EmbeddedServedSubscription) -> None:
        responders = self._served.get(served.subject, [])
        if served in responders:
            responders.remove(served)
        if not responders and self._served.pop(served.subject, None) is not None:
            self._tell_subscribers(PeerServes(served.subject, False))

    def _tell_subscribers(self, message: msgspec.Struct) -> None:
        frame = encode_frame(message)
        for subscriber in self._subscribers.values():
            subscriber.send(frame)

    async def _wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until predicate() holds, re-checking whenever links change; False after timeout."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    await self._changed.wait()
        except TimeoutError:
            return predicate()
        return True

    def _spawn(self, coroutine: Awaitable, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("event bus is closed")

