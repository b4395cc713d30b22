"""Discovery on etcd v3 through the asyncio `aetcd` client.

Connection failures are retried here, not by callers: unary calls retry until their deadline,
lease keep-alives retry until the store answers again (and mark the lease `lost` if the store
says it no longer exists), and watches resume from the revision after the last event they yielded.
With auth enabled, a token etcd no longer knows (it restarted: simple tokens live in its memory; the
token's ttl passed; the auth store changed) is renewed here by authenticating again, once per call.
A watch that cannot resume (compacted revision, a store that came back empty or as another
cluster) yields a RESET WatchEvent and ends, as the Discovery interface requires.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import aetcd
import grpc
from aetcd import exceptions as aetcd_errors
from aetcd import rpc, watcher
from aetcd.client import _handle_errors

from dynamo_lite.discovery.base import Discovery, Lease, WatchEvent, WatchEventKind
from dynamo_lite.protocol.errors import TransportError

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_OP_TIMEOUT = 5.0
# A process started beside etcd (compose, Kubernetes, a launch script) often comes up first:
# connect() keeps trying this long before it gives up.
DEFAULT_CONNECT_WAIT = 30.0
MAX_BACKOFF = 2.0
# gRPC reconnects its channel on its own; its default backoff grows to 120 s, far too slow to
# notice a restarted etcd. Keep-alive pings detect a silently dead peer (etcd allows >= 5 s).
_CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
}
# Errors that mean "the store is unreachable right now": worth retrying.
_RETRYABLE = (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError, aetcd.WatchTimeoutError,
              asyncio.TimeoutError)


class DiscoveryError(TransportError):
    """etcd was unreachable within the deadline, or refused the request."""


@dataclass(frozen=True)
class EtcdSecurity:
    """TLS files and user of an etcd that requires them (all empty: plain, open etcd)."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    user: str = ""
    password: str = field(default="", repr=False)
    tls: bool = False  # https:// endpoints ask for TLS even without a CA file (the system CAs)

    @property
    def uses_tls(self) -> bool:
        return self.tls or bool(self.ca_file or self.cert_file)

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None
        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))


