"""The mocker's continuous-batching scheduler, step by step with exact expectations."""

from __future__ import annotations

import random

from dynamo_lite.mocker.block_pool import BlockPool
from dynamo_lite.mocker.scheduler import Scheduler, SchedRequest
from dynamo_lite.protocol.hashing import block_hashes
from dynamo_lite.protocol.messages import BlockRemoved, BlockStored

BS = 4
TOKEN_RANGE = (1000, 2000)


def make(num_blocks: int = 64, *, max_num_seqs: int = 8, budget: int = 64, max_model_len: int = 1024,
         token_range: tuple[int, int] = TOKEN_RANGE, prefix_caching: bool = True) -> Scheduler:
    pool = BlockPool(num_blocks, BS, prefix_caching)
    return Scheduler(pool, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, token_range=token_range,
                     max_model_len=max_model_len)


def req(name: str, prompt_len: int, max_tokens: int, *, start: int = 0, seed: int = 0,
        **kwargs) -> SchedRequest:
    return SchedRequest(name, list(range(start, start + prompt_len)), max_tokens, seed=seed, **kwargs)


def run_to_end(scheduler: Scheduler, limit: int = 1000) -> int:
    steps = 0
    while scheduler.has_work and steps < limit:
        scheduler.step()
        steps += 1
    return steps


def test_one_request_prefills_then_decodes_one_token_per_step_and_frees_its_blocks():
    s = make()
    r = req("a", 10, 3, seed=7)
    s.add_request(r)

    out = s.step()
    assert out.scheduled == {"a": 10} and out.prefill_tokens == 10 and out.decode_requests == 0
    assert out.prefill_attention == 100
    assert len(out.new_tokens) == 1 and r.block_ids == [0, 1, 2] and r.cached_tokens == 0
    hashes = block_hashes(r.tokens, BS)
    assert s.pool.drain_events() == [BlockStored(block_hashes=hashes[:2], parent_block_hash=None,
                                                 token_ids=list(range(8)), block_size=BS)]

    out = s.step()
    assert out.scheduled == {"a": 1} and out.decode_requests == 1 and out.prefill_tokens == 0
    assert s.pool.drain_events() == []  # 11 computed tokens: the third block is not full yet

    out = s.step()
    assert out.finished == [r] and r.finish_reason == "length"
    # The 12th computed token filled block 3: it is cached, chained to block 2.
    assert s.pool.drain_events() == [BlockStored(block_hashes=[block_hashes(r.tokens, BS)[2]],
                                                 parent_block_hash=hashes[1], token_ids=r.tokens[8:12],
                                                 block_size=BS)]
    assert r.final_block_ids == [0, 1, 2]
    assert not s.has_work and s.pool.num_used_blocks == 0
    rng = random.Random(7)
    assert r.output_tokens == [1000 + int(rng.random() * 1000) for _ in range(3)]


def test_same_seed_same_tokens_different_seed_different_tokens():
    outputs = []
    for seed in (1, 1, 2):
        s = make()
        r = req("a", 5, 20, seed=seed)
        s.add_request(r)
        run_to_end(s)
        assert all(1000 <= t < 2000 for t in r.output_tokens)
        outputs.append(r.output_tokens)
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]


def test_chunked_prefill_splits_long_prompts_and_shares_the_token_budget_first_come_first_served():
    s = make(budget=8)
    a, b = req("a", 20, 2), req("b", 3, 2, start=100)
    s.add_request(a)
    s.add_request(b)
    assert s.step().scheduled == {"a": 8}
    out = s.step()
    assert out.scheduled == {"a": 8} and out.new_tokens == []
    out = s.step()  # a finishes its prompt (4) and samples; b gets the rest of the budget (3)
    assert out.scheduled == {"a": 4, "b": 3} and [r for r, _ in out.new_tokens] == [a, b]
    assert out.prefill_tokens == 7 and out.prefill_attention == 4 * 20 + 3 * 3
    out = s.step()
    assert out.scheduled == {"a": 1, "b": 1} and out.decode_requests == 2 and out.finished == [a, b]


def test_max_num_seqs_keeps_extra_requests_waiting_until_one_finishes():
    s = make(max_num_seqs=2)
    rs = [req("a", 4, 1), req("b", 4, 3, start=10), req("c", 4, 1, start=20)]
    for r in rs:
        s.add_request(r)
    out = s.step()
    assert out.scheduled == {"a": 4, "b": 4} and out.finished == [rs[0]]
    assert [r.request_id for r in s.waiting] == ["c"]
    out = s.step()
    assert out.scheduled == {"b": 1, "c": 4}


