"""`python -m dynamo_lite.frontend`: the OpenAI-compatible HTTP edge.

Connects to etcd, watches the workers, and serves HTTP with uvicorn (uvloop + httptools, one
process, no access log). SIGTERM/SIGINT stop accepting, let in-flight requests finish (bounded by
uvicorn's graceful timeout), then close the watcher, the worker connections and etcd.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import socket
import ssl
import sys

import uvicorn
import uvloop
from prometheus_client import CollectorRegistry

from dynamo_lite.discovery.etcd import DEFAULT_CONNECT_WAIT
from dynamo_lite.discovery.watcher import InstanceWatcher
from dynamo_lite.frontend.app import FrontendDeps, create_app
from dynamo_lite.frontend.config import FrontendConfig
from dynamo_lite.frontend.http_limits import http_protocol
from dynamo_lite.frontend.router_setup import build_router
from dynamo_lite.planes import announce_planes, connect_discovery, discovery_kind
from dynamo_lite.presets import PRESET_HELP, apply_frontend_preset
from dynamo_lite.runtime.presence import FRONTEND
from dynamo_lite.protocol.errors import ConfigError
from dynamo_lite.protocol.messages import InstanceRecord
from dynamo_lite.runtime.config import add_config_arguments, config_from_args, env_name, flag_name
from dynamo_lite.runtime.lifecycle import freeze_startup_heap, install_shutdown_signals
from dynamo_lite.runtime.logging import configure_logging
from dynamo_lite.transport.client import RequestClient

logger = logging.getLogger("dynamo_lite.frontend")

# etcd may come up after the frontend: connect() waits for it, then the first read and watch follow.
ETCD_CONNECT_TIMEOUT = DEFAULT_CONNECT_WAIT + 10.0
GRACEFUL_TIMEOUT = 30  # seconds uvicorn waits for in-flight requests on shutdown


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: runtime.lifecycle owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class EtcdUnreachable(Exception):
    pass


async def _connect_discovery(config: FrontendConfig, stack: contextlib.AsyncExitStack,
                             client: RequestClient) -> InstanceWatcher:
    # A failed worker is routed to again only once it answers a stats request (a hung one stays out).
    probe_timeout = config.heartbeat_timeout or config.connect_timeout

    async def answers(record: InstanceRecord) -> bool:
        return await client.answers(record.address, probe_timeout)

    try:
        async with asyncio.timeout(ETCD_CONNECT_TIMEOUT):
            discovery = await connect_discovery(config.discovery_url, credentials=config.credentials)
            stack.push_async_callback(discovery.close)
            watcher = InstanceWatcher(discovery, config.namespace, failed_cooldown=config.failed_cooldown,
                                      probe=answers)
            await watcher.start()
            stack.push_async_callback(watcher.close)
            return watcher
    except Exception as e:  # whatever the client raises, the operator needs the same hint
        if discovery_kind(config.discovery_url) == "etcd":
            where = f"reach etcd at {config.discovery_url} (--etcd-endpoints / ETCD_ENDPOINTS)"
        else:
            where = f"open embedded discovery at {config.discovery_url} (--discovery-dir / DYN_DISCOVERY_DIR)"
        raise EtcdUnreachable(f"cannot {where}: {type(e).__name__}: {e}") from e


def _names(field_name: str) -> str:
    """'--http-port / DYN_HTTP_PORT': the flag and environment twin that set a FrontendConfig field."""
    field = next(f for f in dataclasses.fields(FrontendConfig) if f.name == field_name)
    return f"{flag_name(field)} / {env_name(field)}"


def bind_http_sockets(host: str, port: int) -> list[socket.socket]:
    """The HTTP server's sockets, bound (not yet listening) the way asyncio's create_server binds them.

    Bound here, before anything else starts, so a taken port is one clear ConfigError at once instead of
    uvicorn's sys.exit(3) from inside its serving task (a traceback, after the etcd connection).
    Connections are refused until uvicorn listens on them, as they were before the port was bound.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"cannot resolve the HTTP address {host!r} ({e.strerror}): set it with "
                          f"{_names('http_host')}", param="--http-host") from e
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):  # getaddrinfo may repeat an address
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio does
            sock.bind(address)
    except OSError as e:
        for sock in sockets:
            sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"the HTTP port {host}:{port} is already in use: choose another with "
                              f"{_names('http_port')}", param="--http-port") from e
        raise ConfigError(f"cannot bind the HTTP server to {host}:{port}: {e.strerror}: set the address with "
                          f"{_names('http_host')} and the port with {_names('http_port')}",
                          param="--http-port") from e
    return sockets


