"""ActiveBlockTracker: exact active-block counts through a request's life."""

from __future__ import annotations

import pytest

from dynamo_lite.router.active_blocks import ActiveBlockTracker

W1, W2 = 1, 2


def test_dispatch_counts_prompt_blocks_and_partial_block():
    tracker = ActiveBlockTracker()
    tracker.add_request("r1", W1, [11, 12, 13], extra_blocks=1)
    assert tracker.active_blocks(W1) == 4
    assert tracker.active_blocks(W2) == 0
    assert tracker.worker_of("r1") == W1


def test_requests_sharing_a_prefix_on_one_worker_count_it_once():
    tracker = ActiveBlockTracker()
    tracker.add_request("r1", W1, [11, 12, 13], extra_blocks=1)
    tracker.add_request("r2", W1, [11, 12, 14])
    tracker.add_request("r3", W2, [11, 12, 13])
    assert tracker.active_blocks(W1) == 5  # {11, 12, 13, 14} + r1's partial block
    assert tracker.active_blocks(W2) == 3  # other workers do not share


def test_first_token_drops_the_prefill_part_and_end_frees_the_rest():
    tracker = ActiveBlockTracker(decode_blocks=1)
    tracker.add_request("r1", W1, [11, 12, 13], extra_blocks=1)
    tracker.add_request("r2", W1, [11, 12, 14])
    tracker.prefill_done("r1")
    assert tracker.active_blocks(W1) == 3 + 1  # r2's {11, 12, 14} + r1 decoding
    tracker.prefill_done("r1")  # idempotent
    assert tracker.active_blocks(W1) == 4
    tracker.finish("r1")
    assert tracker.active_blocks(W1) == 3
    tracker.finish("r2")  # finished while still prefilling (e.g. cancelled)
    assert tracker.active_blocks(W1) == 0
    assert len(tracker) == 0


def test_decode_blocks_per_request_is_configurable():
    tracker = ActiveBlockTracker(decode_blocks=0)
    tracker.add_request("r1", W1, [11, 12])
    tracker.prefill_done("r1")
    assert tracker.active_blocks(W1) == 0
    assert tracker.active_requests(W1) == 1
    with pytest.raises(ValueError):
        ActiveBlockTracker(decode_blocks=-1)


def test_unknown_and_repeated_ids_are_ignored():
    tracker = ActiveBlockTracker()
    tracker.finish("nope")
    tracker.prefill_done("nope")
    tracker.add_request("r1", W1, [11])
    tracker.finish("r1")
    tracker.finish("r1")
    assert tracker.active_blocks(W1) == 0


def test_routing_an_id_again_moves_it():
    """Migration routes the same request id again: its old load is released first."""
    tracker = ActiveBlockTracker()
    tracker.add_request("r1", W1, [11, 12])
    tracker.prefill_done("r1")
    tracker.add_request("r1", W2, [11, 12, 13])
    assert tracker.active_blocks(W1) == 0
    assert tracker.active_blocks(W2) == 3
    assert tracker.worker_of("r1") == W2


def test_remove_worker_forgets_its_requests_at_once():
    tracker = ActiveBlockTracker()
    tracker.add_request("r1", W1, [11, 12])
    tracker.add_request("r2", W1, [11, 13])
    tracker.add_request("r3", W2, [11])
    tracker.remove_worker(W1)
    assert tracker.active_blocks(W1) == 0
    assert tracker.worker_of("r1") is None
    tracker.finish("r1")  # the frontend still reports the end: ignored
    tracker.prefill_done("r2")
    assert tracker.active_blocks(W2) == 1
    assert len(tracker) == 1
