"""The KV router's worker identity: (instance, data-parallel rank), packed into one int.

A worker started with `--data-parallel-size N` is one instance (one lease, one address) whose N ranks each
hold their own KV cache, publish their own events and carry their own load. The router's indexer, active-
block tracker and cost treat each rank as a worker of its own; they key workers by int, so a rank is the
int `instance_id + rank * 2**64`. Instance ids are etcd lease ids (int64, so below 2**63) or the embedded
planes' counters, so the packing never collides, and rank 0 is the instance id itself: a worker without
data parallelism is keyed exactly as before, and logs, metrics and tests that name instance ids still hold.
"""

from __future__ import annotations

from collections.abc import Iterable

RANK_SHIFT = 64
INSTANCE_MASK = (1 << RANK_SHIFT) - 1


def rank_key(instance_id: int, dp_rank: int = 0) -> int:
    """The router's key of one rank of one instance."""
    return instance_id | (dp_rank << RANK_SHIFT)


def split_rank_key(key: int) -> tuple[int, int]:
    """(instance id, dp rank) of a router key."""
    return key & INSTANCE_MASK, key >> RANK_SHIFT


def rank_keys(instance_id: int, data_parallel_size: int) -> list[int]:
    """The keys of every rank of an instance, rank 0 first (ascending, like the instance ids)."""
    return [rank_key(instance_id, rank) for rank in range(max(1, data_parallel_size))]


def expand(instances: Iterable[int], sizes: dict[int, int]) -> list[int]:
    """The rank keys of `instances` (sorted ids), each with the DP size in `sizes` (1 when absent)."""
    return [key for instance_id in instances for key in rank_keys(instance_id, sizes.get(instance_id, 1))]


def label(key: int) -> str:
    """How logs and metrics name a rank: the instance id in hex, with "-dp{rank}" for ranks above 0."""
    instance_id, rank = split_rank_key(key)
    return f"{instance_id:x}-dp{rank}" if rank else f"{instance_id:x}"
