"""Host addresses and ports a component binds or advertises."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from dynamo_lite.protocol.errors import ConfigError


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (another process may still take it before it is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def default_advertise_host(endpoints: str) -> str:
    """The local address of the interface that routes to the first endpoint's host; "127.0.0.1" if
    that host is local.

    The frontend and the other workers reach the discovery store, so the interface facing it is the
    best guess for an address they can reach us on. Connecting a UDP socket only asks the kernel for a
    route: no packet is sent. `endpoints` is comma-separated ("etcd://h:2379", "http://h:2379" or
    "h:2379"). Falls back to "127.0.0.1" if the host does not resolve or no route exists.
    """
    host = _first_endpoint_host(endpoints)
    if not host or host == "localhost":
        return "127.0.0.1"
    try:
        if ipaddress.ip_address(host).is_loopback:
            return "127.0.0.1"
    except ValueError:
        pass  # a host name: resolve it below
    try:
        infos = socket.getaddrinfo(host, 2379, type=socket.SOCK_DGRAM)
    except OSError:
        return "127.0.0.1"
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect(sockaddr)
                local = probe.getsockname()[0]
        except OSError:
            continue
        if ipaddress.ip_address(local).is_loopback:
            return "127.0.0.1"
        return local
    return "127.0.0.1"


def _first_endpoint_host(endpoints: str) -> str:
    first = endpoints.split(",")[0].strip()
    if not first:
        return ""
    if "://" not in first:
        first = "//" + first  # let urlsplit parse "host:port" and "[v6]:port"
    try:
        return urlsplit(first).hostname or ""
    except ValueError:
        return ""


def require_bindable(host: str, port: int, flag: str) -> None:
    """ConfigError naming `flag` if `host:port` cannot be bound now (taken, or not an address of ours)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the servers that bind it later (asyncio, ZMQ): a port left in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot bind {host}:{port} ({e.strerror or e}): choose another port with "
                              f"{flag}", param=flag) from e