class _Client(aetcd.Client):
    """aetcd 1.0's client opens only insecure channels (no TLS option): this one opens a TLS channel when
    asked, and is otherwise aetcd's own connect (user/password authentication included)."""

    def __init__(self, *args, channel_credentials: grpc.ChannelCredentials | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._channel_credentials = channel_credentials

    @_handle_errors
    async def connect(self) -> None:
        if self._channel_credentials is None:
            return await super().connect()
        # aetcd 1.0's Client.connect, with rpc.secure_channel in place of rpc.insecure_channel.
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            self.channel = rpc.secure_channel(f"{self._host}:{self._port}", self._channel_credentials,
                                              options=self._options.items())
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                resp = await self.auth_stub.Authenticate(
                    rpc.AuthenticateRequest(name=self._username, password=self._password),
                    timeout=self._timeout)
                self.metadata = (("token", resp.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                            metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False


def parse_endpoints(endpoints: str) -> list[tuple[str, int]]:
    """"http://h:p", "h:p" or "h" (port 2379), comma-separated, into (host, port) pairs."""
    parsed = []
    for item in endpoints.split(","):
        item = item.strip()
        if not item:
            continue
        split = urlsplit(item if "://" in item else f"http://{item}")
        if split.scheme not in ("http", "https", "etcd", "") or not split.hostname:
            raise ValueError(f"invalid etcd endpoint {item!r} (expected http://host:port or host:port)")
        parsed.append((split.hostname, split.port or 2379))
    if not parsed:
        raise ValueError(f"no etcd endpoint in {endpoints!r}")
    return parsed


def _refused_user(error: BaseException) -> bool:
    """etcd's answer to a missing or wrong user or password (auth enabled)."""
    text = str(error).lower()
    return isinstance(error, (aetcd_errors.InvalidArgumentError, aetcd_errors.UnauthenticatedError)) and any(
        marker in text for marker in ("user name is empty", "authentication failed", "invalid auth token",
                                      "user name not found", "invalid user"))


# What etcd answers a request whose auth token it no longer accepts (etcd's ErrInvalidAuthToken,
# ErrAuthOldRevision); its own Go client authenticates again on these, and so do we.
_STALE_TOKEN_MARKERS = ("invalid auth token", "revision of auth store is old")


def _stale_token(error: BaseException) -> bool:
    if isinstance(error, rpc.AioRpcError):
        text = (error.details() or "").lower()
    elif isinstance(error, aetcd.ClientError):
        text = str(error).lower()
    else:
        return False
    return any(marker in text for marker in _STALE_TOKEN_MARKERS)


def _permission_denied(error: BaseException) -> bool:
    return "permission denied" in str(error).lower()


def _tls_hint(error: str, security: EtcdSecurity) -> str:
    """What to check when the last error looks like a TLS problem (or a TLS etcd spoken to in plain)."""
    text = error.lower()
    if not security.uses_tls and any(m in text for m in ("socket closed", "connection reset", "ssl", "eof")):
        return "; if etcd serves TLS, use https:// endpoints and --etcd-ca-file / ETCD_CA_FILE"
    tls_markers = ("ssl", "handshake", "certificate", "socket closed", "tsi_", "unwrap")
    if security.uses_tls and any(m in text for m in tls_markers):
        return ("; check --etcd-ca-file, and --etcd-cert-file / --etcd-key-file if etcd checks client "
                "certificates (--client-cert-auth)")
    return ""


def _log_retry(attempt: int, message: str, *args: object) -> None:
    # A long outage retries every couple of seconds: warn on the first and every tenth attempt only.
    level = logging.WARNING if attempt == 1 or attempt % 10 == 0 else logging.DEBUG
    logger.log(level, message, *args)


def _backoff(attempt: int) -> float:
    return min(MAX_BACKOFF, 0.1 * 2 ** min(attempt, 8))


class EtcdLease(Lease):
    """A granted lease, refreshed at ttl/3 by a background task until revoked or closed."""

    def __init__(self, discovery: EtcdDiscovery, lease_id: int, ttl: float):
        self.id = lease_id
        self.ttl = ttl
        self._discovery = discovery
        self._lost = False
        self._revoked = False
        self._task = asyncio.get_running_loop().create_task(self._keep_alive(),
                                                            name=f"etcd-keepalive-{lease_id:x}")

    @property
    def lost(self) -> bool:
        return self._lost

    async def _keep_alive(self) -> None:
        interval = self.ttl / 3
        failures = 0
        while True:
            await asyncio.sleep(interval if failures == 0 else min(interval, _backoff(failures)))
            try:
                # Bounded well below the ttl: a hung refresh must not outlive the lease.
                reply = await self._discovery._call(
                    f"keep-alive of lease {self.id:x}", lambda c: c.refresh_lease(self.id), retry=False,
                    timeout=max(1.0, interval))
            except Exception as e:  # DiscoveryError, or anything unexpected: the loop must go on
                failures += 1
                _log_retry(failures, "keep-alive of lease %x failed (attempt %s), retrying: %s",
                           self.id, failures, e)
                continue
            if failures:
                logger.info("keep-alive of lease %x recovered after %s failed attempts", self.id, failures)
            failures = 0
            if reply is None or reply.TTL <= 0:
                # The store answered but no longer knows the lease: it expired while we were cut off.
                self._lost = True
                logger.error("lease %x is gone from etcd (expired while unreachable)", self.id)
                return

    def _stop(self) -> None:
        self._task.cancel()

    async def revoke(self) -> None:
        if self._revoked:
            return
        self._revoked = True
        self._stop()
        self._discovery._leases.discard(self)
        if self._lost:
            return
        try:
            await self._discovery._call(f"revoke of lease {self.id:x}", lambda c: c.revoke_lease(self.id))
        except DiscoveryError as e:
            if "not found" in str(e):  # already expired: the keys are gone, which is what we want
                return
            raise


class EtcdDiscovery(Discovery):
    """Discovery on one etcd cluster; build it with `await EtcdDiscovery.connect(endpoints)`."""

    def __init__(self, endpoints: list[tuple[str, int]], client: aetcd.Client, endpoint_index: int,
                 op_timeout: float = DEFAULT_OP_TIMEOUT, security: EtcdSecurity | None = None):
        self._security = security or EtcdSecurity()
        self._endpoints = endpoints
        self._client = client
        self._endpoint_index = endpoint_index
        self._op_timeout = op_timeout
        self._leases: set[EtcdLease] = set()
        self._closed = False
        self._reselect_lock = asyncio.Lock()

    @property
    def endpoint(self) -> str:
        host, port = self._endpoints[self._endpoint_index]
        return f"{'https' if self._security.uses_tls else 'http'}://{host}:{port}"

    @classmethod
    async def connect(cls, endpoints: str, *, op_timeout: float = DEFAULT_OP_TIMEOUT,
                      wait: float = DEFAULT_CONNECT_WAIT,
                      security: EtcdSecurity | None = None) -> EtcdDiscovery:
        """Connect to the first endpoint that answers, retrying for `wait` seconds; DiscoveryError if none
        does (with the last error seen), and at once if etcd refuses our user or password."""
        parsed = parse_endpoints(endpoints)
        security = security or EtcdSecurity()
        if any(item.strip().lower().startswith("https://") for item in endpoints.split(",")):
            security = dataclasses.replace(security, tls=True)
        errors: list[str] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        attempt = 0
        while True:
            attempt += 1
            probe = max(0.5, min(op_timeout, deadline - loop.time()))
            found = await cls._first_reachable(parsed, 0, probe, op_timeout, quiet=attempt > 1,
                                               security=security, errors=errors)
            if found is not None:
                break
            if loop.time() + _backoff(attempt) >= deadline:
                last = f" (last error: {errors[-1]}{_tls_hint(errors[-1], security)})" if errors else ""
                raise DiscoveryError(
                    f"etcd is unreachable: no endpoint of {endpoints!r} answered within {wait:g}s{last}")
            _log_retry(attempt, "waiting for etcd at %s (attempt %s)", endpoints, attempt)
            await asyncio.sleep(_backoff(attempt))
        index, client = found
        logger.info("connected to etcd at %s://%s:%s%s", "https" if security.uses_tls else "http",
                    *parsed[index], f" as user {security.user}" if security.user else "")
        return cls(parsed, client, index, op_timeout, security)

    @staticmethod
    async def _first_reachable(endpoints: list[tuple[str, int]], start: int, probe_timeout: float,
                               op_timeout: float, quiet: bool = False, security: EtcdSecurity | None = None,
                               errors: list[str] | None = None) -> tuple[int, aetcd.Client] | None:
        security = security or EtcdSecurity()
        scheme = "https" if security.uses_tls else "http"
        for offset in range(len(endpoints)):
            index = (start + offset) % len(endpoints)
            host, port = endpoints[index]
            client = _Client(host=host, port=port, timeout=op_timeout, options=_CHANNEL_OPTIONS,
                             username=security.user or None, password=security.password or None,
                             channel_credentials=security.credentials() if security.uses_tls else None)
            try:
                await asyncio.wait_for(client.status(), probe_timeout)
                # Status needs no user: a read does, so a missing or wrong one is found here, not later.
                await asyncio.wait_for(client.get(b"\0"), probe_timeout)
                return index, client
            except (aetcd.ClientError, asyncio.TimeoutError) as e:
                if _permission_denied(e):  # the user may read only its namespace: that is fine
                    return index, client
                with contextlib.suppress(Exception):
                    await client.close()
                if _refused_user(e):
                    raise DiscoveryError(f"etcd at {scheme}://{host}:{port} refused this client: {e} "
                                         "(etcd has auth enabled: give --etcd-user and "
                                         "--etcd-password-file / ETCD_USER and ETCD_PASSWORD_FILE)") from e
                if errors is not None:
                    errors.append(f"{type(e).__name__}: {e}")
                logger.log(logging.DEBUG if quiet else logging.WARNING,
                           "etcd at %s://%s:%s does not answer: %s", scheme, host, port, e)
        return None

    async def _reselect(self, failed: aetcd.Client) -> None:
        """With several endpoints, move to the next one that answers (the failed one last)."""
        if len(self._endpoints) < 2 or self._closed:
            return
        async with self._reselect_lock:
            if self._client is not failed or self._closed:
                return  # another task already moved on
            found = await self._first_reachable(self._endpoints, self._endpoint_index + 1, 1.0,
                                                self._op_timeout, security=self._security)
            if found is None or found[0] == self._endpoint_index:
                if found is not None:
                    await found[1].close()
                return
            self._endpoint_index, self._client = found
            logger.warning("switched etcd endpoint to %s", self.endpoint)
        await failed.close()  # ends watches on the old client; they resume on the new one

    async def _renew_token(self, failed: aetcd.Client) -> bool:
        """Replace `failed`, whose auth token etcd refused, with a client that has authenticated afresh on
        the same endpoint; False if none can be had now (the caller fails, and is retried as ever)."""
        async with self._reselect_lock:
            if self._closed:
                return False
            if self._client is not failed:
                return True  # another task renewed it already
            found = await self._first_reachable([self._endpoints[self._endpoint_index]], 0, self._op_timeout,
                                                self._op_timeout, quiet=True, security=self._security)
            if found is None:
                return False
            self._client = found[1]
        logger.warning("etcd at %s refused our auth token (restarted, or the token expired): authenticated "
                       "again as user %s", self.endpoint, self._security.user)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(failed.close(), self._op_timeout)  # its watches resume on the new one
        return True

    async def _call(self, what: str, op: Callable[[aetcd.Client], Awaitable[T]], *, retry: bool = True,
                    timeout: float | None = None) -> T:
        """Run op on the current client within timeout (op_timeout), retrying connection failures if asked."""
        if self._closed:
            raise DiscoveryError(f"etcd {what}: discovery client is closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self._op_timeout)
        attempt = 0
        renewed = False
        while True:
            client = self._client
            remaining = deadline - loop.time()
            try:
                return await asyncio.wait_for(op(client), max(remaining, 0.01))
            except _RETRYABLE as e:
                attempt += 1
                if not retry or loop.time() + _backoff(attempt) >= deadline or self._closed:
                    raise DiscoveryError(f"etcd {what} failed: etcd unreachable at {self.endpoint} "
                                         f"({type(e).__name__}: {e})") from e
                await self._reselect(client)
                await asyncio.sleep(_backoff(attempt))
            except (aetcd.ClientError, rpc.AioRpcError) as e:
                if _stale_token(e) and not renewed:
                    renewed = True
                    if await self._renew_token(client):
                        continue
                if isinstance(e, rpc.AioRpcError):
                    raise  # a raw stub call's error: its caller words it
                raise DiscoveryError(f"etcd {what} failed at {self.endpoint}: {e}") from e

    async def grant_lease(self, ttl: float) -> Lease:
        # etcd leases are whole seconds; etcd itself raises anything below its minimum (~2 s).
        seconds = max(1, math.ceil(ttl))
        granted = await self._call(f"grant of a {seconds}s lease", lambda c: c.lease(seconds))
        lease = EtcdLease(self, granted.id, float(granted.ttl))
        self._leases.add(lease)
        logger.debug("granted lease %x ttl=%ss", lease.id, granted.ttl)
        return lease

    async def put(self, key: str, value: bytes, lease: Lease | None = None) -> None:
        lease_id = lease.id if lease is not None else None
        await self._call(f"put {key}", lambda c: c.put(key.encode(), value, lease=lease_id))

    async def delete(self, key: str) -> None:
        await self._call(f"delete {key}", lambda c: c.delete(key.encode()))

    async def get_prefix(self, prefix: str) -> tuple[list[tuple[str, bytes]], int]:
        result = await self._call(f"get {prefix}*", lambda c: c.get_prefix(
            prefix.encode(), sort_order="ascend", sort_target="key"))
        return [(kv.key.decode(), kv.value) for kv in result], result.header.revision

    async def _store_identity(self) -> tuple[int, int]:
        """(cluster id, current revision): tells whether a reconnected store is the one we watched."""
        async def range_one(client: aetcd.Client):
            await client.connect()
            return await client.kvstub.Range(rpc.RangeRequest(key=b"\0", limit=1, count_only=True),
                                             timeout=self._op_timeout, metadata=client.metadata)
        try:
            response = await self._call("revision probe", range_one, retry=False)
        except rpc.AioRpcError as e:
            raise DiscoveryError(f"etcd revision probe failed at {self.endpoint}: {e.details()}") from e
        return response.header.cluster_id, response.header.revision

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        key = prefix.encode()
        next_revision = start_revision
        identity: int | None = None
        failures = 0
        while not self._closed:
            client = self._client
            try:
                cluster_id, revision = await self._store_identity()
                if (identity is not None and cluster_id != identity) or revision < next_revision - 1:
                    logger.warning("etcd at %s was reset (cluster %x rev %s, expected rev >= %s): "
                                   "watch of %s must restart", self.endpoint, cluster_id, revision,
                                   next_revision - 1, prefix)
                    yield WatchEvent(WatchEventKind.RESET, "")
                    return
                identity = cluster_id
                client = self._client  # the probe may have replaced it (a renewed auth token)
                watch = await client.watch_prefix(key, start_revision=next_revision)
            except aetcd.RevisionCompactedError:
                yield WatchEvent(WatchEventKind.RESET, "")
                return
            except (DiscoveryError, *_RETRYABLE) as e:
                failures += 1
                _log_retry(failures, "watch of %s cannot (re)start at %s, retry %s: %s", prefix,
                           self.endpoint, failures, e)
                await self._reselect(client)
                await asyncio.sleep(_backoff(failures))
                continue
            if failures:
                logger.info("watch of %s resumed from revision %s", prefix, next_revision)
            failures = 0
            try:
                async for event in watch:
                    kind = WatchEventKind.PUT if event.kind == aetcd.EventKind.PUT else WatchEventKind.DELETE
                    revision = event.kv.mod_revision
                    value = event.kv.value if kind == WatchEventKind.PUT else b""
                    yield WatchEvent(kind, event.kv.key.decode(), value, revision)
                    next_revision = revision + 1
            except aetcd.RevisionCompactedError:
                yield WatchEvent(WatchEventKind.RESET, "")
                return
            except Exception as e:  # aetcd passes gRPC stream errors through, not only ClientError
                failures += 1
                logger.warning("watch of %s lost its stream at %s: %s", prefix, self.endpoint, e)
                await asyncio.sleep(_backoff(failures))
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(watch.cancel(), 1.0)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for lease in list(self._leases):
            lease._stop()
        self._leases.clear()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.close(), self._op_timeout)
