"""The kv router's (instance, data-parallel rank) identity, and KvRouter over rank keys."""

from __future__ import annotations

from dynamo_lite.protocol import keys
from dynamo_lite.protocol.hashing import block_hashes
from dynamo_lite.protocol.messages import BlockStored, KvEventBatch
from dynamo_lite.router import dp_ranks
from dynamo_lite.router.kv_router import KvRouter
from dynamo_lite.router.metrics import worker_label

LEASE = 0x694DA237D1A5AC07  # an etcd lease id (int64)


def test_rank_zero_is_the_instance_id_and_other_ranks_round_trip():
    assert dp_ranks.rank_key(LEASE, 0) == LEASE
    for rank in (0, 1, 7):
        assert dp_ranks.split_rank_key(dp_ranks.rank_key(LEASE, rank)) == (LEASE, rank)
    assert dp_ranks.rank_keys(LEASE, 3) == [LEASE, LEASE + (1 << 64), LEASE + (2 << 64)]
    assert dp_ranks.expand([5, LEASE], {LEASE: 2}) == [5, LEASE, dp_ranks.rank_key(LEASE, 1)]


def test_labels_and_resync_subjects_keep_rank_zero_as_before():
    assert worker_label(LEASE) == "694da237d1a5ac07"
    assert worker_label(dp_ranks.rank_key(LEASE, 1)) == "694da237d1a5ac07-dp1"
    assert keys.resync_subject("ns", LEASE) == "ns.resync.694da237d1a5ac07"
    assert keys.resync_subject("ns", LEASE, 1) == "ns.resync.694da237d1a5ac07.1"


def test_kv_router_routes_a_prefix_to_the_rank_whose_events_announced_it():
    router = KvRouter(4)
    tokens = list(range(1, 17))
    rank1 = dp_ranks.rank_key(LEASE, 1)
    stored = BlockStored(block_hashes=block_hashes(tokens, 4), parent_block_hash=None, token_ids=tokens,
                         block_size=4)
    assert router.apply_batch(KvEventBatch(worker_id=rank1, seq=1, events=[stored]))
    decision = router.route("r", tokens + [99], dp_ranks.rank_keys(LEASE, 2))
    assert dp_ranks.split_rank_key(decision.worker_id) == (LEASE, 1) and decision.overlap_blocks == 4
    # The other rank's stream is separate: its own first batch is seq 1 too, not a gap.
    assert router.apply_batch(KvEventBatch(worker_id=LEASE, seq=1, events=[]))
