"""EventBus on NATS core (nats-py): pub/sub and request-reply.

The client reconnects forever; subscriptions are replayed by nats-py after a reconnect. Publishing
is fire-and-forget: while disconnected nats-py buffers outgoing messages (up to its pending
buffer) and flushes them on reconnect; anything it cannot take is dropped and logged at debug,
because KV events carry sequence numbers and routers resync on gaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as _NatsSub

from dynamo_lite.events.base import EventBus, Handler, ServedSubscription, Subscription
from dynamo_lite.protocol.errors import TransportError

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
RECONNECT_WAIT = 0.5
FLUSH_TIMEOUT = 2.0
# Errors that only mean "not connected right now" (or closed): a publish is dropped, not raised.
_DISCONNECTED = (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError,
                 nats.errors.ConnectionReconnectingError, nats.errors.StaleConnectionError,
                 nats.errors.ConnectionDrainingError, OSError)


def _refused_credentials(error: BaseException) -> bool:
    """nats-server's answer to a missing or wrong token, user or creds ('Authorization Violation')."""
    return isinstance(error, nats.errors.AuthorizationError) or "authorization" in str(error).lower()


class NatsSubscription(Subscription):
    """Messages of one subject; iterating yields payloads until closed."""

    def __init__(self, sub: _NatsSub):
        self._sub = sub
        self._closed = False

    async def _payloads(self) -> AsyncIterator[bytes]:
        async for msg in self._sub.messages:
            yield msg.data

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._payloads()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(nats.errors.Error):
            await self._sub.unsubscribe()


