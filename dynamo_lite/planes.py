"""Builds a component's discovery and event planes from configuration: the one place that knows which
implementation a URL names.

The scheme of the URL picks the implementation:

    discovery   etcd://host:port[,host:port]   etcd (aetcd); http://… and a bare host:port mean etcd too,
                                               so existing ETCD_ENDPOINTS values keep working
                file://DIR                     embedded: a journal in a directory on this host, no server
    event bus   nats://host:port[,…]           NATS core (nats-py); tls://… and a bare host:port mean NATS
                embedded://                    no broker: buses find each other through the component's
                                               Discovery and connect directly (events/embedded.py)

`resolve_planes` turns a component's options (--discovery, --discovery-dir, --event-plane,
--etcd-endpoints, --nats-server and their environment twins) into these two URLs; the three components'
configs call it, so they all choose the same way: etcd / NATS when their endpoints are given, the
embedded planes otherwise.

A new implementation plugs in by adding its scheme to `_DISCOVERY` or
`_EVENT_BUSES` below; callers (the worker shell's `serve_workers`, the frontend) only ever see the
`Discovery` and `EventBus` interfaces. The implementations are imported when their scheme is used, so
a process loads only the client library it needs.

This module sits above discovery/ and events/ (it imports them) and below engine/ and frontend/.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from dynamo_lite.discovery.base import Discovery
from dynamo_lite.events.base import EventBus
from dynamo_lite.protocol.errors import ConfigError
from dynamo_lite.runtime.config import option
from dynamo_lite.transport.auth import MIN_SECRET_BYTES, PlaneAuth, plane_auth

DISCOVERY_FLAG = "--etcd-endpoints"
EVENT_BUS_FLAG = "--nats-server"
DEFAULT_EVENT_BUS_CONNECT_TIMEOUT = 5.0
DEFAULT_ETCD_ENDPOINTS = "http://127.0.0.1:2379"  # --discovery etcd without --etcd-endpoints
DEFAULT_NATS_SERVER = "nats://127.0.0.1:4222"  # --event-plane nats without --nats-server
DISCOVERY_KINDS = ["etcd", "embedded"]
EVENT_PLANE_KINDS = ["nats", "embedded"]
EMBEDDED_EVENT_PLANE_URL = "embedded://"


async def _etcd(url: str, connect_wait: float | None, credentials: PlaneCredentials) -> Discovery:
    from dynamo_lite.discovery.etcd import EtcdDiscovery, EtcdSecurity

    c = credentials
    security = EtcdSecurity(ca_file=c.etcd_ca_file, cert_file=c.etcd_cert_file, key_file=c.etcd_key_file,
                            user=c.etcd_user, password=c.etcd_password)
    if connect_wait is None:
        return await EtcdDiscovery.connect(url, security=security)
    return await EtcdDiscovery.connect(url, wait=connect_wait, security=security)


async def _file(url: str, connect_wait: float | None, credentials: PlaneCredentials) -> Discovery:
    from dynamo_lite.discovery.embedded import EmbeddedDiscovery

    return await EmbeddedDiscovery.open(url.split("://", 1)[1])


@dataclass(frozen=True)
class EventBusOptions:
    """What connect_event_bus passes to an implementation; each takes what it needs."""

    name: str | None
    connect_timeout: float
    flag: str
    discovery: Discovery | None  # the component's own (embedded://); NATS ignores it
    namespace: str  # embedded://: buses of one namespace find each other
    advertise_host: str  # embedded://: the address this bus listens on and others dial
    credentials: PlaneCredentials  # embedded://: the plane secret; nats://: the NATS credentials


async def _nats(url: str, options: EventBusOptions) -> EventBus:
    from dynamo_lite.events.nats import NatsEventBus

    c = options.credentials
    return await NatsEventBus.connect(url, connect_timeout=options.connect_timeout, name=options.name,
                                      token=c.nats_token, user=c.nats_user, password=c.nats_password,
                                      creds_file=c.nats_creds_file, ca_file=c.nats_ca_file)


async def _embedded(url: str, options: EventBusOptions) -> EventBus:
    from dynamo_lite.events.embedded import EmbeddedEventBus

    if options.discovery is None:
        raise ConfigError(f"{options.flag} {url}: the embedded event plane needs the component's discovery "
                          "(connect_event_bus(..., discovery=...))", param=options.flag)
    return await asyncio.wait_for(
        EmbeddedEventBus.connect(options.discovery, namespace=options.namespace, host=options.advertise_host,
                                 name=options.name, auth=options.credentials.events_auth()),
        options.connect_timeout)


# scheme -> connect function; "" is a bare host:port.
_DISCOVERY: dict[str, Callable[[str, float | None, PlaneCredentials], Awaitable[Discovery]]] = {
    "etcd": _etcd, "http": _etcd, "https": _etcd, "": _etcd, "file": _file}
_EVENT_BUSES: dict[str, Callable[[str, EventBusOptions], Awaitable[EventBus]]] = {
    "nats": _nats, "tls": _nats, "": _nats, "embedded": _embedded}


def default_discovery_dir(env: Mapping[str, str] = os.environ) -> str:
    """Where embedded discovery lives unless --discovery-dir says otherwise: private to this user."""
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], "dynamo_lite")
    return f"/tmp/dynamo_lite-{os.getuid()}"


def resolve_planes(discovery: str, discovery_dir: str, event_plane: str, etcd_endpoints: str,
                   nats_server: str, env: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """(discovery url, event plane url) for a component's options (no I/O).

    `discovery` is "etcd", "embedded" or "" (etcd if `etcd_endpoints` is given, else embedded);
    `event_plane` likewise "nats", "embedded" or "" (nats if `nats_server` is given). Endpoints are
    "given" when non-empty: the configs default them to "" so that a flag or ETCD_ENDPOINTS / NATS_SERVER
    is what selects etcd / NATS. ConfigError naming the flag for an unknown kind or URL.
    """
    discovery = discovery.strip() or ("etcd" if etcd_endpoints.strip() else "embedded")
    if discovery not in DISCOVERY_KINDS:
        raise ConfigError(f"--discovery {discovery!r} is not one of {', '.join(DISCOVERY_KINDS)}",
                          param="--discovery")
    if discovery == "etcd":
        discovery_url = etcd_endpoints.strip() or DEFAULT_ETCD_ENDPOINTS
        if url_scheme(discovery_url, _DISCOVERY, DISCOVERY_FLAG) == "file":
            raise ConfigError(f"--etcd-endpoints {discovery_url!r} is a directory: use --discovery embedded "
                              "--discovery-dir DIR", param=DISCOVERY_FLAG)
    else:
        directory = discovery_dir.strip() or default_discovery_dir(env)
        discovery_url = "file://" + os.path.abspath(os.path.expanduser(directory))
    event_plane = event_plane.strip() or ("nats" if nats_server.strip() else "embedded")
    if event_plane not in EVENT_PLANE_KINDS:
        raise ConfigError(f"--event-plane {event_plane!r} is not one of {', '.join(EVENT_PLANE_KINDS)}",
                          param="--event-plane")
    if event_plane == "nats":
        event_plane_url = nats_server.strip() or DEFAULT_NATS_SERVER
        if url_scheme(event_plane_url, _EVENT_BUSES, EVENT_BUS_FLAG) == "embedded":
            raise ConfigError("--nats-server embedded:// is not a NATS server: use --event-plane embedded",
                              param=EVENT_BUS_FLAG)
    else:
        event_plane_url = EMBEDDED_EVENT_PLANE_URL
    return discovery_url, event_plane_url


PLANE_SECRET_ENV = "DYN_PLANE_SECRET"
# PlaneOptions' security fields: every component of a deployment takes them (serve passes them to all).
SECURITY_FIELDS = ("plane_secret_file", "etcd_ca_file", "etcd_cert_file", "etcd_key_file", "etcd_user",
                   "etcd_password_file", "nats_token_file", "nats_user", "nats_password_file",
                   "nats_creds_file", "nats_ca_file")


@dataclass(frozen=True)
class PlaneCredentials:
    """What a component proves itself with on each plane, read once from the files its options name.
    Empty everywhere: no authentication (the planes as they were)."""

    plane_secret: bytes = field(default=b"", repr=False)  # request plane and embedded event plane
    etcd_ca_file: str = ""
    etcd_cert_file: str = ""
    etcd_key_file: str = ""
    etcd_user: str = ""
    etcd_password: str = field(default="", repr=False)
    nats_token: str = field(default="", repr=False)
    nats_user: str = ""
    nats_password: str = field(default="", repr=False)
    nats_creds_file: str = ""
    nats_ca_file: str = ""

    def request_auth(self) -> PlaneAuth | None:
        """The request plane's handshake (transport/auth.py), or None without a secret."""
        return plane_auth(self.plane_secret, "request")

    def events_auth(self) -> PlaneAuth | None:
        """The embedded event plane's handshake, or None without a secret."""
        return plane_auth(self.plane_secret, "events")


