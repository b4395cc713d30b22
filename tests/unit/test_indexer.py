"""KvIndexer: exact overlaps after stores, removals, clears, worker removal and bad events."""

from __future__ import annotations

import random

from dynamo_lite.protocol.messages import AllBlocksCleared, BlockRemoved, BlockStored
from dynamo_lite.router.indexer import KvIndexer

A, B, C = 0xA, 0xB, 0xC


def stored(hashes, parent=None, block_size=4):
    return BlockStored(block_hashes=list(hashes), parent_block_hash=parent,
                       token_ids=[0] * (len(hashes) * block_size), block_size=block_size)


def test_overlap_is_the_leading_blocks_each_worker_holds():
    index = KvIndexer(block_size=4)
    assert index.apply_event(A, stored([1, 2, 3]))
    assert index.apply_event(B, stored([1, 2]))
    assert index.apply_event(C, stored([7, 8]))
    assert index.find_matches([1, 2, 3, 4]) == {A: 3, B: 2}
    assert index.find_matches([1, 2]) == {A: 2, B: 2}
    assert index.find_matches([7, 8, 9]) == {C: 2}
    assert index.find_matches([5, 1, 2]) == {}  # the first block decides: no worker holds 5
    assert index.find_matches([]) == {}
    assert index.block_count() == 5
    assert index.block_count(A) == 3
    assert index.holders(1) == [A, B]


def test_store_follows_a_parent_the_worker_holds():
    index = KvIndexer(block_size=4)
    index.apply_event(A, stored([1, 2]))
    assert index.apply_event(A, stored([3, 4], parent=2))
    assert index.find_matches([1, 2, 3, 4]) == {A: 4}
    # Storing the same chain again changes nothing.
    assert index.apply_event(A, stored([3, 4], parent=2))
    assert index.block_count(A) == 4


def test_store_with_a_parent_the_worker_lacks_is_dropped_whole():
    index = KvIndexer(block_size=4)
    index.apply_event(A, stored([1, 2]))
    # Parent unknown everywhere, then held only by another worker: both dropped, nothing stored.
    assert not index.apply_event(B, stored([9], parent=99))
    assert not index.apply_event(B, stored([3], parent=2))
    assert index.dropped_events == 2
    assert index.holders(3) == [] and index.holders(9) == []
    # A bad event does not stop the good ones of the same batch.
    dropped = index.apply_events(B, [stored([3], parent=2), stored([1, 2]), stored([3], parent=2)])
    assert dropped == 1
    assert index.find_matches([1, 2, 3]) == {A: 2, B: 3}


def test_a_chain_repeating_a_hash_is_dropped():
    index = KvIndexer(block_size=4)
    assert not index.apply_event(A, stored([1, 2, 1]))
    assert index.dropped_events == 1
    assert index.block_count() == 0 and index.block_count(A) == 0
    assert index.apply_event(A, stored([1, 2]))
    assert index.find_matches([1, 2]) == {A: 2}


def test_block_size_mismatch_is_dropped():
    index = KvIndexer(block_size=16)
    assert not index.apply_event(A, stored([1, 2], block_size=4))
    assert index.dropped_events == 1
    assert index.find_matches([1, 2]) == {}


def test_removing_a_middle_block_cuts_the_overlap_until_it_is_stored_again():
    index = KvIndexer(block_size=4)
    index.apply_event(A, stored([1, 2, 3]))
    index.apply_event(B, stored([1, 2, 3]))
    assert index.apply_event(A, BlockRemoved(block_hashes=[2]))
    assert index.find_matches([1, 2, 3]) == {A: 1, B: 3}
    assert index.block_count(A) == 2  # block 3 is still held, it just cannot be reached
    assert index.orphan_count(A) == 1
    assert index.find_matches([1]) == {A: 1, B: 1}
    index.apply_event(A, stored([2], parent=1))
    assert index.orphan_count(A) == 0
    assert index.find_matches([1, 2, 3]) == {A: 3, B: 3}
    # Removing a parent before its child, then the child, leaves no orphan behind.
    index.apply_event(B, BlockRemoved(block_hashes=[2, 3]))
    assert index.orphan_count(B) == 0
    assert index.find_matches([1, 2, 3]) == {A: 3, B: 1}


def test_a_block_is_forgotten_when_its_last_holder_removes_it():
    index = KvIndexer(block_size=4)
    index.apply_event(A, stored([1, 2]))
    index.apply_event(B, stored([1]))
    index.apply_event(A, BlockRemoved(block_hashes=[2, 1]))
    assert index.block_count() == 1
    assert index.holders(1) == [B]
    index.apply_event(B, BlockRemoved(block_hashes=[1]))
    assert index.block_count() == 0


def test_removing_blocks_a_worker_does_not_hold_is_ignored():
    index = KvIndexer(block_size=4)
    index.apply_event(A, stored([1, 2]))
    assert index.remove_blocks(B, [1]) == 0  # unknown worker
    assert index.remove_blocks(A, [5, 2, 2]) == 1  # unknown block, and the same block twice
    assert index.find_matches([1, 2]) == {A: 1}


