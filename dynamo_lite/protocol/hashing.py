"""Content hashes of KV blocks: the one hash every worker and router agree on.

A block's hash chains its parent's hash with its token ids (xxh3_64), so equal hashes mean equal
prefixes. Only full blocks are hashed: a partial last block is never cached or routed on.
"""

from __future__ import annotations

import array

import xxhash

ROOT_HASH_SEED = 0


def hash_block(parent_hash: int | None, token_ids) -> int:
    """Hash one full block given its parent's hash (None for the first block)."""
    data = array.array("q", token_ids).tobytes()
    seed = ROOT_HASH_SEED if parent_hash is None else parent_hash
    return xxhash.xxh3_64_intdigest(data, seed=seed)


def block_hashes(token_ids, block_size: int, parent_hash: int | None = None) -> list[int]:
    """Chained hashes of every full block of token_ids."""
    hashes: list[int] = []
    parent = parent_hash
    full = len(token_ids) - len(token_ids) % block_size
    for start in range(0, full, block_size):
        parent = hash_block(parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return hashes