def read_secret_file(path: str, flag: str) -> str:
    """A secret file's text without surrounding whitespace (a trailing newline is no part of it);
    ConfigError naming `flag` when it cannot be read or is empty."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{flag} {path}: cannot read it ({getattr(e, 'strerror', None) or e})",
                          param=flag) from e
    if not text:
        raise ConfigError(f"{flag} {path}: the file is empty", param=flag)
    return text


def _plane_secret(options: PlaneOptions, env: Mapping[str, str]) -> bytes:
    if options.plane_secret_file:
        where = "--plane-secret-file"
        secret = read_secret_file(options.plane_secret_file, where)
    else:
        secret, where = env.get(PLANE_SECRET_ENV, "").strip(), PLANE_SECRET_ENV
    if secret and len(secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(f"{where}: the plane secret is {len(secret.encode())} bytes; use at least "
                          f"{MIN_SECRET_BYTES} (e.g. `openssl rand -hex 32`)", param="--plane-secret-file")
    return secret.encode()


def resolve_credentials(options: PlaneOptions, env: Mapping[str, str] = os.environ) -> PlaneCredentials:
    """The credentials a component's options name (reads the files; ConfigError naming the flag)."""
    def secret(path: str, flag: str) -> str:
        return read_secret_file(path, flag) if path else ""

    def readable(path: str, flag: str) -> str:
        if path and not os.access(os.path.expanduser(path), os.R_OK):
            raise ConfigError(f"{flag} {path}: cannot read it", param=flag)
        return os.path.expanduser(path)

    def pair(first: str, first_flag: str, second: str, second_flag: str) -> None:
        if bool(first) != bool(second):
            given, missing = (first_flag, second_flag) if first else (second_flag, first_flag)
            raise ConfigError(f"{given} needs {missing} too", param=missing)

    o = options
    pair(o.etcd_cert_file, "--etcd-cert-file", o.etcd_key_file, "--etcd-key-file")
    pair(o.etcd_user, "--etcd-user", o.etcd_password_file, "--etcd-password-file")
    pair(o.nats_user, "--nats-user", o.nats_password_file, "--nats-password-file")
    if sum(map(bool, (o.nats_token_file, o.nats_user, o.nats_creds_file))) > 1:
        raise ConfigError("--nats-token-file, --nats-user and --nats-creds-file exclude each other (a NATS "
                          "server authorizes one way)", param="--nats-token-file")
    return PlaneCredentials(
        plane_secret=_plane_secret(o, env),
        etcd_ca_file=readable(o.etcd_ca_file, "--etcd-ca-file"),
        etcd_cert_file=readable(o.etcd_cert_file, "--etcd-cert-file"),
        etcd_key_file=readable(o.etcd_key_file, "--etcd-key-file"), etcd_user=o.etcd_user,
        etcd_password=secret(o.etcd_password_file, "--etcd-password-file"),
        nats_token=secret(o.nats_token_file, "--nats-token-file"), nats_user=o.nats_user,
        nats_password=secret(o.nats_password_file, "--nats-password-file"),
        nats_creds_file=readable(o.nats_creds_file, "--nats-creds-file"),
        nats_ca_file=readable(o.nats_ca_file, "--nats-ca-file"))