def check_tls_files(config: FrontendConfig) -> None:
    """Load --tls-cert-file / --tls-key-file once before anything starts, so that a missing file or a key
    that does not match is one clear ConfigError, not an ssl traceback from inside uvicorn's startup."""
    if not config.tls_cert_file:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(config.tls_cert_file,
                                                                            config.tls_key_file)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot serve HTTPS with --tls-cert-file {config.tls_cert_file} and --tls-key-file "
                          f"{config.tls_key_file}: {getattr(e, 'strerror', None) or e}",
                          param="--tls-cert-file") from e


async def serve(config: FrontendConfig) -> None:
    shutdown = asyncio.Event()
    install_shutdown_signals(shutdown)
    async with contextlib.AsyncExitStack() as stack:
        check_tls_files(config)
        sockets = bind_http_sockets(config.http_host, config.http_port)
        for sock in sockets:
            stack.callback(sock.close)
        # Before connecting: a worker on other planes is reported even while etcd is awaited.
        await stack.enter_async_context(announce_planes(FRONTEND, config.namespace, config.discovery_url,
                                                        config.event_plane_url))
        client = RequestClient(connect_timeout=config.connect_timeout,
                               auth=config.credentials.request_auth())
        stack.push_async_callback(client.close)
        watcher = await _connect_discovery(config, stack, client)
        registry = CollectorRegistry()
        router = await build_router(config, watcher, stack, registry)
        app = create_app(FrontendDeps(watcher=watcher, client=client, router=router,
                                      registry=registry, config=config))
        server = _Server(uvicorn.Config(app, host=config.http_host, port=config.http_port, loop="uvloop",
                                        http=http_protocol(config.header_read_timeout), access_log=False, lifespan="off",
                                        log_level=config.log_level.lower(),
                                        timeout_graceful_shutdown=GRACEFUL_TIMEOUT,
                                        ssl_certfile=config.tls_cert_file or None,
                                        ssl_keyfile=config.tls_key_file or None))
        logger.info("serving %s on %s:%d", "HTTPS" if config.tls_cert_file else "HTTP", config.http_host,
                    config.http_port)
        if config.api_key:
            logger.info("API key required on /v1 (%d key(s) configured)", len(config.api_key))
        freeze_startup_heap()
        serving = asyncio.create_task(server.serve(sockets=sockets))
        stopping = asyncio.create_task(shutdown.wait())
        await asyncio.wait((serving, stopping), return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        stopping.cancel()
        await serving  # re-raises if uvicorn failed
        if not server.started and not shutdown.is_set():
            raise ConfigError(f"HTTP server could not start on {config.http_host}:{config.http_port}",
                              param="--http-port")
    logger.info("frontend stopped")


def parse_config(argv: list[str] | None = None) -> FrontendConfig:
    parser = argparse.ArgumentParser(prog="python -m dynamo_lite.frontend",
                                     description="dynamo_lite OpenAI-compatible frontend")
    add_config_arguments(parser, FrontendConfig)
    parser.add_argument("--preset", metavar="NAME", default=None, help=PRESET_HELP)  # expanded before parsing
    # The preset's parsers and thresholds, where the command line gives none (presets.py).
    argv = apply_frontend_preset(sys.argv[1:] if argv is None else argv, os.environ)
    config = config_from_args(FrontendConfig, parser.parse_args(argv))
    # The planes' URLs were checked when the config was built (planes.resolve_planes): an unknown scheme
    # is a usage error, not an unreachable server.
    return config


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_config(argv)
    except ConfigError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    configure_logging("frontend", config.log_level)
    try:
        uvloop.run(serve(config))
    except EtcdUnreachable as e:
        logger.error("%s", e)
        return 1
    except ConfigError as e:
        logger.error("%s", e.message)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
