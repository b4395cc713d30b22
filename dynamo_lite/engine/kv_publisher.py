"""A worker's side of the event plane: relay the engine's KV events as numbered batches, remember the
blocks they announced, answer resync requests with all of them, and publish load reports.

Every batch of one worker carries the next sequence number, so a router that sees a gap asks the
resync subject for the whole block set (docs/architecture.md, event plane). An event-plane outage
never stops serving: a failed publish is logged once per outage and dropped, because the sequence
numbers let routers find out and resync.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from dynamo_lite.engine.base import Engine
from dynamo_lite.events.base import EventBus, Subscription
from dynamo_lite.protocol import keys
from dynamo_lite.protocol.messages import (
    AllBlocksCleared, BlockRemoved, BlockStored, KvEvent, KvEventBatch, LoadReport, msgpack_encoder)

logger = logging.getLogger(__name__)


class RelayedBlockSet:
    """The worker's cached blocks as announced by its relayed events, to rebuild them on resync.

    Only hashes, parents and block sizes are kept: routers index content hashes, so snapshots carry
    no token ids (`token_ids=[]`). That keeps a resync reply of a large cache small: ~10 bytes a
    block, so 100k blocks fit in NATS's default 1 MiB payload.
    """

    def __init__(self) -> None:
        # content hash -> (parent hash, block size); insertion = chain order
        self.blocks: dict[int, tuple[int | None, int]] = {}

    def apply(self, events: list[KvEvent]) -> None:
        for event in events:
            if isinstance(event, BlockStored):
                parent, size = event.parent_block_hash, event.block_size
                for block_hash in event.block_hashes:
                    self.blocks[block_hash] = (parent, size)
                    parent = block_hash
            elif isinstance(event, BlockRemoved):
                for block_hash in event.block_hashes:
                    self.blocks.pop(block_hash, None)
            elif isinstance(event, AllBlocksCleared):
                self.blocks.clear()

    def snapshot(self) -> list[KvEvent]:
        """A clear, then one BlockStored per linear run of every chain, parents before children."""
        children: dict[int, list[int]] = {}
        roots: list[int] = []
        for block_hash, (parent, _) in self.blocks.items():
            if parent is not None and parent in self.blocks:
                children.setdefault(parent, []).append(block_hash)
            else:
                roots.append(block_hash)
        events: list[KvEvent] = [AllBlocksCleared()]
        stack = list(reversed(roots))
        while stack:
            start = stack.pop()
            parent, size = self.blocks[start]
            run, node = [start], start
            while kids := children.get(node):
                # Follow the first child; the others start their own runs after this one is out.
                stack.extend(reversed(kids[1:]))
                node = kids[0]
                if self.blocks[node][1] != size:
                    stack.append(node)
                    break
                run.append(node)
            events.append(BlockStored(block_hashes=run, parent_block_hash=parent, token_ids=[], block_size=size))
        return events


class _RankStream:
    """One data-parallel rank's stream: its announced blocks and its sequence number."""

    def __init__(self) -> None:
        self.blocks = RelayedBlockSet()
        self.seq = 0