@dataclass(frozen=True)
class PlaneOptions:
    """The options every component (frontend, vLLM worker, mocker) chooses its planes with; a component's
    config extends this and calls `_resolve_planes()` from its __post_init__."""

    discovery: str = option("", "Discovery backend: etcd or embedded (a directory on this host, no server). "
                            "Default: etcd if --etcd-endpoints / ETCD_ENDPOINTS is given, else embedded.",
                            choices=DISCOVERY_KINDS)
    discovery_dir: str = option("", "Embedded discovery: the directory the components of one deployment "
                                "share (default: $XDG_RUNTIME_DIR/dynamo_lite, else /tmp/dynamo_lite-$UID).")
    event_plane: str = option("", "Event plane for KV events and load reports: nats or embedded (no "
                              "broker). Default: nats if --nats-server / NATS_SERVER is given, else "
                              "embedded.",
                              choices=EVENT_PLANE_KINDS)
    etcd_endpoints: str = option("", "etcd endpoints, comma-separated (etcd://host:port, http://host:port or "
                                 f"host:port); giving them selects etcd discovery ({DEFAULT_ETCD_ENDPOINTS} "
                                 "with --discovery etcd alone).", env="ETCD_ENDPOINTS")
    nats_server: str = option("", "NATS server URL (nats://host:port or host:port); giving it selects the "
                              f"NATS event plane ({DEFAULT_NATS_SERVER} with --event-plane nats alone).",
                              env="NATS_SERVER")
    # Security of the planes (docs/security.md): files, so that no secret shows in `ps` or --help.
    plane_secret_file: str = option("", "File holding the secret shared by every component of the "
                                    "deployment: request-plane and embedded event-plane connections must "
                                    "prove it (HMAC challenge-response; DYN_PLANE_SECRET gives it directly). "
                                    "None: those ports accept anyone who reaches them.")
    etcd_ca_file: str = option("", "etcd over TLS: the CA (PEM) that signed etcd's certificate (https:// "
                               "endpoints without it trust the system CAs).", env="ETCD_CA_FILE")
    etcd_cert_file: str = option("", "etcd over TLS: this component's client certificate (PEM), for an etcd "
                                 "started with --client-cert-auth.", env="ETCD_CERT_FILE")
    etcd_key_file: str = option("", "etcd over TLS: the private key (PEM) of --etcd-cert-file.",
                                env="ETCD_KEY_FILE")
    etcd_user: str = option("", "etcd user (etcd with auth enabled), with --etcd-password-file.",
                            env="ETCD_USER")
    etcd_password_file: str = option("", "File holding the password of --etcd-user.",
                                     env="ETCD_PASSWORD_FILE")
    nats_token_file: str = option("", "File holding the token of a NATS server with token authorization.",
                                  env="NATS_TOKEN_FILE")
    nats_user: str = option("", "NATS user (a server with user/password authorization), with "
                            "--nats-password-file.", env="NATS_USER")
    nats_password_file: str = option("", "File holding the password of --nats-user.",
                                     env="NATS_PASSWORD_FILE")
    nats_creds_file: str = option("", "NATS credentials file (JWT + NKey seed, as `nsc` writes it).",
                                  env="NATS_CREDS_FILE")
    nats_ca_file: str = option("", "NATS over TLS: the CA (PEM) that signed the server's certificate "
                               "(tls:// URLs without it trust the system CAs).", env="NATS_CA_FILE")
    # Set by _resolve_planes(): what connect_discovery / connect_event_bus are given.
    discovery_url: str = field(default="", init=False)
    event_plane_url: str = field(default="", init=False)
    credentials: PlaneCredentials = field(default=None, init=False, repr=False)  # type: ignore[assignment]

    def _resolve_planes(self, env: Mapping[str, str] = os.environ) -> None:
        discovery_url, event_plane_url = resolve_planes(self.discovery, self.discovery_dir, self.event_plane,
                                                        self.etcd_endpoints, self.nats_server)
        object.__setattr__(self, "discovery_url", discovery_url)  # the config is frozen
        object.__setattr__(self, "event_plane_url", event_plane_url)
        object.__setattr__(self, "credentials", resolve_credentials(self, env))


