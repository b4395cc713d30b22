"""Build the router named by --router-mode.

The kv router lives in dynamo_lite.router.kv_router (it needs the event plane). Its module is
expected to provide `async def start_frontend_router(config, watcher, stack) -> Router`, which
connects what it needs and registers its cleanup on the AsyncExitStack. Until that module exists,
--router-mode kv falls back to round-robin with an error in the log.
"""

from __future__ import annotations

import contextlib
import importlib
import logging

from dynamo_lite.discovery.watcher import InstanceWatcher
from dynamo_lite.frontend.config import FrontendConfig
from dynamo_lite.protocol.errors import ConfigError
from dynamo_lite.router.base import Router
from dynamo_lite.router.policies import RandomRouter, RoundRobinRouter

logger = logging.getLogger(__name__)

KV_ROUTER_MODULE = "dynamo_lite.router.kv_router"


async def build_router(config: FrontendConfig, watcher: InstanceWatcher,
                       stack: contextlib.AsyncExitStack) -> Router:
    if config.router_mode == "round-robin":
        return RoundRobinRouter()
    if config.router_mode == "random":
        return RandomRouter()
    if config.router_mode == "kv":
        try:
            module = importlib.import_module(KV_ROUTER_MODULE)
        except ModuleNotFoundError as e:
            if e.name != KV_ROUTER_MODULE:
                raise  # the module exists but one of its imports is missing: a real error
            logger.error("kv router not available (%s is missing): falling back to round-robin",
                         KV_ROUTER_MODULE)
            return RoundRobinRouter()
        start = getattr(module, "start_frontend_router", None)
        if start is None:
            logger.error("kv router not available (%s has no start_frontend_router): "
                         "falling back to round-robin", KV_ROUTER_MODULE)
            return RoundRobinRouter()
        return await start(config, watcher, stack)
    raise ConfigError(f"--router-mode {config.router_mode!r} is not one of round-robin, random, kv",
                      param="--router-mode")
