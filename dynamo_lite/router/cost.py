"""The KV router's cost and worker selection (docs/architecture.md, "Life of a request"). Pure functions, deterministic given the rng.

cost(worker) = overlap_weight * (prompt blocks not cached on the worker) + active blocks on the worker

The prompt's block count includes a partial last block (it is never cached), so
new_blocks = ceil(prompt_tokens / block_size) - overlap_blocks.

Selection:
- temperature == 0: the lowest cost wins; ties go to the worker with fewer active blocks, then to
  the lowest worker id (deterministic, so tests and operators can predict the choice).
- temperature > 0: sample from softmax(-normalized_cost / temperature), where
  normalized_cost = (cost - min) / (max - min) lies in [0, 1] (all costs equal -> uniform). The
  normalization makes the temperature mean the same thing whatever the prompt length or load.
  Workers are visited in ascending id order and `rng.random()` is drawn once, so a seeded
  random.Random reproduces the choices.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerCost:
    worker_id: int
    overlap_blocks: int  # leading prompt blocks cached on the worker
    new_blocks: int  # prompt blocks the worker would have to compute
    active_blocks: int  # router-tracked load on the worker
    cost: float


def prompt_block_count(prompt_tokens: int, block_size: int) -> int:
    """Blocks a prompt occupies, counting a partial last block."""
    return -(-prompt_tokens // block_size)


def worker_costs(workers: Sequence[int], prompt_blocks: int, overlaps: Mapping[int, int],
                 active_blocks: Callable[[int], int], overlap_weight: float,
                 prefilling: Callable[[int], int] | None = None,
                 interference_weight: float = 0.0) -> list[WorkerCost]:
    """The cost of sending the prompt to each of `workers`, in the order given.

    With interference_weight > 0 a worker also costs interference_weight * new_blocks for each request
    prefilling there: their prefills would share steps with this prompt's chunks, each step as long as all
    its chunks together, so a long prompt sent beside short ones delays every one of them.
    """
    costs = []
    for worker_id in workers:
        overlap = min(overlaps.get(worker_id, 0), prompt_blocks)
        new_blocks = prompt_blocks - overlap
        active = active_blocks(worker_id)
        cost = overlap_weight * new_blocks + active
        if interference_weight and prefilling is not None:
            cost += interference_weight * new_blocks * prefilling(worker_id)
        costs.append(WorkerCost(worker_id, overlap, new_blocks, active, cost))
    return costs


def lowest_cost(costs: Sequence[WorkerCost]) -> WorkerCost:
    """The deterministic choice: lowest cost, then fewest active blocks, then lowest worker id."""
    return min(costs, key=lambda c: (c.cost, c.active_blocks, c.worker_id))


def softmax_probabilities(costs: Sequence[WorkerCost], temperature: float) -> list[float]:
    """Selection probability of each entry of `costs` (same order) at `temperature` > 0."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0 for softmax sampling")
    values = [c.cost for c in costs]
    low, high = min(values), max(values)
    if high == low:
        return [1.0 / len(values)] * len(values)
    span = high - low
    # exp(-(v - low)/span/T): the best worker gets exp(0) = 1, so nothing overflows.
    weights = [math.exp(-((v - low) / span) / temperature) for v in values]
    total = sum(weights)
    return [w / total for w in weights]


def select_worker(costs: Sequence[WorkerCost], temperature: float, rng: random.Random) -> WorkerCost:
    """Pick a worker: the lowest cost at temperature 0, a softmax sample above it."""
    if not costs:
        raise ValueError("no worker to select from")
    if temperature <= 0 or len(costs) == 1:
        return lowest_cost(costs)
    ordered = sorted(costs, key=lambda c: c.worker_id)
    probabilities = softmax_probabilities(ordered, temperature)
    draw = rng.random()
    cumulative = 0.0
    for entry, probability in zip(ordered, probabilities):
        cumulative += probability
        if draw < cumulative:
            return entry
    return ordered[-1]  # rounding left the cumulative sum a hair under 1
