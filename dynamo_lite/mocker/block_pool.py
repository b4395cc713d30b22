"""A paged KV block pool with prefix caching, as in vLLM v1's BlockPool, minus the tensors.

Blocks are ids 0..num_blocks-1. A block in use has a reference count (one per request holding it).
A full block whose KV has been computed is *committed* under its content hash (protocol.hashing),
so later requests with the same prefix reuse it. When its last holder frees it, a committed block
stays cached but becomes evictable; allocation takes never-committed free blocks first and then
evicts cached ones in least-recently-freed order. Every change of the cached set is recorded as a
KV event (BlockStored / BlockRemoved / AllBlocksCleared) for the engine to drain and publish.

Pure and synchronous: no asyncio, no clocks, deterministic.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence

from dynamo_lite.protocol.messages import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks  # content hash of committed blocks
        self._cached: dict[int, int] = {}  # content hash -> block id
        # Per committed block: (parent hash, its token ids), to describe the cached set on a resync.
        self._block_meta: dict[int, tuple[int | None, Sequence[int]]] = {}
        # Free blocks never committed (or whose hash was dropped): handed out first, lowest ids first.
        self._free_uncached: deque[int] = deque(range(num_blocks))
        # Committed blocks nobody holds, oldest-freed first: the eviction order.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._events: list[KvEvent] = []

    # ------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take right now (free, or cached but unreferenced)."""
        return len(self._free_uncached) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by at least one request."""
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def match_prefix(self, block_hashes: Sequence[int]) -> list[int]:
        """Block ids of the longest cached prefix of the chain `block_hashes` (nothing is acquired)."""
        if not self.enable_prefix_caching:
            return []
        matched: list[int] = []
        cached = self._cached
        for block_hash in block_hashes:
            block_id = cached.get(block_hash)
            if block_id is None:
                break
            matched.append(block_id)
        return matched

    def blocks_needed_to_acquire(self, cached_block_ids: Sequence[int]) -> int:
        """How many free-pool blocks acquiring these cached blocks consumes (the unreferenced ones)."""
        refs = self._ref_counts
        return sum(1 for block_id in cached_block_ids if refs[block_id] == 0)

    def cached_blocks(self) -> list[BlockStored]:
        """The whole cached set as one BlockStored per block, parents before children (for a resync)."""
        ordered: list[int] = []
        seen: set[int] = set()
        for block_hash in self._cached:
            # Walk up to the oldest cached ancestor not yet listed, then list downwards.
            chain: list[int] = []
            current: int | None = block_hash
            while current is not None and current in self._cached and current not in seen:
                seen.add(current)
                chain.append(current)
                current = self._block_meta[self._cached[current]][0]
            ordered.extend(reversed(chain))
        stored: list[BlockStored] = []
        for block_hash in ordered:
            parent, tokens = self._block_meta[self._cached[block_hash]]
            stored.append(BlockStored(block_hashes=[block_hash], parent_block_hash=parent,
                                      token_ids=list(tokens), block_size=self.block_size))
        return stored

    # ------------------------------------------------------------------ mutations

    def acquire(self, cached_block_ids: Sequence[int]) -> None:
        """Take a reference on cached blocks found by match_prefix."""
        refs = self._ref_counts
        for block_id in cached_block_ids:
            if refs[block_id] == 0:
                del self._evictable[block_id]
            refs[block_id] += 1

    def allocate(self, count: int) -> list[int] | None:
        """`count` fresh blocks with one reference each, or None (and no change) if too few are free."""
        if count > self.num_free_blocks:
            return None
        taken: list[int] = []
        removed: list[int] = []
        free_uncached, refs = self._free_uncached, self._ref_counts
        while len(taken) < count and free_uncached:
            taken.append(free_uncached.popleft())
        while len(taken) < count:
            block_id, _ = self._evictable.popitem(last=False)
            block_hash = self._block_hash[block_id]
            assert block_hash is not None
            del self._cached[block_hash]
            del self._block_meta[block_id]
            self._block_hash[block_id] = None
            removed.append(block_hash)
            taken.append(block_id)
        for block_id in taken:
            refs[block_id] = 1
        if removed:
            self._events.append(BlockRemoved(block_hashes=removed))
        return taken

    def commit(self, block_ids: Sequence[int], block_hashes: Sequence[int], parent_hash: int | None,
               token_ids: Sequence[int]) -> None:
        """Cache newly computed full blocks: a chain continuing `parent_hash`.

        token_ids holds exactly len(block_ids) * block_size tokens. A hash already cached under another
        block (two requests computed the same prefix at once) keeps the first block, as vLLM does; the
        duplicate stays uncached and returns to the free list when released.
        """
        if not self.enable_prefix_caching or not block_ids:
            return
        assert len(block_ids) == len(block_hashes) and len(token_ids) == len(block_ids) * self.block_size
        bs = self.block_size
        run_hashes: list[int] = []
        run_start = 0
        run_parent = parent_hash
        previous = parent_hash
        for i, (block_id, block_hash) in enumerate(zip(block_ids, block_hashes)):
            if block_hash in self._cached or self._block_hash[block_id] is not None:
                # Not stored by us: end the current run of stored blocks.
                self._emit_stored(run_hashes, run_parent, token_ids[run_start * bs:i * bs])
                run_hashes, run_start, run_parent = [], i + 1, block_hash
            else:
                self._cached[block_hash] = block_id
                self._block_hash[block_id] = block_hash
                self._block_meta[block_id] = (previous, token_ids[i * bs:(i + 1) * bs])
                run_hashes.append(block_hash)
            previous = block_hash
        run_end = run_start + len(run_hashes)
        self._emit_stored(run_hashes, run_parent, token_ids[run_start * bs:run_end * bs])

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference per block. Free in reverse chain order so a sequence's tail is evicted first."""
        refs, block_hash, evictable, free_uncached = (self._ref_counts, self._block_hash, self._evictable,
                                                      self._free_uncached)
        for block_id in block_ids:
            refs[block_id] -= 1
            assert refs[block_id] >= 0, f"block {block_id} freed twice"
            if refs[block_id] == 0:
                if block_hash[block_id] is not None:
                    evictable[block_id] = None
                else:
                    free_uncached.append(block_id)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (only possible when no block is in use). Emits AllBlocksCleared."""
        if self.num_used_blocks:
            return False
        for block_id in self._evictable:
            self._block_hash[block_id] = None
            self._free_uncached.append(block_id)
        self._evictable.clear()
        self._cached.clear()
        self._block_meta.clear()
        if self.enable_prefix_caching:
            self._events.append(AllBlocksCleared())
        return True

    def drain_events(self) -> list[KvEvent]:
        """KV events since the last drain, in the order they happened."""
        events, self._events = self._events, []
        return events

    def _emit_stored(self, hashes: list[int], parent: int | None, token_ids: Sequence[int]) -> None:
        if hashes:
            self._events.append(BlockStored(block_hashes=hashes, parent_block_hash=parent,
                                            token_ids=list(token_ids), block_size=self.block_size))
