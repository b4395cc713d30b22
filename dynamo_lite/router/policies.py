"""Stateless routing policies: round-robin and random."""

from __future__ import annotations

import random
from collections.abc import Sequence

from dynamo_lite.router.base import RouteDecision, Router


class RoundRobinRouter(Router):
    """Cycles through the live workers in id order; survives workers joining and leaving."""

    def __init__(self) -> None:
        self._counter = 0

    def route(self, model: str, request_id: str, token_ids: Sequence[int], workers: Sequence[int]) -> RouteDecision:
        worker = workers[self._counter % len(workers)]
        self._counter += 1
        return RouteDecision(worker)


class RandomRouter(Router):
    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def route(self, model: str, request_id: str, token_ids: Sequence[int], workers: Sequence[int]) -> RouteDecision:
        return RouteDecision(self._rng.choice(workers))
