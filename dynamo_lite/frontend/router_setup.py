"""Build the router named by --router-mode.

`kv` builds a KvRoutingService (router/kv_routing.py). With KV events (the default) it needs NATS: if
NATS cannot be reached at start, the frontend still serves (the router then weighs only the load it
tracks itself) and keeps connecting in the background; once connected, it subscribes and resyncs
every worker. With --no-kv-events (approximate mode) it never touches NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import CollectorRegistry

from dynamo_lite.discovery.base import Discovery
from dynamo_lite.discovery.watcher import InstanceWatcher
from dynamo_lite.events.base import EventBus
from dynamo_lite.frontend.config import FrontendConfig
from dynamo_lite.planes import connect_event_bus
from dynamo_lite.protocol.errors import ConfigError
from dynamo_lite.router.base import Router
from dynamo_lite.router.metrics import KvRouterMetrics
from dynamo_lite.router.policies import RandomRouter, RoundRobinRouter
from dynamo_lite.router.kv_routing import KvRoutingService, KvRoutingSettings
from dynamo_lite.runtime.net import default_advertise_host

logger = logging.getLogger(__name__)

NATS_CONNECT_TIMEOUT = 3.0  # per attempt
NATS_RETRY_INTERVAL = 2.0  # seconds between background attempts


async def build_router(config: FrontendConfig, watcher: InstanceWatcher, stack: contextlib.AsyncExitStack,
                       registry: CollectorRegistry | None = None) -> Router:
    """The router for config.router_mode; its cleanup goes on `stack`, its metrics on `registry`."""
    if config.router_mode == "round-robin":
        return RoundRobinRouter()
    if config.router_mode == "random":
        return RandomRouter()
    if config.router_mode == "kv":
        return await start_kv_routing(config, watcher, stack, registry)
    raise ConfigError(f"--router-mode {config.router_mode!r} is not one of round-robin, random, kv",
                      param="--router-mode")


def kv_settings(config: FrontendConfig) -> KvRoutingSettings:
    return KvRoutingSettings(namespace=config.namespace, block_size=config.kv_cache_block_size,
                             overlap_weight=config.kv_overlap_score_weight, temperature=config.router_temperature,
                             use_kv_events=config.kv_events, approx_ttl=config.router_ttl,
                             interference_weight=config.router_interference_weight)


async def start_kv_routing(config: FrontendConfig, watcher: InstanceWatcher, stack: contextlib.AsyncExitStack,
                           registry: CollectorRegistry | None = None) -> KvRoutingService:
    metrics = KvRouterMetrics(registry) if registry is not None else None
    service = KvRoutingService(watcher, kv_settings(config), metrics)
    plane = _EventPlane(service, config, watcher.discovery)
    stack.push_async_callback(plane.close)
    if not config.kv_events:
        logger.info("kv router in approximate mode (--no-kv-events): routed prefixes count as cached for %gs",
                    config.router_ttl)
        return service
    if not await plane.try_connect(first=True):
        logger.warning("event plane %s is unreachable (--event-plane, --nats-server / NATS_SERVER): the kv "
                       "router routes on load alone until it connects; retrying every %gs in the background",
                       config.event_plane_url, NATS_RETRY_INTERVAL)
        plane.retry_in_background()
    return service


class _EventPlane:
    """The kv router's NATS connection: connected at start or later in the background, closed last."""

    def __init__(self, service: KvRoutingService, config: FrontendConfig, discovery: Discovery):
        self.service = service
        self.servers = config.event_plane_url
        self._namespace = config.namespace
        self._discovery = discovery
        # Workers dial the embedded bus back: listen where the discovery store sees us (loopback on one host).
        self._advertise_host = default_advertise_host(config.discovery_url)
        self._credentials = config.credentials
        self.bus: EventBus | None = None
        self._task: asyncio.Task | None = None

    async def try_connect(self, first: bool = False) -> bool:
        try:
            self.bus = await connect_event_bus(self.servers, connect_timeout=NATS_CONNECT_TIMEOUT,
                                               name="dynamo_lite-frontend", discovery=self._discovery,
                                               namespace=self._namespace, advertise_host=self._advertise_host,
                                               credentials=self._credentials)
        except Exception as e:  # whatever the client raises, the answer is to retry later
            (logger.info if first else logger.debug)("NATS connect to %s failed: %s", self.servers, e)
            return False
        await self.service.attach_events(self.bus)
        if not first:
            logger.info("kv router: connected to NATS at %s; KV events now feed the router", self.servers)
        return True

    def retry_in_background(self) -> None:
        async def retry() -> None:
            while not await self.try_connect():
                await asyncio.sleep(NATS_RETRY_INTERVAL)

        self._task = asyncio.get_running_loop().create_task(retry(), name="kv-router-nats-connect")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.service.close()
        if self.bus is not None:
            await self.bus.close()
