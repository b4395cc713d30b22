"""KvRouter: one model's KV-cache-aware routing — the indexer, the active-block tracker and the cost.

Event intake is ordered per worker by `KvEventBatch.seq` (NATS core delivers at most once: a
batch can be lost, and the sequence number is how the router notices):
- The next expected seq is applied. An older or repeated seq is ignored.
- A worker's sequence starts at FIRST_SEQ (1), as the worker shell numbers it (a worker that
  re-registers under a new lease is a new worker id and starts at 1 again, with its whole block set).
- A gap, or a first batch from an unknown worker whose seq is not FIRST_SEQ (a router that joined
  mid-stream), leaves the router's view of that worker out of date: `apply_batch` returns False, meaning "resync this worker" (request its block set
  on protocol.keys' resync subject and pass the answer to `apply_resync`). While out of date, batches
  are buffered (bounded) and `apply_batch` returns True, except that it returns False again once every
  `resync_retry` seconds so a lost resync is retried.
- `apply_resync(snapshot)` replaces the worker's blocks with the snapshot, then replays buffered batches
  newer than the snapshot's seq. It returns False if a gap remains (resync again).
- Inconsistent events (unknown parent, wrong block size) are logged and dropped by the indexer.
- `worker_removed` forgets the worker at once; batches from it arriving within `removed_grace`
  seconds (already in flight) are ignored rather than reviving it.

Approximate mode (no KV events): the router records the full prompt blocks it routed to a worker as
cached there for `approx_ttl` seconds (routing the same prefix again refreshes them).

Pure: no I/O, no asyncio; time comes from the injected clock, randomness from the injected rng.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import repeat

from dynamo_lite.protocol.errors import NoWorkerAvailableError
from dynamo_lite.protocol.hashing import block_hashes
from dynamo_lite.protocol.messages import KvEventBatch
from dynamo_lite.router import dp_ranks
from dynamo_lite.router.active_blocks import ActiveBlockTracker
from dynamo_lite.router.base import RouteDecision
from dynamo_lite.router.cost import (WorkerCost, lowest_cost, prompt_block_count, select_worker,
                                     softmax_probabilities, worker_costs)
from dynamo_lite.router.indexer import KvIndexer

logger = logging.getLogger(__name__)

FIRST_SEQ = 1  # seq of a worker's first batch (engine/worker.py numbers batches from 1)


@dataclass
class _EventStream:
    """Per-worker intake state."""

    last_seq: int | None = None  # None: out of date, waiting for a resync
    resync_asked_at: float = 0.0
    pending: deque[KvEventBatch] = field(default_factory=deque)  # buffered while out of date


class KvRouter:
    """One model's KV-aware routing (KvRoutingService holds one per model behind the Router interface)."""

    def __init__(self, block_size: int, *, overlap_weight: float = 1.0, temperature: float = 0.0,
                 approximate: bool = False, approx_ttl: float = 120.0,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None,
                 decode_blocks: int = 1, resync_retry: float = 2.0, pending_limit: int = 256,
                 removed_grace: float = 60.0, interference_weight: float = 0.0) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be > 0")
        if overlap_weight < 0 or temperature < 0 or approx_ttl <= 0:
            raise ValueError("overlap_weight and temperature must be >= 0, approx_ttl > 0")
        self.block_size = block_size
        self.overlap_weight = overlap_weight
        self.temperature = temperature
        self.approximate = approximate
        self.approx_ttl = approx_ttl
        self.resync_retry = resync_retry
        self.pending_limit = pending_limit
        self.removed_grace = removed_grace
        self.interference_weight = interference_weight
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self.indexer = KvIndexer(block_size)
        self.tracker = ActiveBlockTracker(decode_blocks)
        self._streams: dict[int, _EventStream] = {}
        self._removed: dict[int, float] = {}  # worker id -> when it was removed (insertion ordered)
        # Approximate mode: worker -> block hash -> expiry, and a FIFO of (expiry, worker, hashes).
        self._approx_expiry: dict[int, dict[int, float]] = {}
        self._approx_queue: deque[tuple[float, int, list[int]]] = deque()
        self.resyncs_requested = 0

    # ------------------------------------------------------------------ routing

    def route(self, request_id: str, token_ids: Sequence[int], workers: Sequence[int]) -> RouteDecision:
        if not workers:
            raise NoWorkerAvailableError("no worker to route to")
        hashes = block_hashes(token_ids, self.block_size)
        costs = self._costs(len(token_ids), hashes, workers)
        chosen = select_worker(costs, self.temperature, self._rng)
        extra_blocks = 1 if len(token_ids) % self.block_size else 0
        # The prefill load is what the worker must compute: the blocks it does not hold yet (Dynamo counts
        # a prefill's new tokens the same way). Cached blocks cost it no compute.
        self.tracker.add_request(request_id, chosen.worker_id, hashes[chosen.overlap_blocks:], extra_blocks)
        if self.approximate and hashes:
            self._remember_routed(chosen.worker_id, hashes)
        if logger.isEnabledFor(logging.DEBUG):  # the hot path: build no label unless it is logged
            logger.debug("route %s -> %s: overlap %d/%d blocks, active %d, cost %.1f", request_id,
                         dp_ranks.label(chosen.worker_id), chosen.overlap_blocks, len(hashes),
                         chosen.active_blocks, chosen.cost)
        return RouteDecision(chosen.worker_id, chosen.overlap_blocks)

    def first_token(self, request_id: str) -> None:
        self.tracker.prefill_done(request_id)

    def finished(self, request_id: str) -> None:
        self.tracker.finish(request_id)

    def worker_removed(self, worker_id: int) -> None:
        self.indexer.remove_worker(worker_id)
        self.tracker.remove_worker(worker_id)
        self._streams.pop(worker_id, None)
        self._approx_expiry.pop(worker_id, None)
        now = self._clock()
        self._removed.pop(worker_id, None)
        self._removed[worker_id] = now
        for old_id, removed_at in list(self._removed.items()):  # oldest first; stop at the first recent one
            if now - removed_at < self.removed_grace:
                break
            del self._removed[old_id]

    def explain(self, token_ids: Sequence[int], workers: Sequence[int]) -> dict:
        """What `route` would weigh, without routing: for a debug endpoint.

        "choice" is the lowest-cost worker (what temperature 0 picks; with temperature > 0 it is the
        most likely one and each row carries its "probability").
        """
        hashes = block_hashes(token_ids, self.block_size)
        costs = self._costs(len(token_ids), hashes, workers) if workers else []
        rows = [{"worker_id": c.worker_id, "overlap_blocks": c.overlap_blocks, "new_blocks": c.new_blocks,
                 "active_blocks": c.active_blocks, "cost": c.cost} for c in costs]
        if costs and self.temperature > 0:
            for row, probability in zip(rows, softmax_probabilities(costs, self.temperature)):
                row["probability"] = probability
        return {"choice": lowest_cost(costs).worker_id if costs else None,
                "prompt_blocks": prompt_block_count(len(token_ids), self.block_size),
                "block_size": self.block_size, "overlap_weight": self.overlap_weight,
                "temperature": self.temperature, "workers": rows}

    # ------------------------------------------------------------------ event intake

    def apply_batch(self, batch: KvEventBatch) -> bool:
        """Apply one relayed batch in seq order. False: the worker needs a resync (see module doc)."""
        worker_id = batch.worker_id
        if worker_id in self._removed:
            if self._clock() - self._removed[worker_id] < self.removed_grace:
                return True  # a batch that was in flight when the worker went away
            del self._removed[worker_id]
        stream = self._streams.get(worker_id)
        if stream is None:
            stream = self._streams[worker_id] = _EventStream()
            if batch.seq != FIRST_SEQ:  # joined mid-stream: the worker has blocks we never saw
                return self._fall_behind(stream, batch)
            self._apply_events(batch)
            stream.last_seq = FIRST_SEQ
            return True
        if stream.last_seq is None:
            stream.pending.append(batch)
            if len(stream.pending) > self.pending_limit:
                stream.pending.popleft()
            return not self._resync_due(stream)
        if batch.seq <= stream.last_seq:
            logger.debug("worker %s: ignored old batch seq %d (at %d)", dp_ranks.label(worker_id), batch.seq,
                         stream.last_seq)
            return True
        if batch.seq != stream.last_seq + 1:
            logger.warning("worker %s: KV event gap (seq %d after %d), resync needed",
                           dp_ranks.label(worker_id), batch.seq, stream.last_seq)
            return self._fall_behind(stream, batch)
        self._apply_events(batch)
        stream.last_seq = batch.seq
        return True

    def apply_resync(self, snapshot: KvEventBatch) -> bool:
        """Replace a worker's blocks with its snapshot. False: still behind (resync again)."""
        worker_id = snapshot.worker_id
        self._removed.pop(worker_id, None)  # it answered, so it is alive
        stream = self._streams.setdefault(worker_id, _EventStream())
        if stream.last_seq is not None and snapshot.seq < stream.last_seq:
            logger.debug("worker %s: ignored resync at seq %d (already at %d)",
                         dp_ranks.label(worker_id), snapshot.seq, stream.last_seq)
            return True
        self.indexer.clear_worker(worker_id)
        self._apply_events(snapshot)
        stream.last_seq = snapshot.seq
        pending = sorted(stream.pending, key=lambda b: b.seq)
        stream.pending.clear()
        for index, batch in enumerate(pending):
            if batch.seq <= stream.last_seq:
                continue
            if batch.seq != stream.last_seq + 1:
                logger.warning("worker %s: gap after resync (seq %d after %d)", dp_ranks.label(worker_id),
                               batch.seq, stream.last_seq)
                stream.last_seq = None
                stream.pending.extend(pending[index:])
                stream.resync_asked_at = self._clock()
                self.resyncs_requested += 1
                return False
            self._apply_events(batch)
            stream.last_seq = batch.seq
        logger.info("worker %s: resynced at seq %d, %d blocks", dp_ranks.label(worker_id), stream.last_seq,
                    self.indexer.block_count(worker_id))
        return True

    def needs_resync(self, worker_id: int) -> bool:
        stream = self._streams.get(worker_id)
        return stream is not None and stream.last_seq is None

    def is_synced(self, worker_id: int) -> bool:
        """The router follows this worker's batches (it saw its first batch or a resync answer)."""
        stream = self._streams.get(worker_id)
        return stream is not None and stream.last_seq is not None

    def _apply_events(self, batch: KvEventBatch) -> None:
        dropped = self.indexer.apply_events(batch.worker_id, batch.events)
        if dropped:
            logger.warning("worker %s: batch seq %d: dropped %d of %d events",
                           dp_ranks.label(batch.worker_id), batch.seq, dropped, len(batch.events))

    def _fall_behind(self, stream: _EventStream, batch: KvEventBatch) -> bool:
        stream.last_seq = None
        stream.pending.clear()
        stream.pending.append(batch)
        stream.resync_asked_at = self._clock()
        self.resyncs_requested += 1
        return False

    def _resync_due(self, stream: _EventStream) -> bool:
        now = self._clock()
        if now - stream.resync_asked_at < self.resync_retry:
            return False
        stream.resync_asked_at = now
        self.resyncs_requested += 1
        return True

    # ------------------------------------------------------------------ internals

    def _costs(self, prompt_tokens: int, hashes: list[int], workers: Sequence[int]) -> list[WorkerCost]:
        if self.approximate:
            self._expire_routed(self._clock())
        overlaps = self.indexer.find_matches(hashes) if hashes else {}
        return worker_costs(workers, prompt_block_count(prompt_tokens, self.block_size), overlaps,
                            self.tracker.active_blocks, self.overlap_weight, self.tracker.prefilling_requests,
                            self.interference_weight)

    def _remember_routed(self, worker_id: int, hashes: list[int]) -> None:
        expiry = self._clock() + self.approx_ttl
        self.indexer.store_blocks(worker_id, hashes, None)
        self._approx_expiry.setdefault(worker_id, {}).update(zip(hashes, repeat(expiry)))
        self._approx_queue.append((expiry, worker_id, hashes))

    def _expire_routed(self, now: float) -> None:
        queue = self._approx_queue
        while queue and queue[0][0] <= now:
            expiry, worker_id, hashes = queue.popleft()
            expiries = self._approx_expiry.get(worker_id)
            if not expiries:
                continue  # worker removed meanwhile
            # Only blocks not refreshed by a later route expire. A refreshed block's ancestors were
            # refreshed with it (routes record whole chains from the root), so no hole appears.
            stale = [h for h in hashes if expiries.get(h) == expiry]
            for block_hash in stale:
                del expiries[block_hash]
            self.indexer.remove_blocks(worker_id, stale)
