"""Data-parallel ranks through the KV routing service, over each event plane: an in-process WorkerShell
around a DataParallelMockerEngine (two ranks, each its own KV cache and events) registers its DP size; the
KvRoutingService indexes each rank's events as a worker of its own, routes a prefix back to the rank that
cached it, resyncs one rank on its own subject after a lost batch, and forgets every rank at removal.
Reuses test_kv_routing's cluster (MemoryDiscovery, the session's nats-server or the embedded bus)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from dynamo_lite.engine.worker import WorkerShell, WorkerShellConfig
from dynamo_lite.mocker.config import MockerConfig, ModelFacts
from dynamo_lite.mocker.data_parallel import DataParallelMockerEngine
from dynamo_lite.protocol.errors import InvalidRequestError
from dynamo_lite.protocol.hashing import block_hashes
from dynamo_lite.protocol.messages import ErrorFrame, GenerateRequest, SamplingOptions
from dynamo_lite.router.dp_ranks import rank_key
from tests.integration import test_kv_routing
from tests.integration.test_frontend_app import TOKENIZER
from tests.integration.test_kv_routing import (
    BLOCK,
    MODEL,
    WAIT,
    LossyBus,
    cluster,
    engine_blocks,
    metric,
    prompt,
    wait_for,
)

RANKS = 2
# test_kv_routing's fixtures: its model folder and both event planes.
model_dir = test_kv_routing.model_dir
event_plane = test_kv_routing.event_plane


async def add_dp_worker(c, ranks: int = RANKS) -> tuple[WorkerShell, DataParallelMockerEngine, LossyBus]:
    config = MockerConfig(block_size=BLOCK, num_gpu_blocks_override=4096, speedup_ratio=1000.0,
                          data_parallel_size=ranks)
    facts = ModelFacts(path=str(c.model_dir), served_model_name=MODEL, context_length=1024,
                       vocab_size=TOKENIZER.get_vocab_size(), first_token_id=0, end_token_id=256)
    engine = DataParallelMockerEngine(config, facts=facts)
    bus = LossyBus(c.worker_bus)
    shell = WorkerShell(engine, c.discovery, bus,
                        WorkerShellConfig(namespace=c.namespace, host="127.0.0.1", drain_timeout=1.0,
                                          load_report_interval=0.05, engine_kind="mocker"))
    c.shells.append(shell)
    await shell.start()
    assert await c.watcher.wait_for(
        lambda: any(r.instance_id == shell.instance_id for r in c.watcher.instances()), WAIT)
    return shell, engine, bus


async def generate_on(c, shell: WorkerShell, token_ids: list[int], dp_rank: int | None) -> list:
    request = GenerateRequest(request_id=uuid.uuid4().hex, token_ids=token_ids,
                              sampling=SamplingOptions(max_tokens=3), dp_rank=dp_rank)
    async with asyncio.timeout(WAIT):
        return [frame async for frame in c.client.stream(shell.address, request)]


async def test_each_rank_is_indexed_on_its_own_and_a_prefix_routes_back_to_its_rank(event_plane, model_dir):
    async with cluster(event_plane, model_dir) as c:
        shell, engine, _ = await add_dp_worker(c)
        assert shell.record.data_parallel_size == RANKS
        (record,) = [r for r in c.watcher.instances() if r.instance_id == shell.instance_id]
        assert record.data_parallel_size == RANKS  # what the frontend reads from discovery
        service = await c.start_service()
        router = service.router_for(MODEL)
        rank0, rank1 = rank_key(shell.instance_id, 0), rank_key(shell.instance_id, 1)
        tokens = prompt(21)
        frames = await generate_on(c, shell, tokens, dp_rank=1)
        assert frames[-1].last and frames[0].cached_tokens == 0
        await wait_for(lambda: router.indexer.blocks_of(rank1) == engine_blocks(engine.ranks[1]) != set(),
                       "rank 1's blocks in the index under (worker, rank 1)")
        assert router.indexer.block_count(rank0) == 0 and engine_blocks(engine.ranks[0]) == set()
        decision = service.route(MODEL, "r1", tokens + [7], [shell.instance_id])
        hashes = block_hashes(tokens, BLOCK)
        assert (decision.worker_id, decision.dp_rank) == (shell.instance_id, 1)
        assert decision.overlap_blocks == len(hashes)
        service.finished("r1")
        # The chosen rank really holds the prefix: the engine reports the cached tokens there.
        again = await generate_on(c, shell, tokens + [7], dp_rank=decision.dp_rank)
        assert again[0].cached_tokens == len(hashes) * BLOCK
        explained = service.explain(MODEL, tokens, [shell.instance_id])
        assert (explained["choice"], explained["choice_dp_rank"]) == (shell.instance_id, 1)
        assert sorted((row["dp_rank"], row["overlap_blocks"]) for row in explained["workers"]) == [
            (0, 0), (1, len(hashes))]
        # Per-rank load reports, labelled "{id}-dp{rank}" in the metrics.
        await wait_for(lambda: {rank0, rank1} <= set(service.load_reports), "a load report of each rank")
        assert metric(c.registry, "dynamo_lite_router_worker_total_blocks", model=MODEL,
                      worker=f"{shell.instance_id:x}-dp1") == 4096


async def test_a_lost_batch_of_one_rank_resyncs_that_rank(event_plane, model_dir):
    async with cluster(event_plane, model_dir) as c:
        shell, engine, bus = await add_dp_worker(c)
        service = await c.start_service()
        router = service.router_for(MODEL)
        rank0, rank1 = rank_key(shell.instance_id, 0), rank_key(shell.instance_id, 1)
        await generate_on(c, shell, prompt(22), dp_rank=0)
        await wait_for(lambda: router.indexer.blocks_of(rank0) == engine_blocks(engine.ranks[0]) != set(),
                       "rank 0's first view")
        bus.drop_next_kv_batch = True
        lost = prompt(23)
        await generate_on(c, shell, lost, dp_rank=1)  # rank 1's first batch never arrives
        assert bus.dropped == 1
        await generate_on(c, shell, prompt(24), dp_rank=1)  # its next batch shows the gap
        await wait_for(lambda: router.indexer.blocks_of(rank1) == engine_blocks(engine.ranks[1])
                       and not router.needs_resync(rank1), "rank 1's view after its resync")
        assert set(block_hashes(lost, BLOCK)) <= router.indexer.blocks_of(rank1)
        assert router.indexer.blocks_of(rank0) == engine_blocks(engine.ranks[0])  # rank 0 untouched
        assert metric(c.registry, "dynamo_lite_router_kv_resyncs_total", model=MODEL, result="ok") >= 1


async def test_removal_forgets_every_rank_and_a_bad_rank_is_a_400(event_plane, model_dir):
    async with cluster(event_plane, model_dir) as c:
        shell, engine, _ = await add_dp_worker(c)
        service = await c.start_service()
        router = service.router_for(MODEL)
        with pytest.raises(InvalidRequestError):
            engine.pick_rank(GenerateRequest(request_id="x", token_ids=[1],
                                             sampling=SamplingOptions(max_tokens=1), dp_rank=RANKS))
        (error,) = await generate_on(c, shell, prompt(25), dp_rank=RANKS)
        assert isinstance(error, ErrorFrame) and error.status == 400 and "dp_rank" in error.message
        for rank in range(RANKS):
            await generate_on(c, shell, prompt(26 + rank), dp_rank=rank)
        keys = [rank_key(shell.instance_id, rank) for rank in range(RANKS)]
        await wait_for(lambda: all(router.indexer.block_count(key) for key in keys), "both ranks indexed")
        removed = asyncio.Event()
        c.watcher.add_listener(lambda kind, record: removed.set() if kind == "removed" else None)
        await shell.shutdown()
        await asyncio.wait_for(removed.wait(), WAIT)
        assert all(router.indexer.block_count(key) == 0 for key in keys)
        assert not service.load_reports