class KvEventPublisher:
    """Publishes one worker's KV event batches and load reports for one served model.

    `worker_id` is the instance id the batches carry; `reregister` changes it (a new lease is a new
    worker to every router) together with the sequence, so no batch goes out between the two.

    A data-parallel worker (`data_parallel_size` N > 1) publishes N streams: each rank's batches carry
    its `dp_rank` and its own seq, each rank has its own block set, resync subject and load report, as
    if it were a worker of its own (router/dp_ranks.py is the routers' side of it).
    """

    def __init__(self, events: EventBus, namespace: str, model: str, data_parallel_size: int = 1):
        self._events = events
        self._namespace = namespace
        self._kv_subject = keys.kv_events_subject(namespace, model)
        self._load_subject = keys.load_subject(namespace, model)
        self.worker_id = 0
        self._ranks = [_RankStream() for _ in range(max(1, data_parallel_size))]
        self._lock = asyncio.Lock()
        self._failing = False
        self._resync_subs: list[Subscription] = []
        # Running totals for the side port's /metrics (engine.worker_metrics).
        self.batches_published = self.events_published = self.publish_failures = 0
        self.load_reports = self.resyncs_served = 0

    @property
    def data_parallel_size(self) -> int:
        return len(self._ranks)

    def relayed_blocks(self, dp_rank: int | None = None) -> set[int]:
        """Content hashes of the blocks announced so far (what a resync sends): of one rank, or of all."""
        ranks = self._ranks if dp_rank is None else [self._ranks[dp_rank]]
        return {block for rank in ranks for block in rank.blocks.blocks}

    async def relay(self, engine: Engine) -> None:
        """Publish every list of events the engine yields, until it stops or this task is cancelled."""
        try:
            async for dp_rank, events in engine.rank_kv_events():
                async with self._lock:
                    await self._publish_batch(dp_rank, events)
        except Exception:
            # Routers notice the silence only as stale routing; make the cause visible.
            logger.exception("KV event relay stopped")

    async def reregister(self, register: Callable[[], Awaitable[int]]) -> None:
        """Run `register` (returns the new instance id), start the sequences afresh and announce every
        block: a router that missed nothing still learns every block of the "new" worker. Under the
        publish lock, so no batch goes out between the id change and the new sequence."""
        async with self._lock:
            self.worker_id = await register()
            for dp_rank, rank in enumerate(self._ranks):
                rank.seq = 0
                await self._publish_batch(dp_rank, None)
        await self.stop_resync()
        await self.serve_resync()

    async def _publish_batch(self, dp_rank: int, events: list[KvEvent] | None) -> None:
        """Publish the rank's next batch (events=None: a snapshot of its blocks) with its next seq. Hold the
        lock."""
        rank = self._ranks[dp_rank]
        if events is None:
            events = rank.blocks.snapshot()
        else:
            rank.blocks.apply(events)
        rank.seq += 1
        batch = KvEventBatch(worker_id=self.worker_id, seq=rank.seq, events=events, timestamp=time.time(),
                             dp_rank=dp_rank)
        if await self._publish(self._kv_subject, msgpack_encoder.encode(batch)):
            self.batches_published += 1
            self.events_published += len(events)

    @property
    def relayed_block_count(self) -> int:
        return sum(len(rank.blocks.blocks) for rank in self._ranks)

    async def _publish(self, subject: str, data: bytes) -> bool:
        """Publish; an event-plane outage is logged (once per outage) and never stops serving. False if
        the publish failed."""
        try:
            await self._events.publish(subject, data)
        except Exception as e:
            if not self._failing:
                logger.warning("event bus publish failed, continuing without it: %r", e)
            self._failing = True
            self.publish_failures += 1
            return False
        if self._failing:
            logger.info("event bus publishing works again")
            self._failing = False
        return True

    async def report_load(self, engine: Engine, interval: float) -> None:
        """Publish the engine's load every `interval` seconds until cancelled."""
        while True:
            try:
                loads = engine.rank_loads()
            except Exception:
                logger.exception("engine.load() failed; skipping this load report")
            else:
                for dp_rank, load in enumerate(loads):
                    report = LoadReport(worker_id=self.worker_id, active_blocks=load.active_blocks,
                                        total_blocks=load.total_blocks,
                                        running_requests=load.running_requests,
                                        waiting_requests=load.waiting_requests, timestamp=time.time(),
                                        dp_rank=dp_rank)
                    if await self._publish(self._load_subject, msgpack_encoder.encode(report)):
                        self.load_reports += 1
            await asyncio.sleep(interval)

    # ------------------------------------------------------------------ resync responder

    def _resync_answerer(self, dp_rank: int) -> Callable[[bytes], Awaitable[bytes]]:
        rank = self._ranks[dp_rank]

        async def answer(_request: bytes) -> bytes:
            # No await between reading seq and the block set: the snapshot is exactly the state after
            # batch `seq` (a batch being published now has already been applied and numbered).
            batch = KvEventBatch(worker_id=self.worker_id, seq=rank.seq, events=rank.blocks.snapshot(),
                                 timestamp=time.time(), dp_rank=dp_rank)
            self.resyncs_served += 1
            return msgpack_encoder.encode(batch)

        return answer

    async def serve_resync(self) -> None:
        """Answer resync requests on each rank's subject (logged, not raised, if the bus refuses)."""
        for dp_rank in range(len(self._ranks)):
            subject = keys.resync_subject(self._namespace, self.worker_id, dp_rank)
            try:
                self._resync_subs.append(await self._events.serve(subject, self._resync_answerer(dp_rank)))
            except Exception as e:
                logger.warning("cannot serve resync on %s (routers will not resync from us): %r", subject, e)

    async def stop_resync(self) -> None:
        subscriptions, self._resync_subs = self._resync_subs, []
        for subscription in subscriptions:
            with contextlib.suppress(Exception):
                await subscription.close()