def announce_planes(role: str, namespace: str, discovery_url: str, event_plane_url: str | None,
                    env: Mapping[str, str] = os.environ):
    """An async context manager: this process's presence record (runtime/presence.py) in the default
    embedded directory, checked against the other components' while the block runs, so that a frontend
    and a worker on different planes both log it within seconds."""
    from dynamo_lite.runtime import presence

    record = presence.own_record(str(role), namespace, discovery_kind(discovery_url), discovery_url,
                                 event_plane_kind(event_plane_url), event_plane_url or "")
    return presence.presence(os.path.join(default_discovery_dir(env), "presence"), record)


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) is this host only: its ports need no authentication."""
    if host.strip("[]") == "localhost" or host.startswith("localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def discovery_kind(url: str) -> str:
    """"etcd" or "embedded": what a discovery URL names (for logs and the presence check)."""
    return "embedded" if url_scheme(url, _DISCOVERY, DISCOVERY_FLAG) == "file" else "etcd"


def event_plane_kind(url: str | None) -> str:
    """"nats", "embedded", or "none" for an empty URL."""
    if not url:
        return "none"
    return "embedded" if url_scheme(url, _EVENT_BUSES, EVENT_BUS_FLAG) == "embedded" else "nats"


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


async def connect_discovery(url: str, *, flag: str = DISCOVERY_FLAG, connect_wait: float | None = None,
                            credentials: PlaneCredentials | None = None) -> Discovery:
    """The Discovery `url` names, connected. `connect_wait`: how long to wait for the store to answer
    (None: the implementation's default). `credentials`: the component's (etcd TLS and user). ConfigError
    naming `flag` for an unknown scheme; the implementation's TransportError when it cannot connect."""
    connect = _DISCOVERY[url_scheme(url, _DISCOVERY, flag)]
    return await connect(url, connect_wait, credentials or PlaneCredentials())


async def connect_event_bus(url: str, *, name: str | None = None,
                            connect_timeout: float = DEFAULT_EVENT_BUS_CONNECT_TIMEOUT,
                            flag: str = EVENT_BUS_FLAG, discovery: Discovery | None = None,
                            namespace: str = "dynamo", advertise_host: str = "127.0.0.1",
                            credentials: PlaneCredentials | None = None) -> EventBus:
    """The EventBus `url` names, connected within `connect_timeout` seconds. `name` identifies this
    client (monitoring, logs). `discovery`, `namespace` and `advertise_host` are the component's: the
    embedded bus registers and finds its peers there (NATS ignores them). `credentials`: the component's
    (PlaneOptions.credentials; None: none). ConfigError naming `flag` for an unknown scheme; the
    implementation's TransportError when it cannot connect."""
    connect = _EVENT_BUSES[url_scheme(url, _EVENT_BUSES, flag)]
    return await connect(url, EventBusOptions(name=name, connect_timeout=connect_timeout, flag=flag,
                                              discovery=discovery, namespace=namespace,
                                              advertise_host=advertise_host,
                                              credentials=credentials or PlaneCredentials()))
