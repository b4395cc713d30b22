"""Builds a component's discovery and event planes from configuration: the one place that knows which
implementation a URL names.

The scheme of the URL picks the implementation:

    discovery   etcd://host:port[,host:port]   etcd (aetcd); http://… and a bare host:port mean etcd too,
                                               so existing ETCD_ENDPOINTS values keep working
    event bus   nats://host:port[,…]           NATS core (nats-py); tls://… and a bare host:port mean NATS
                embedded://                    no broker: buses find each other through the component's
                                               Discovery and connect directly (events/embedded.py)

A new implementation plugs in by adding its scheme to `_DISCOVERY` or
`_EVENT_BUSES` below; callers (the worker shell's `serve_workers`, the frontend) only ever see the
`Discovery` and `EventBus` interfaces. The implementations are imported when their scheme is used, so
a process loads only the client library it needs.

This module sits above discovery/ and events/ (it imports them) and below engine/ and frontend/.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from dynamo_lite.discovery.base import Discovery
from dynamo_lite.events.base import EventBus
from dynamo_lite.protocol.errors import ConfigError

DISCOVERY_FLAG = "--etcd-endpoints"
EVENT_BUS_FLAG = "--nats-server"
DEFAULT_EVENT_BUS_CONNECT_TIMEOUT = 5.0


async def _etcd(url: str, connect_wait: float | None) -> Discovery:
    from dynamo_lite.discovery.etcd import EtcdDiscovery

    if connect_wait is None:
        return await EtcdDiscovery.connect(url)
    return await EtcdDiscovery.connect(url, wait=connect_wait)


@dataclass(frozen=True)
class EventBusOptions:
    """What connect_event_bus passes to an implementation; each takes what it needs."""

    name: str | None
    connect_timeout: float
    flag: str
    discovery: Discovery | None  # the component's own (embedded://); NATS ignores it
    namespace: str  # embedded://: buses of one namespace find each other
    advertise_host: str  # embedded://: the address this bus listens on and others dial


async def _nats(url: str, options: EventBusOptions) -> EventBus:
    from dynamo_lite.events.nats import NatsEventBus

    return await NatsEventBus.connect(url, connect_timeout=options.connect_timeout, name=options.name)


async def _embedded(url: str, options: EventBusOptions) -> EventBus:
    from dynamo_lite.events.embedded import EmbeddedEventBus

    if options.discovery is None:
        raise ConfigError(f"{options.flag} {url}: the embedded event plane needs the component's discovery "
                          "(connect_event_bus(..., discovery=...))", param=options.flag)
    return await asyncio.wait_for(
        EmbeddedEventBus.connect(options.discovery, namespace=options.namespace, host=options.advertise_host,
                                 name=options.name), options.connect_timeout)


# scheme -> connect function; "" is a bare host:port.
_DISCOVERY: dict[str, Callable[[str, float | None], Awaitable[Discovery]]] = {
    "etcd": _etcd, "http": _etcd, "": _etcd}
_EVENT_BUSES: dict[str, Callable[[str, EventBusOptions], Awaitable[EventBus]]] = {
    "nats": _nats, "tls": _nats, "": _nats, "embedded": _embedded}


def url_scheme(url: str, known: dict[str, object], flag: str) -> str:
    """The scheme every comma-separated item of `url` shares ("" for bare host:port items).

    ConfigError naming `flag` when the url is empty, a scheme is unknown, or items mix backends.
    """
    items = [item.strip() for item in url.split(",") if item.strip()]
    if not items:
        raise ConfigError(f"{flag} is empty", param=flag)
    schemes = set()
    for item in items:
        scheme = item.split("://", 1)[0].lower() if "://" in item else ""
        if scheme not in known:
            names = ", ".join(f"{s}://" for s in known if s)
            raise ConfigError(f"{flag} {item!r}: unknown scheme {scheme + '://'!r} (use one of {names}, "
                              "or host:port)", param=flag)
        schemes.add(scheme)
    backends = {known[s] for s in schemes}
    if len(backends) > 1:
        raise ConfigError(f"{flag} {url!r} mixes schemes of different backends", param=flag)
    return next(iter(schemes))


def check_discovery_url(url: str, flag: str = DISCOVERY_FLAG) -> None:
    """Raise ConfigError naming `flag` unless `url` names a known discovery implementation (no I/O)."""
    url_scheme(url, _DISCOVERY, flag)


def check_event_bus_url(url: str, flag: str = EVENT_BUS_FLAG) -> None:
    """Raise ConfigError naming `flag` unless `url` names a known event-bus implementation (no I/O)."""
    url_scheme(url, _EVENT_BUSES, flag)


async def connect_discovery(url: str, *, flag: str = DISCOVERY_FLAG,
                            connect_wait: float | None = None) -> Discovery:
    """The Discovery `url` names, connected. `connect_wait`: how long to wait for the store to answer
    (None: the implementation's default). ConfigError naming `flag` for an unknown scheme; the
    implementation's TransportError when it cannot connect."""
    connect = _DISCOVERY[url_scheme(url, _DISCOVERY, flag)]
    return await connect(url, connect_wait)


async def connect_event_bus(url: str, *, name: str | None = None,
                            connect_timeout: float = DEFAULT_EVENT_BUS_CONNECT_TIMEOUT,
                            flag: str = EVENT_BUS_FLAG, discovery: Discovery | None = None,
                            namespace: str = "dynamo", advertise_host: str = "127.0.0.1") -> EventBus:
    """The EventBus `url` names, connected within `connect_timeout` seconds. `name` identifies this
    client (monitoring, logs). `discovery`, `namespace` and `advertise_host` are the component's: the
    embedded bus registers and finds its peers there (NATS ignores them). ConfigError naming `flag` for
    an unknown scheme; the implementation's TransportError when it cannot connect."""
    connect = _EVENT_BUSES[url_scheme(url, _EVENT_BUSES, flag)]
    return await connect(url, EventBusOptions(name=name, connect_timeout=connect_timeout, flag=flag,
                                              discovery=discovery, namespace=namespace,
                                              advertise_host=advertise_host))