def test_prefix_cache_hit_skips_cached_full_blocks_but_always_computes_the_last_token():
    s = make()
    a = req("a", 12, 1)
    s.add_request(a)
    run_to_end(s)
    s.pool.drain_events()

    # Shares the first two blocks (8 tokens) with a, then differs.
    b = SchedRequest("b", list(range(8)) + [500, 501, 502, 503, 504], 1, seed=0)
    s.add_request(b)
    out = s.step()
    assert b.cached_tokens == 8 and out.scheduled == {"b": 5} and out.prefill_attention == 5 * 13
    assert b.final_block_ids[:2] == a.final_block_ids[:2]  # the very same blocks, shared

    # The same prompt again: all 3 blocks are cached, but only (12 - 1) // 4 = 2 may hit.
    c = req("c", 12, 1)
    s.add_request(c)
    out = s.step()
    assert c.cached_tokens == 8 and out.scheduled == {"c": 4}


def test_no_prefix_cache_means_no_hits_and_no_events():
    s = make(prefix_caching=False)
    for name in ("a", "b"):
        r = req(name, 12, 1)
        s.add_request(r)
        out = s.step()
        assert r.cached_tokens == 0 and out.scheduled == {name: 12}
    assert s.pool.drain_events() == []


def test_out_of_blocks_preempts_the_newest_request_and_recomputes_it_later():
    s = make(num_blocks=4)
    a, b = req("a", 7, 4), req("b", 7, 4, start=100)
    s.add_request(a)
    s.add_request(b)
    assert s.step().scheduled == {"a": 7, "b": 7}  # 2 blocks each: the pool is full
    assert s.step().scheduled == {"a": 1, "b": 1}  # 8 tokens each still fit in 2 blocks
    b_hashes = block_hashes(b.tokens, BS)
    s.pool.drain_events()

    out = s.step()  # a needs a third block: b is preempted, its tail block evicted for a
    assert out.preempted == [b] and out.scheduled == {"a": 1}
    assert list(s.waiting) == [b] and b.block_ids == [] and b.num_computed == 0
    assert b.num_output_tokens == 2  # progress is kept, to be recomputed
    assert s.pool.drain_events() == [BlockRemoved(block_hashes=[b_hashes[1]])]

    out = s.step()  # a finishes, but admission comes first: b's 9 tokens need 3 blocks, 1 is free
    assert out.scheduled == {"a": 1} and out.finished == [a] and list(s.waiting) == [b]
    out = s.step()  # b comes back: its first block is still cached
    assert out.scheduled == {"b": 5} and b.cached_tokens == 0  # cached_tokens is the first admission's
    run_to_end(s)
    assert b.num_output_tokens == 4 and b.finish_reason == "length" and b.num_preemptions == 1
    assert s.pool.num_used_blocks == 0


def test_a_request_alone_without_blocks_preempts_itself_and_waits():
    s = make(num_blocks=2)
    a = req("a", 8, 5)
    s.add_request(a)
    s.step()  # 8 tokens in 2 blocks, one token sampled
    out = s.step()  # computing the 9th token needs a third block that does not exist
    assert out.preempted == [a] and out.scheduled == {}
    assert list(s.waiting) == [a]


def test_stop_token_ids_end_the_request_once_min_tokens_are_out():
    s = make(token_range=(5, 6))  # every sampled token is 5
    r = req("a", 3, 10, min_tokens=2, stop_token_ids=[5])
    s.add_request(r)
    run_to_end(s)
    assert r.output_tokens == [5, 5] and r.finish_reason == "stop"


def test_generation_stops_at_the_context_length():
    s = make(max_model_len=12)
    r = req("a", 10, 100)
    s.add_request(r)
    assert run_to_end(s) == 2
    assert r.num_output_tokens == 2 and r.finish_reason == "length"


def test_abort_removes_running_and_waiting_requests_and_frees_their_blocks():
    s = make(max_num_seqs=1)
    a, b = req("a", 6, 10), req("b", 6, 10, start=50)
    s.add_request(a)
    s.add_request(b)
    s.step()
    assert s.pool.num_used_blocks == 2
    assert s.abort(b) and s.abort(a)
    assert not s.has_work and s.pool.num_used_blocks == 0
    assert a.finish_reason == "abort" and not s.abort(a)


def test_transferred_kv_counts_as_present_and_is_cached_like_computed_blocks():
    s = make()
    r = req("a", 10, 2, kv_ready_tokens=10)
    s.add_request(r)
    out = s.step()
    assert out.scheduled == {"a": 1} and out.prefill_tokens == 1 and r.cached_tokens == 0
    assert len(out.new_tokens) == 1
    assert s.pool.drain_events() == [BlockStored(block_hashes=block_hashes(list(range(8)), BS),
                                                 parent_block_hash=None, token_ids=list(range(8)),
                                                 block_size=BS)]
