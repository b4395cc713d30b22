"""Signals and graceful shutdown shared by every component.

SIGTERM/SIGINT set one asyncio.Event. main() waits on it, then runs the component's shutdown:
deregister first (so routers stop sending), drain in-flight work within a timeout, cancel the rest.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

logger = logging.getLogger(__name__)


def freeze_startup_heap() -> None:
    """Move everything allocated while starting (modules, tokenizer, templates, engine state) out of
    the garbage collector's reach, as `vllm serve` does once it is up. Otherwise every full collection
    walks that heap again while requests wait: the pauses show as the serving path's p99."""
    gc.collect()
    gc.freeze()


def install_shutdown_signals(shutdown: asyncio.Event) -> None:
    """Set `shutdown` on SIGTERM/SIGINT. A second signal exits at once (operator insists)."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if shutdown.is_set():
            logger.warning("second signal %s: exiting now", signal.Signals(signum).name)
            raise SystemExit(1)
        logger.info("received %s: shutting down", signal.Signals(signum).name)
        shutdown.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


async def drain(tasks: set[asyncio.Task], timeout: float) -> int:
    """Wait up to `timeout` s for tasks to finish, then cancel the rest. Returns how many were cancelled."""
    pending = {t for t in tasks if not t.done()}
    if pending:
        _, pending = await asyncio.wait(pending, timeout=timeout)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    return len(pending)