def test_all_blocks_cleared_keeps_other_workers():
    index = KvIndexer(block_size=4)
    index.apply_event(A, stored([1, 2]))
    index.apply_event(B, stored([1, 2]))
    assert index.apply_event(A, AllBlocksCleared())
    assert index.find_matches([1, 2]) == {B: 2}
    assert index.block_count(A) == 0
    assert index.workers() == [A, B]
    index.apply_event(A, stored([1]))
    assert index.find_matches([1, 2]) == {A: 1, B: 2}


def test_remove_worker_forgets_it_and_its_slot_is_reused_cleanly():
    index = KvIndexer(block_size=4)
    index.apply_event(A, stored([1, 2, 3]))
    index.apply_event(B, stored([1]))
    index.remove_worker(A)
    assert index.workers() == [B]
    assert index.find_matches([1, 2, 3]) == {B: 1}
    assert index.block_count() == 1
    index.apply_event(C, stored([1, 2]))  # takes A's bit position: must not inherit A's blocks
    assert index.find_matches([1, 2, 3]) == {B: 1, C: 2}
    index.remove_worker(A)  # twice: harmless
    index.clear()
    assert index.workers() == [] and index.block_count() == 0


def test_many_workers_dropping_out_at_different_depths():
    index = KvIndexer(block_size=4)
    chain = list(range(1000, 1040))
    for worker in range(20):  # worker k holds the first 2k+1 blocks
        index.store_blocks(worker, chain[: 2 * worker + 1])
    index.store_blocks(99, chain[:40])
    expected = {worker: 2 * worker + 1 for worker in range(20)} | {99: 40}
    assert index.find_matches(chain) == expected
    assert index.find_matches(chain + [5]) == expected
    index.remove_blocks(3, [chain[2]])  # worker 3 gets an orphan: the block-by-block walk answers
    assert index.find_matches(chain) == expected | {3: 2}


def _reference_overlap(held: dict[int, set[int]], query: list[int]) -> dict[int, int]:
    result = {}
    for worker, blocks in held.items():
        depth = 0
        while depth < len(query) and query[depth] in blocks:
            depth += 1
        if depth:
            result[worker] = depth
    return result


def test_matches_a_reference_model_under_random_events_with_many_workers():
    """300 workers (more than 256 bits), random stores/removals/clears/removals of workers."""
    rng = random.Random(7)
    index = KvIndexer(block_size=4)
    held: dict[int, set[int]] = {}
    chains = [[rng.getrandbits(63) for _ in range(12)] for _ in range(6)]
    for chain in chains[1:]:
        chain[:4] = chains[0][:4]  # shared root
    parent_of = {block: (chain[i - 1] if i else None) for chain in chains for i, block in enumerate(chain)}
    for step in range(4000):
        worker = rng.randrange(300)
        action = rng.random()
        chain = rng.choice(chains)
        if action < 0.6:
            start, end = sorted(rng.sample(range(13), 2))
            parent = chain[start - 1] if start else None
            ok = index.store_blocks(worker, chain[start:end], parent)
            assert ok == (parent is None or parent in held.get(worker, set()))
            if ok:
                held.setdefault(worker, set()).update(chain[start:end])
        elif action < 0.9:
            gone = rng.sample(chain, 3)
            index.remove_blocks(worker, gone)
            held.get(worker, set()).difference_update(gone)
        elif action < 0.95:
            index.clear_worker(worker)
            held.get(worker, set()).clear()
        else:
            index.remove_worker(worker)
            held.pop(worker, None)
        if step % 50 == 0:
            for query in chains:
                assert index.find_matches(query) == _reference_overlap(held, query)
            for worker_id, blocks in held.items():
                orphans = sum(1 for b in blocks if parent_of[b] is not None and parent_of[b] not in blocks)
                assert index.orphan_count(worker_id) == orphans
    assert index.block_count() == len(set().union(*held.values()))


def test_matches_a_reference_model_under_heavy_churn_on_few_workers():
    """Few workers, many events each: middle blocks evicted and stored again while later blocks stay."""
    rng = random.Random(11)
    index = KvIndexer(block_size=4)
    held: dict[int, set[int]] = {w: set() for w in range(4)}
    chains = [[rng.getrandbits(63) for _ in range(16)] for _ in range(5)]
    for chain in chains[1:]:
        chain[:3] = chains[0][:3]
    parent_of = {block: (chain[i - 1] if i else None) for chain in chains for i, block in enumerate(chain)}
    for step in range(6000):
        worker = rng.randrange(4)
        chain = rng.choice(chains)
        if rng.random() < 0.55:
            starts = [0] + [i + 1 for i, block in enumerate(chain[:-1]) if block in held[worker]]
            start = rng.choice(starts)
            end = rng.randint(start + 1, len(chain))
            assert index.store_blocks(worker, chain[start:end], chain[start - 1] if start else None)
            held[worker].update(chain[start:end])
        else:
            gone = rng.sample(chain, rng.randint(1, 3))
            assert index.remove_blocks(worker, gone) == len(set(gone) & held[worker])
            held[worker].difference_update(gone)
        if step % 20 == 0:
            for query in chains:
                assert index.find_matches(query) == _reference_overlap(held, query)
            for worker_id, blocks in held.items():
                orphans = sum(1 for b in blocks if parent_of[b] is not None and parent_of[b] not in blocks)
                assert index.orphan_count(worker_id) == orphans
