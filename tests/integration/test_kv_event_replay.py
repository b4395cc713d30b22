"""KvEventSubscriber against vLLM's own ZMQ publisher (no engine): batches the PUB socket lost are
fetched from the publisher's replay buffer, in order, before the batch that showed the gap."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from types import SimpleNamespace

import pytest

from dynamo_lite.protocol.hashing import block_hashes
from dynamo_lite.protocol.messages import AllBlocksCleared, BlockStored
from dynamo_lite.vllm.kv_events import KvEventSubscriber

BLOCK = 4
TOKENS = list(range(100, 100 + 4 * BLOCK))
CHAIN = block_hashes(TOKENS, BLOCK)  # the content hashes of blocks 0..3 of one prompt


def stored_batch(index: int):
    """vLLM's batch storing block `index` of TOKENS under block index-1 (engine hashes b"e0", b"e1", ...)."""
    from vllm.distributed.kv_events import BlockStored as VllmBlockStored
    from vllm.distributed.kv_events import KVEventBatch

    parent = f"e{index - 1}".encode() if index else None
    block = VllmBlockStored(block_hashes=[f"e{index}".encode()], parent_block_hash=parent,
                            token_ids=TOKENS[index * BLOCK:(index + 1) * BLOCK], block_size=BLOCK,
                            lora_id=None, medium="GPU", lora_name=None)
    return KVEventBatch(ts=time.time(), events=[block])


def cleared_batch():
    from vllm.distributed.kv_events import AllBlocksCleared as VllmCleared
    from vllm.distributed.kv_events import KVEventBatch

    return KVEventBatch(ts=time.time(), events=[VllmCleared()])


class Received:
    """What the subscriber's events() yields, gathered by a background task (a timed-out wait must not
    cancel the generator itself)."""

    def __init__(self, subscriber: KvEventSubscriber):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.ensure_future(self._gather(subscriber))

    async def _gather(self, subscriber: KvEventSubscriber) -> None:
        async for events in subscriber.events():
            self._queue.put_nowait(events)

    async def next(self, timeout: float = 5) -> list:
        return await asyncio.wait_for(self._queue.get(), timeout)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def reading(subscriber: KvEventSubscriber):
    received = Received(subscriber)
    try:
        yield received
    finally:
        await received.stop()


@contextlib.asynccontextmanager
async def subscribed(buffer_steps: int | None = None):
    """A subscriber configured the way the worker does it, and vLLM's publisher built from that config
    (as the engine core builds it); buffer_steps overrides the publisher's replay buffer size."""
    from vllm.distributed.kv_events import EventPublisherFactory

    subscriber = KvEventSubscriber()
    args = SimpleNamespace(kv_events_config=None, enable_prefix_caching=True)
    assert subscriber.configure(args)
    config = args.kv_events_config
    assert config.replay_endpoint, "the worker turns on vLLM's replay socket"
    if buffer_steps is not None:
        config = dataclasses.replace(config, buffer_steps=buffer_steps)
    publisher = EventPublisherFactory.create(config, data_parallel_rank=0)
    try:
        async with reading(subscriber) as received:
            # ZMQ drops what a PUB sends before the subscription reaches it: publish until one arrives.
            for _ in range(50):
                publisher.publish(cleared_batch())
                with contextlib.suppress(TimeoutError):
                    assert await received.next(0.2) == [AllBlocksCleared()]
                    break
            else:
                pytest.fail("no batch from vLLM's publisher reached the subscriber in 10 s")
            publisher.publish(stored_batch(0))
            assert await received.next() == [stored(0)]
        yield subscriber, publisher
    finally:
        publisher.shutdown()
        subscriber.close()


async def lose(subscriber: KvEventSubscriber, publisher, indices) -> None:
    """What a PUB socket drops at its high-water mark: published batches that never reach events()
    (taken off the socket while nothing reads it)."""
    for index in indices:
        publisher.publish(stored_batch(index))
        await asyncio.wait_for(subscriber._socket.recv_multipart(), 5)


async def test_lost_batches_are_replayed_in_order_before_the_next():
    async with subscribed() as (subscriber, publisher):
        await lose(subscriber, publisher, [1, 2])
        async with reading(subscriber) as received:
            publisher.publish(stored_batch(3))
            # Without the replay, block 3 would be dropped: its parent (block 2) was never announced.
            assert [await received.next() for _ in range(3)] == [[stored(1)], [stored(2)], [stored(3)]]
        assert subscriber.lost_batches == 0 and subscriber.translator.dropped_orphans == 0


async def test_batches_the_replay_buffer_no_longer_holds_are_counted_lost():
    async with subscribed(buffer_steps=1) as (subscriber, publisher):
        await lose(subscriber, publisher, [1, 2])
        async with reading(subscriber) as received:
            publisher.publish(stored_batch(3))
            # The buffer holds only batch 3 by then: 1 and 2 are lost, and 3, whose parent is unknown.
            publisher.publish(stored_batch(0))
            assert await received.next() == [stored(0)]
        assert subscriber.lost_batches == 2 and subscriber.translator.dropped_orphans == 1


def stored(index: int) -> BlockStored:
    return BlockStored(block_hashes=[CHAIN[index]], parent_block_hash=CHAIN[index - 1] if index else None,
                       token_ids=TOKENS[index * BLOCK:(index + 1) * BLOCK], block_size=BLOCK)


async def test_each_data_parallel_rank_publishes_on_its_own_port_and_events_carry_the_rank():
    """--data-parallel-size 2: the worker's config gives vLLM one endpoint; rank r's publisher connects
    to its port + r (vLLM's offset_endpoint_port), stamps its batches with its rank and numbers them on
    its own. The subscriber takes both, tags each list with its rank and finds gaps per rank."""
    from vllm.distributed.kv_events import EventPublisherFactory

    subscriber = KvEventSubscriber()
    args = SimpleNamespace(kv_events_config=None, enable_prefix_caching=True, data_parallel_size=2)
    assert subscriber.configure(args)
    config = args.kv_events_config
    assert config.replay_endpoint is None  # vLLM refuses per-rank ipc replay endpoints
    publishers = [EventPublisherFactory.create(config, data_parallel_rank=rank) for rank in (0, 1)]
    queue: asyncio.Queue = asyncio.Queue()

    async def gather() -> None:
        async for item in subscriber.rank_events():
            queue.put_nowait(item)

    task = asyncio.ensure_future(gather())
    try:
        for rank, publisher in enumerate(publishers):  # until each rank's subscription is through
            for _ in range(50):
                publisher.publish(cleared_batch())
                with contextlib.suppress(TimeoutError):
                    assert await asyncio.wait_for(queue.get(), 0.2) == (rank, [AllBlocksCleared()])
                    break
            else:
                pytest.fail(f"no batch from rank {rank}'s publisher reached the subscriber")
        # The same prompt on both ranks: each rank's translator chains its own engine hashes.
        publishers[1].publish(stored_batch(0))
        assert await asyncio.wait_for(queue.get(), 5) == (1, [stored(0)])
        publishers[0].publish(stored_batch(0))
        assert await asyncio.wait_for(queue.get(), 5) == (0, [stored(0)])
        publishers[1].publish(stored_batch(1))
        assert await asyncio.wait_for(queue.get(), 5) == (1, [stored(1)])
        assert subscriber.lost_batches == 0  # interleaved ranks' numbers are no gap
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for publisher in publishers:
            publisher.shutdown()
        subscriber.close()
