"""KV router: the cost (weight x uncached prompt blocks + active blocks), selection, event intake with gaps and resync, approximate mode."""

from __future__ import annotations

import math
import random

import pytest

from dynamo_lite.protocol.errors import NoWorkerAvailableError
from dynamo_lite.protocol.hashing import block_hashes
from dynamo_lite.protocol.messages import AllBlocksCleared, BlockRemoved, BlockStored, KvEventBatch
from dynamo_lite.router.cost import (WorkerCost, lowest_cost, select_worker, softmax_probabilities,
                                     worker_costs)
from dynamo_lite.router.kv_router import KvRouter

BS = 4
W1, W2, W3 = 1, 2, 3
PROMPT = list(range(100, 118))  # 18 tokens: 4 full blocks + a partial one -> 5 prompt blocks


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FixedDraw:
    """An rng whose random() returns a chosen value."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def store(tokens, parent=None):
    return BlockStored(block_hashes=block_hashes(tokens, BS, parent), parent_block_hash=parent,
                       token_ids=list(tokens[: len(tokens) - len(tokens) % BS]), block_size=BS)


def batch(worker, seq, *events):
    return KvEventBatch(worker_id=worker, seq=seq, events=list(events))


def costs_by_id(explanation):
    return {row["worker_id"]: (row["overlap_blocks"], row["active_blocks"], row["cost"])
            for row in explanation["workers"]}


# --------------------------------------------------------------------------- cost and selection


def test_cost_is_weighted_new_blocks_plus_active_blocks():
    active = {W1: 5, W2: 0}
    costs = worker_costs([W1, W2, W3], 5, {W1: 4, W2: 1}, lambda w: active.get(w, 0), overlap_weight=2.0)
    assert costs == [WorkerCost(W1, 4, 1, 5, 7.0), WorkerCost(W2, 1, 4, 0, 8.0),
                     WorkerCost(W3, 0, 5, 0, 10.0)]
    assert lowest_cost(costs).worker_id == W1


def test_weight_zero_balances_load_only():
    active = {W1: 3, W2: 2}
    costs = worker_costs([W1, W2], 5, {W1: 5}, active.__getitem__, overlap_weight=0.0)
    assert [c.cost for c in costs] == [3.0, 2.0]
    assert lowest_cost(costs).worker_id == W2


def test_ties_go_to_fewer_active_blocks_then_lowest_id():
    equal_cost = [WorkerCost(W2, 0, 4, 0, 4.0), WorkerCost(W1, 4, 0, 4, 4.0)]
    assert lowest_cost(equal_cost).worker_id == W2  # same cost: the less loaded one
    all_equal = [WorkerCost(W3, 0, 5, 0, 5.0), WorkerCost(W2, 0, 5, 0, 5.0)]
    assert lowest_cost(all_equal).worker_id == W2
    assert select_worker(all_equal, 0.0, FixedDraw(0.0)).worker_id == W2


def test_softmax_over_normalized_costs():
    costs = [WorkerCost(W1, 0, 0, 0, 10.0), WorkerCost(W2, 0, 0, 0, 20.0), WorkerCost(W3, 0, 0, 0, 30.0)]
    weights = [1.0, math.exp(-0.5 / 0.5), math.exp(-1.0 / 0.5)]  # normalized costs 0, 0.5, 1 at T=0.5
    expected = [w / sum(weights) for w in weights]
    assert softmax_probabilities(costs, 0.5) == pytest.approx(expected)
    # Scaling every cost changes nothing: the temperature acts on normalized costs.
    scaled = [WorkerCost(c.worker_id, 0, 0, 0, c.cost * 7 + 3) for c in costs]
    assert softmax_probabilities(scaled, 0.5) == pytest.approx(expected)
    assert softmax_probabilities(costs[:1] * 2, 1.0) == [0.5, 0.5]
    with pytest.raises(ValueError):
        softmax_probabilities(costs, 0.0)


def test_sampling_walks_workers_in_id_order():
    costs = [WorkerCost(W3, 0, 0, 0, 1.0), WorkerCost(W1, 0, 0, 0, 1.0), WorkerCost(W2, 0, 0, 0, 1.0)]
    assert select_worker(costs, 1.0, FixedDraw(0.0)).worker_id == W1
    assert select_worker(costs, 1.0, FixedDraw(0.5)).worker_id == W2
    assert select_worker(costs, 1.0, FixedDraw(0.99)).worker_id == W3


def test_sampling_follows_the_probabilities_with_a_seeded_rng():
    costs = [WorkerCost(W1, 0, 0, 0, 0.0), WorkerCost(W2, 0, 0, 0, 10.0)]
    rng = random.Random(42)
    picks = [select_worker(costs, 1.0, rng).worker_id for _ in range(4000)]
    p_w1 = 1 / (1 + math.exp(-1))
    assert picks.count(W1) / 4000 == pytest.approx(p_w1, abs=0.03)
    again = random.Random(42)
    assert picks == [select_worker(costs, 1.0, again).worker_id for _ in range(4000)]


# --------------------------------------------------------------------------- routing


def make_router(**kwargs) -> tuple[KvRouter, FakeClock]:
    clock = FakeClock()
    return KvRouter(BS, clock=clock, rng=random.Random(0), **kwargs), clock


def test_routes_to_the_worker_holding_the_prefix_and_reports_overlap():
    router, _ = make_router()
    assert router.apply_batch(batch(W2, 1, store(PROMPT[:12])))
    decision = router.route("r1", PROMPT, [W1, W2, W3])
    assert (decision.worker_id, decision.overlap_blocks) == (W2, 3)


def test_load_outweighs_a_small_overlap():
    router, _ = make_router()
    router.apply_batch(batch(W1, 1, store(PROMPT[:4])))
    # Before: W1 has overlap 1 -> cost 4, W2 cost 5. Send an unrelated 8-token prompt to W1 first.
    router.route("busy", [7] * 8, [W1])
    explanation = router.explain(PROMPT, [W1, W2])
    assert costs_by_id(explanation) == {W1: (1, 2, 6.0), W2: (0, 0, 5.0)}
    assert explanation["choice"] == W2
    assert router.route("r1", PROMPT, [W1, W2]).worker_id == W2


def test_active_blocks_follow_first_token_and_finish():
    router, _ = make_router()
    router.route("r1", PROMPT, [W1])
    router.route("r2", PROMPT[:8], [W1])  # shares 2 blocks with r1
    assert costs_by_id(router.explain([], [W1])) == {W1: (0, 5, 5.0)}
    router.first_token("r1")
    assert costs_by_id(router.explain([], [W1])) == {W1: (0, 3, 3.0)}  # r2's 2 blocks + r1 decoding
    router.finished("r1")
    router.finished("r2")
    router.finished("r2")
    assert costs_by_id(router.explain([], [W1])) == {W1: (0, 0, 0.0)}


def test_only_the_uncached_part_of_a_prompt_counts_as_prefill_load():
    router, _ = make_router()
    router.apply_batch(batch(W1, 1, store(PROMPT[:12])))  # 3 of the prompt's 5 blocks cached on W1
    assert router.route("r1", PROMPT, [W1]).overlap_blocks == 3
    # The worker computes 1 full block and the partial last one: 2 active blocks, not 5.
    assert costs_by_id(router.explain([], [W1])) == {W1: (0, 2, 2.0)}
    router.first_token("r1")
    assert costs_by_id(router.explain([], [W1])) == {W1: (0, 1, 1.0)}  # decoding
    router.finished("r1")
    assert costs_by_id(router.explain([], [W1])) == {W1: (0, 0, 0.0)}


def test_explain_rows():
    router, _ = make_router(overlap_weight=2.0)
    router.apply_batch(batch(W1, 1, store(PROMPT[:8])))
    explanation = router.explain(PROMPT, [W1, W2])
    assert explanation["choice"] == W1
    assert explanation["prompt_blocks"] == 5
    assert explanation["workers"] == [
        {"worker_id": W1, "overlap_blocks": 2, "new_blocks": 3, "active_blocks": 0, "cost": 6.0},
        {"worker_id": W2, "overlap_blocks": 0, "new_blocks": 5, "active_blocks": 0, "cost": 10.0},
    ]
    hot, _ = make_router(temperature=1.0)
    rows = hot.explain(PROMPT, [W1, W2])["workers"]
    assert [row["probability"] for row in rows] == [0.5, 0.5]


def test_temperature_routing_is_reproducible_with_a_seed():
    def choices(seed):
        router = KvRouter(BS, temperature=1.0, rng=random.Random(seed))
        picks = []
        for i in range(50):
            picks.append(router.route(f"r{i}", PROMPT, [W1, W2, W3]).worker_id)
            router.finished(f"r{i}")
        return picks

    assert choices(3) == choices(3)
    assert set(choices(3)) == {W1, W2, W3}


def test_route_without_workers_raises():
    router, _ = make_router()
    with pytest.raises(NoWorkerAvailableError):
        router.route("r1", PROMPT, [])


# --------------------------------------------------------------------------- event intake


def test_gap_asks_for_a_resync_and_buffered_batches_replay_after_it():
    router, clock = make_router(resync_retry=2.0)
    assert router.apply_batch(batch(W1, 1, store(PROMPT[:4])))
    assert router.apply_batch(batch(W1, 2, store(PROMPT[4:8], parent=block_hashes(PROMPT[:4], BS)[-1])))
    assert not router.apply_batch(batch(W1, 4, AllBlocksCleared()))  # seq 3 was lost
    assert router.needs_resync(W1)
    hashes = block_hashes(PROMPT, BS)
    assert router.apply_batch(batch(W1, 5, store(PROMPT[:4])))  # buffered; resync already asked
    clock.now += 2.0
    assert not router.apply_batch(batch(W1, 6, store(PROMPT[4:12], parent=hashes[0])))  # ask again
    assert router.resyncs_requested == 2
    # The snapshot is at seq 4 (the clear was the worker's last batch before it): 5 and 6 replay on top.
    snapshot = batch(W1, 4, AllBlocksCleared())
    assert router.apply_resync(snapshot)
    assert not router.needs_resync(W1)
    assert router.indexer.find_matches(hashes) == {W1: 3}
    assert router.apply_batch(batch(W1, 7, BlockRemoved(block_hashes=[hashes[2]])))
    assert router.indexer.find_matches(hashes) == {W1: 2}


def test_resync_replaces_what_the_router_had():
    router, _ = make_router()
    router.apply_batch(batch(W1, 1, store(PROMPT[:8])))
    assert not router.apply_batch(batch(W1, 8, store([1, 2, 3, 4])))
    snapshot = batch(W1, 10, AllBlocksCleared(), store([5, 6, 7, 8]))
    assert router.apply_resync(snapshot)  # the buffered seq 8 is older than the snapshot: dropped
    assert router.indexer.find_matches(block_hashes(PROMPT, BS)) == {}
    assert router.indexer.find_matches(block_hashes([5, 6, 7, 8], BS)) == {W1: 1}
    assert router.indexer.find_matches(block_hashes([1, 2, 3, 4], BS)) == {}


def test_gap_left_after_a_resync_asks_again():
    router, _ = make_router()
    router.apply_batch(batch(W1, 1))
    assert not router.apply_batch(batch(W1, 3))
    assert router.apply_batch(batch(W1, 6))
    assert not router.apply_resync(batch(W1, 3))  # 4 and 5 are missing before the buffered 6
    assert router.needs_resync(W1)
    assert router.apply_resync(batch(W1, 6))


def test_unknown_worker_mid_stream_needs_a_resync_and_old_batches_are_ignored():
    router, _ = make_router()
    assert not router.apply_batch(batch(W2, 6, store(PROMPT[:4])))
    assert router.indexer.find_matches(block_hashes(PROMPT, BS)) == {}
    router.apply_resync(batch(W2, 6, store(PROMPT[:8])))
    assert router.apply_batch(batch(W2, 5, AllBlocksCleared()))  # older than the snapshot: ignored
    assert router.indexer.find_matches(block_hashes(PROMPT, BS)) == {W2: 2}


def test_a_new_workers_first_batch_is_seq_1_and_needs_no_resync():
    router, _ = make_router()
    assert not router.is_synced(W1)
    assert router.apply_batch(batch(W1, 1, store(PROMPT[:8])))  # the worker shell numbers from 1
    assert router.is_synced(W1) and not router.needs_resync(W1)
    assert router.resyncs_requested == 0
    assert router.indexer.find_matches(block_hashes(PROMPT, BS)) == {W1: 2}


def test_a_late_router_seeing_seq_above_1_resyncs():
    router, _ = make_router()
    assert not router.apply_batch(batch(W1, 2, store(PROMPT[:4])))  # batch 1 happened before we joined
    assert router.needs_resync(W1) and router.resyncs_requested == 1
    assert router.apply_resync(batch(W1, 2, store(PROMPT[:8])))
    assert router.is_synced(W1)
    assert router.indexer.find_matches(block_hashes(PROMPT, BS)) == {W1: 2}


def test_resync_of_an_idle_worker_then_its_first_batch():
    router, _ = make_router()
    assert router.apply_resync(batch(W1, 0, AllBlocksCleared()))  # a worker that published nothing yet
    assert router.apply_batch(batch(W1, 1, store(PROMPT[:4])))
    assert router.resyncs_requested == 0
    assert router.indexer.find_matches(block_hashes(PROMPT, BS)) == {W1: 1}


def test_bad_event_is_dropped_and_the_rest_of_the_batch_applies():
    router, _ = make_router()
    bad = BlockStored(block_hashes=[123], parent_block_hash=999, token_ids=[0] * BS, block_size=BS)
    assert router.apply_batch(batch(W1, 1, bad, store(PROMPT[:4])))
    assert router.indexer.dropped_events == 1
    assert router.indexer.find_matches(block_hashes(PROMPT, BS)) == {W1: 1}
    assert router.apply_batch(batch(W1, 2))  # seq still advanced


def test_worker_removed_loses_blocks_and_load_at_once():
    router, clock = make_router(removed_grace=60.0)
    router.apply_batch(batch(W1, 1, store(PROMPT[:16])))
    router.route("r1", PROMPT, [W1, W2])
    router.worker_removed(W1)
    assert costs_by_id(router.explain(PROMPT, [W1, W2])) == {W1: (0, 0, 5.0), W2: (0, 0, 5.0)}
    assert router.apply_batch(batch(W1, 2, store(PROMPT[:4])))  # in flight: ignored, no resync
    assert router.indexer.block_count(W1) == 0
    clock.now += 61.0
    assert not router.apply_batch(batch(W1, 3, store(PROMPT[:4])))  # back after the grace: resync
    router.finished("r1")  # its worker is gone: ignored


# --------------------------------------------------------------------------- approximate mode


def test_approximate_mode_remembers_routes_until_the_ttl():
    router, clock = make_router(approximate=True, approx_ttl=10.0)
    first = router.route("r1", PROMPT, [W1, W2])
    assert (first.worker_id, first.overlap_blocks) == (W1, 0)
    router.finished("r1")
    again = router.route("r2", PROMPT, [W1, W2])
    assert (again.worker_id, again.overlap_blocks) == (W1, 4)
    router.finished("r2")
    clock.now += 5.0
    router.route("r3", PROMPT[:8], [W1, W2])  # refreshes the first two blocks only
    router.finished("r3")
    clock.now += 5.0  # r1/r2's entries expire, r3's (t+5+10) do not
    assert costs_by_id(router.explain(PROMPT, [W1, W2])) == {W1: (2, 0, 3.0), W2: (0, 0, 5.0)}
    clock.now += 5.0
    assert costs_by_id(router.explain(PROMPT, [W1, W2])) == {W1: (0, 0, 5.0), W2: (0, 0, 5.0)}
    assert router.indexer.block_count() == 0


def test_interference_weight_keeps_a_long_prompt_off_a_worker_with_prefills_in_flight():
    from dynamo_lite.router.kv_router import KvRouter

    for weight, expected in ((0.0, 1), (1.0, 2)):
        router = KvRouter(4, interference_weight=weight)
        # Worker 1: two short prompts still prefilling (4 active blocks); worker 2: one longer one (9 blocks).
        router.route("a", list(range(8)), [1])
        router.route("b", list(range(100, 108)), [1])
        router.route("c", list(range(200, 236)), [2])  # 9 blocks prefilling on worker 2
        # A 40-block prompt: w/o interference worker 1 (4 active) beats worker 2 (9 active); with it, worker 1
        # costs 40 x 2 prefilling more, worker 2 only 40 x 1.
        assert router.route("long", list(range(1000, 1160)), [1, 2]).worker_id == expected
        assert router.tracker.prefilling_requests(1) == (3 if expected == 1 else 2)
        router.first_token("a")
        router.finished("b")
        assert router.tracker.prefilling_requests(1) == (1 if expected == 1 else 0)