class NatsServedSubscription(ServedSubscription):
    """A request-reply responder: each request is answered by its own task."""

    def __init__(self, subject: str, handler: Handler):
        super().__init__(subject, handler)
        self._sub: _NatsSub | None = None
        self._inflight: set[asyncio.Task] = set()

    async def on_request(self, msg: Msg) -> None:
        # One task per request, so a slow answer does not hold up the next request.
        task = asyncio.get_running_loop().create_task(self._answer(msg))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _answer(self, msg: Msg) -> None:
        try:
            reply = await self.handler(msg.data)
        except Exception:
            logger.exception("handler for %s failed; the requester will time out", self.subject)
            return
        if not msg.reply:
            return  # a plain publish, nobody waits for an answer
        try:
            await msg.respond(reply)
        except _DISCONNECTED as e:
            logger.debug("reply on %s dropped: %s", self.subject, e)
        except nats.errors.MaxPayloadError:
            logger.error("reply on %s is %d bytes, more than the NATS server's max_payload: raise max_payload "
                         "in the server config", self.subject, len(reply))

    async def _release(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
        for task in list(self._inflight):
            task.cancel()


class NatsEventBus(EventBus):
    """Build it with `await NatsEventBus.connect("nats://host:port[,nats://...]")`."""

    def __init__(self, nc: Client, servers: str):
        self._nc = nc
        self._servers = servers
        self._served: list[NatsServedSubscription] = []
        self._closed = False

    @classmethod
    async def connect(cls, servers: str, *, connect_timeout: float = CONNECT_TIMEOUT,
                      name: str | None = None, token: str = "", user: str = "", password: str = "",
                      creds_file: str = "", ca_file: str = "") -> NatsEventBus:
        """Connect within connect_timeout (TransportError naming the servers otherwise, and saying so when
        the server refused our credentials). `token`, `user`/`password` or `creds_file` authenticate;
        `ca_file` verifies a TLS server (tls:// URLs without it use the system CAs)."""
        urls = [s.strip() if "://" in s else f"nats://{s.strip()}" for s in servers.split(",") if s.strip()]
        if not urls:
            raise ValueError(f"no NATS server in {servers!r}")
        nc = Client()
        errors: list[Exception] = []  # the last one
        refusals: list[Exception] = []  # the first refusal of our credentials
        refused = asyncio.Event()  # ends the connect at once: retrying cannot help
        security: dict = {}
        if token:
            security["token"] = token
        if user:
            security.update(user=user, password=password)
        if creds_file:
            security["user_credentials"] = creds_file
        if ca_file:
            security["tls"] = ssl.create_default_context(cafile=ca_file)

        async def on_error(e: Exception) -> None:
            # Refused connections while reconnecting are expected and frequent: keep them quiet.
            errors.append(e)
            del errors[:-1]
            if _refused_credentials(e) and not refusals:  # a refusal of our credentials will not heal itself
                refusals.append(e)
                refused.set()
                logger.error("NATS at %s refused this client: %s (--nats-token-file, --nats-user / "
                             "--nats-password-file, --nats-creds-file)", servers, e)
            else:
                logger.debug("nats client error: %s", e)

        async def on_disconnected() -> None:
            if not nc.is_closed:
                logger.warning("disconnected from NATS at %s; reconnecting", servers)

        async def on_reconnected() -> None:
            logger.info("reconnected to NATS at %s", nc.connected_url.netloc if nc.connected_url else servers)

        connecting = asyncio.ensure_future(nc.connect(
            servers=urls, name=name, error_cb=on_error, disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected, allow_reconnect=True, max_reconnect_attempts=-1,
            reconnect_time_wait=RECONNECT_WAIT, connect_timeout=min(2, connect_timeout),
            flush_timeout=FLUSH_TIMEOUT,
            ping_interval=20, max_outstanding_pings=3, **security))
        watching = asyncio.ensure_future(refused.wait())
        try:
            await asyncio.wait((connecting, watching), timeout=connect_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            if not connecting.done():
                connecting.cancel()
                await asyncio.gather(connecting, return_exceptions=True)
                raise asyncio.TimeoutError()
            connecting.result()
        except (asyncio.TimeoutError, OSError, nats.errors.Error) as e:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 1.0)
            cause = next((c for c in (e, *refusals) if _refused_credentials(c)), None)
            if cause is not None:
                raise TransportError(f"NATS at {servers} refused this client's credentials ({cause}): give "
                                     "the server's token, user or creds (--nats-token-file, --nats-user / "
                                     "--nats-password-file, --nats-creds-file)") from e
            detail = f": {errors[-1] or type(errors[-1]).__name__}" if errors else ""
            raise TransportError(
                f"NATS is unreachable at {servers} (no answer within {connect_timeout:g}s{detail})") from e
        finally:
            watching.cancel()
        logger.info("connected to NATS at %s", servers)
        return cls(nc, servers)

    @property
    def connected(self) -> bool:
        return self._nc.is_connected

    async def publish(self, subject: str, data: bytes) -> None:
        try:
            await self._nc.publish(subject, data)
        except _DISCONNECTED as e:
            logger.debug("publish on %s dropped: %s", subject, e)

    async def _round_trip(self) -> None:
        """Return once the server has everything written so far (raises nats-py's errors)."""
        # nats-py's flush() writes its PING straight to the socket, ahead of the commands still queued
        # for its flusher task, such as the SUB just made; the PONG would then prove nothing about
        # them, and a message published right after subscribe() could miss the subscription. So the
        # queue is written first, then the ping.
        await self._nc._flush_pending(force_flush=True)
        await self._nc.flush(timeout=FLUSH_TIMEOUT)

    async def _settle(self) -> None:
        """Round-trip to the server so a new subscription is active before we return."""
        try:
            await self._round_trip()
        except (*_DISCONNECTED, nats.errors.TimeoutError) as e:
            # nats-py replays the subscription when the connection comes back.
            logger.debug("subscription not confirmed by the server yet: %s", e)

    async def subscribe(self, subject: str) -> Subscription:
        self._check_open()
        sub = await self._nc.subscribe(subject)
        await self._settle()
        return NatsSubscription(sub)

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        self._check_open()
        try:
            msg = await self._nc.request(subject, data, timeout=timeout)
        except nats.errors.NoRespondersError as e:
            raise TimeoutError(f"no responder on {subject}") from e
        except nats.errors.TimeoutError as e:
            raise TimeoutError(f"no reply on {subject} within {timeout:g}s") from e
        except _DISCONNECTED as e:
            raise TransportError(f"request on {subject} failed: NATS at {self._servers}: {e}") from e
        return msg.data

    async def serve(self, subject: str, handler: Handler) -> Subscription:
        self._check_open()
        served = NatsServedSubscription(subject, handler)
        served._sub = await self._nc.subscribe(subject, cb=served.on_request)
        await self._settle()
        self._served.append(served)
        return served

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("event bus is closed")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for served in self._served:
            await served.close()
        if self._nc.is_connected:
            with contextlib.suppress(Exception):
                await self._round_trip()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._nc.close(), FLUSH_TIMEOUT + 3)
