"""The Router interface the frontend routes every request through.

A router picks one worker (instance id) out of the live candidates the caller passes in, and is
told about the request's progress so load-aware policies can track active work. Routers do no I/O:
the frontend feeds them worker lists (from discovery) and, for KV routing, events (from NATS).
Calls happen on the event loop thread; implementations need no locking.

Everything a caller may ask beyond `route` has a default here (nothing to explain, no block size, usage
ignored), so callers never need to know which router they hold.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

from dynamo_lite.discovery.watcher import InstanceChange, InstanceWatcher
from dynamo_lite.protocol.messages import InstanceRecord, LoadReport


@dataclass(frozen=True)
class RouteDecision:
    worker_id: int
    overlap_blocks: int = 0  # prompt blocks the router predicts are cached on that worker
    # The data-parallel rank of that worker to run on (a KV router routing a DP worker); None: the
    # engine picks one itself.
    dp_rank: int | None = None


class Router(abc.ABC):
    # True: route() weighs what each worker has cached, so RouteDecision.overlap_blocks and explain() mean
    # something. A router that does not know it leaves the choice among equals to the caller's own counts.
    knows_cache_overlap: bool = False

    @abc.abstractmethod
    def route(self, model: str, request_id: str, token_ids: Sequence[int], workers: Sequence[int]) -> RouteDecision:
        """Pick one of `workers` (non-empty, sorted ids, all serving `model`) and start tracking the request."""

    def first_token(self, request_id: str) -> None:
        """The request's prefill is done (its prompt blocks are no longer being computed)."""

    def finished(self, request_id: str) -> None:
        """The request ended, however it ended. Unknown ids are ignored."""

    def worker_added(self, record: InstanceRecord) -> None:
        """A worker appeared in discovery (or came back after a failure cooldown)."""

    def worker_removed(self, worker_id: int) -> None:
        """The worker is gone (lease ended or connection failed): forget its state at once."""

    def explain(self, model: str, token_ids: Sequence[int], workers: Sequence[int]) -> dict | None:
        """What route() would weigh for each of `workers`, without routing (for /debug/route); None: nothing."""
        return None

    def block_size(self, model: str) -> int:
        """Tokens per KV block this router hashes `model`'s prompts by; 0: it does not."""
        return 0

    def record_usage(self, model: str, prompt_tokens: int, cached_tokens: int) -> None:
        """A finished request's usage as the engine reported it (prompt tokens, of which served from cache)."""

    def load_report(self, worker_id: int) -> LoadReport | None:
        """The worker's last load report from the event plane; None: none received (or not followed)."""
        return None

    def follow(self, watcher: InstanceWatcher) -> None:
        """Hear from `watcher` about workers coming and going: the one path by which worker_added and
        worker_removed are called. Following the same watcher again changes nothing, so the app can wire
        whatever router it is given, a router built around the watcher having wired itself already."""
        if getattr(self, "_followed_watcher", None) is watcher:
            return
        self._followed_watcher = watcher
        watcher.add_listener(self._on_instance_change)
        for record in watcher.instances():
            self.worker_added(record)

    def _on_instance_change(self, kind: InstanceChange, record: InstanceRecord) -> None:
        if kind == InstanceChange.REMOVED:
            self.worker_removed(record.instance_id)
        else:
            self.worker_added(record)
