"""PrefixFollower: keep a listener's copy of every key under a discovery prefix up to date.

The same snapshot + watch as InstanceWatcher (watcher.py), for any prefix: read the prefix once, then
watch from the next revision, so nothing is missed or repeated; on a watch RESET, read it again and
report only the differences. The listener is told `on_put(key, value)` and `on_delete(key)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from dynamo_lite.discovery.base import Discovery, WatchEventKind

logger = logging.getLogger(__name__)

MAX_RELIST_BACKOFF = 2.0


class PrefixFollower:
    def __init__(self, discovery: Discovery, prefix: str, on_put: Callable[[str, bytes], None],
                 on_delete: Callable[[str], None]):
        self._discovery = discovery
        self._prefix = prefix
        self._on_put = on_put
        self._on_delete = on_delete
        self._values: dict[str, bytes] = {}
        self._task: asyncio.Task | None = None
        self._closed = False

    def keys(self) -> list[str]:
        return sorted(self._values)

    async def start(self) -> None:
        """Report the snapshot (errors propagate), then follow changes in a background task."""
        revision = await self._relist()
        self._task = asyncio.get_running_loop().create_task(self._follow(revision),
                                                            name=f"follow {self._prefix}")

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _follow(self, revision: int) -> None:
        while not self._closed:
            reset = False
            try:
                watch = self._discovery.watch_prefix(self._prefix, revision)
                async with contextlib.aclosing(watch) as events:
                    async for event in events:
                        if event.kind == WatchEventKind.RESET:
                            reset = True
                            break
                        if event.kind == WatchEventKind.PUT:
                            self._put(event.key, event.value)
                        else:
                            self._delete(event.key)
                        revision = event.revision + 1
            except Exception:  # a Discovery should not raise here; re-reading is the safe answer
                logger.exception("watch of %s failed; re-reading it", self._prefix)
                reset = True
            if not reset:
                return  # discovery closed
            logger.warning("watch of %s was reset; re-reading it", self._prefix)
            revision = await self._relist_until_done()

    async def _relist_until_done(self) -> int:
        attempt = 0
        while True:
            try:
                return await self._relist()
            except Exception as e:
                attempt += 1
                delay = min(MAX_RELIST_BACKOFF, 0.1 * 2 ** min(attempt, 5))
                logger.warning("re-reading %s failed (attempt %s), retrying in %.1fs: %s", self._prefix,
                               attempt, delay, e)
                await asyncio.sleep(delay)

    async def _relist(self) -> int:
        items, revision = await self._discovery.get_prefix(self._prefix)
        present = dict(items)
        for key in [k for k in self._values if k not in present]:
            self._delete(key)
        for key, value in items:
            self._put(key, value)
        return revision + 1

    def _put(self, key: str, value: bytes) -> None:
        if self._values.get(key) == value:
            return
        self._values[key] = value
        self._call(self._on_put, key, value)

    def _delete(self, key: str) -> None:
        if self._values.pop(key, None) is not None:
            self._call(self._on_delete, key)

    @staticmethod
    def _call(callback: Callable, *args: object) -> None:
        try:
            callback(*args)
        except Exception:
            logger.exception("listener %r failed on %s", callback, args[0])
