"""The mocker's paged block pool: allocation, prefix caching, LRU eviction and the KV events it emits."""

from __future__ import annotations

from dynamo_lite.mocker.block_pool import BlockPool
from dynamo_lite.protocol.hashing import block_hashes
from dynamo_lite.protocol.messages import AllBlocksCleared, BlockRemoved, BlockStored

BS = 4


def chain(tokens: list[int]) -> list[int]:
    return block_hashes(tokens, BS)


def stored(hashes: list[int], parent: int | None, tokens: list[int]) -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=BS)


def test_allocate_hands_out_lowest_ids_and_fails_without_change_when_full():
    pool = BlockPool(4, BS)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.num_free_blocks == 1 and pool.num_used_blocks == 3
    assert pool.allocate(2) is None
    assert pool.num_free_blocks == 1
    assert pool.allocate(1) == [3]
    assert pool.drain_events() == []  # allocation of never-cached blocks changes no cached state


def test_commit_emits_one_stored_event_per_chain_and_blocks_become_matchable():
    pool = BlockPool(8, BS)
    tokens = list(range(100, 112))
    hashes = chain(tokens)
    blocks = pool.allocate(3)
    pool.commit(blocks[:2], hashes[:2], None, tokens[:8])
    pool.commit(blocks[2:], hashes[2:], hashes[1], tokens[8:])
    assert pool.drain_events() == [
        stored(hashes[:2], None, tokens[:8]),
        stored(hashes[2:], hashes[1], tokens[8:]),
    ]
    assert pool.drain_events() == []
    assert pool.match_prefix(hashes) == blocks
    # A different second block stops the match after the first.
    other = chain(tokens[:4] + [1, 2, 3, 4])
    assert pool.match_prefix(other) == blocks[:1]


def test_freed_cached_blocks_stay_matchable_and_are_evicted_lru_after_uncached_ones():
    pool = BlockPool(4, BS)
    a, b = list(range(8)), list(range(50, 58))
    ha, hb = chain(a), chain(b)
    blocks_a = pool.allocate(2)
    pool.commit(blocks_a, ha, None, a)
    blocks_b = pool.allocate(2)
    pool.commit(blocks_b, hb, None, b)
    pool.drain_events()
    pool.free(reversed(blocks_a))  # tail first, as the scheduler frees
    pool.free(reversed(blocks_b))
    assert pool.num_free_blocks == 4 and pool.num_used_blocks == 0
    assert pool.match_prefix(ha) == blocks_a and pool.match_prefix(hb) == blocks_b

    # Oldest freed first, and within a sequence its tail first.
    assert pool.allocate(1) == [blocks_a[1]]
    assert pool.drain_events() == [BlockRemoved(block_hashes=[ha[1]])]
    assert pool.match_prefix(ha) == blocks_a[:1]
    assert pool.allocate(2) == [blocks_a[0], blocks_b[1]]
    assert pool.drain_events() == [BlockRemoved(block_hashes=[ha[0], hb[1]])]
    assert pool.match_prefix(hb) == blocks_b[:1]


def test_uncached_free_blocks_are_reused_before_any_cached_block_is_evicted():
    pool = BlockPool(3, BS)
    tokens = list(range(4))
    cached = pool.allocate(1)
    pool.commit(cached, chain(tokens), None, tokens)
    scratch = pool.allocate(2)
    pool.free(cached)
    pool.free(scratch)
    pool.drain_events()
    assert sorted(pool.allocate(2)) == sorted(scratch)
    assert pool.drain_events() == []
    assert pool.match_prefix(chain(tokens)) == cached


def test_acquire_counts_references_and_shared_blocks_stay_in_use_until_the_last_free():
    pool = BlockPool(4, BS)
    tokens = list(range(8))
    hashes = chain(tokens)
    blocks = pool.allocate(2)
    pool.commit(blocks, hashes, None, tokens)
    pool.free(reversed(blocks))
    assert pool.num_free_blocks == 4
    hit = pool.match_prefix(hashes)
    assert pool.blocks_needed_to_acquire(hit) == 2  # both sit in the evictable set
    pool.acquire(hit)
    assert pool.num_free_blocks == 2
    pool.acquire(hit)  # a second request shares them
    assert pool.blocks_needed_to_acquire(hit) == 0
    assert [pool.ref_count(b) for b in blocks] == [2, 2]
    pool.free(hit)
    assert pool.num_used_blocks == 2
    pool.free(hit)
    assert pool.num_used_blocks == 0
    assert pool.drain_events() == [stored(hashes, None, tokens)]


def test_duplicate_content_keeps_the_first_block_and_splits_the_stored_chain():
    pool = BlockPool(8, BS)
    tokens = list(range(12))
    hashes = chain(tokens)
    first = pool.allocate(1)
    pool.commit(first, hashes[1:2], hashes[0], tokens[4:8])  # someone else cached the middle block
    pool.drain_events()
    mine = pool.allocate(3)
    pool.commit(mine, hashes, None, tokens)
    assert pool.drain_events() == [
        stored(hashes[:1], None, tokens[:4]),
        stored(hashes[2:], hashes[1], tokens[8:]),
    ]
    # The duplicate is not cached: freeing it makes it a plain free block, the original stays cached.
    pool.free([mine[1]])
    assert pool.match_prefix(hashes) == [mine[0], first[0], mine[2]]


def test_without_prefix_caching_nothing_is_cached_or_announced():
    pool = BlockPool(4, BS, enable_prefix_caching=False)
    tokens = list(range(8))
    blocks = pool.allocate(2)
    pool.commit(blocks, chain(tokens), None, tokens)
    pool.free(blocks)
    assert pool.match_prefix(chain(tokens)) == []
    assert pool.drain_events() == []
    assert pool.num_cached_blocks == 0


def test_reset_clears_the_cache_only_when_no_block_is_in_use():
    pool = BlockPool(4, BS)
    tokens = list(range(4))
    blocks = pool.allocate(1)
    pool.commit(blocks, chain(tokens), None, tokens)
    assert pool.reset_prefix_cache() is False
    pool.free(blocks)
    pool.drain_events()
    assert pool.reset_prefix_cache() is True
    assert pool.drain_events() == [AllBlocksCleared()]
    assert pool.match_prefix(chain(tokens)) == []
    assert pool.num_free_blocks == 4


def test_cached_blocks_lists_parents_before_children_even_after_recommit():
    pool = BlockPool(3, BS)
    tokens = list(range(8))
    hashes = chain(tokens)
    blocks = pool.allocate(2)
    pool.commit(blocks, hashes, None, tokens)
    pool.allocate(1)  # keeps the last block busy
    pool.free(blocks)  # head first: the parent is evicted first
    again = pool.allocate(1)
    assert again == blocks[:1] and pool.match_prefix(hashes) == []
    pool.commit(again, hashes[:1], None, tokens[:4])  # parent cached again, after its child
    assert pool.match_prefix(hashes) == blocks
    assert pool.cached_blocks() == [
        stored([hashes[0]], None, tokens[:4]),
        stored([hashes[1]], hashes[0], tokens[4:]),
    ]
