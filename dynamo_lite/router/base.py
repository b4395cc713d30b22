"""The Router interface the frontend routes every request through.

A router picks one worker (instance id) out of the live candidates the caller passes in, and is
told about the request's progress so load-aware policies can track active work. Routers do no I/O:
the frontend feeds them worker lists (from discovery) and, for KV routing, events (from NATS).
Calls happen on the event loop thread; implementations need no locking.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RouteDecision:
    worker_id: int
    overlap_blocks: int = 0  # prompt blocks the router predicts are cached on that worker


class Router(abc.ABC):
    @abc.abstractmethod
    def route(self, request_id: str, token_ids: Sequence[int], workers: Sequence[int]) -> RouteDecision:
        """Pick one of `workers` (non-empty, sorted ids) for the request and start tracking it."""

    def first_token(self, request_id: str) -> None:
        """The request's prefill is done (its prompt blocks are no longer being computed)."""

    def finished(self, request_id: str) -> None:
        """The request ended, however it ended. Unknown ids are ignored."""

    def worker_removed(self, worker_id: int) -> None:
        """The worker is gone (lease ended or connection failed): forget its state at once."""
