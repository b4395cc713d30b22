"""KvIndexer: which worker holds which KV block, and how much of a prompt each worker has cached.

Block hashes are chained content hashes (protocol.hashing): a block's hash identifies the block *and
every block before it*. A radix tree over token blocks therefore flattens into one dict keyed by block
hash — the path from the root to a node is implied by the node's key. Each entry holds a bitset (a
Python int) of the workers caching that block; workers are mapped to bit positions, so narrowing the
candidate set is one `&` whatever the number of workers.

Semantics (the same as Dynamo's RadixTree, which vLLM's events were designed for):
- A worker's overlap with a prompt is the number of leading prompt blocks it holds *contiguously*:
  a worker that lost block k (evicted) is not credited for blocks after k even if it still holds them,
  because vLLM's prefix cache cannot use them either.
- `BlockStored` with a `parent_block_hash` is accepted only if that worker holds the parent (vLLM
  stores a request's new blocks after blocks the request is using, so a missing parent means the
  router missed events). Such an event is logged and dropped whole; the worker's other events apply.
  Blocks the worker already holds are left as they are (storing a chain again is harmless).
- `BlockRemoved` of a block the worker does not hold is ignored (logged at debug). Removing a block
  that still has descendants keeps the descendants (vLLM evicts leaves first, so this is rare); they
  stop counting for that worker until the block is stored again.
- A block is forgotten when no worker holds it any more.

Why lookups are fast: the index knows each worker's "orphans" (held blocks whose parent it does not
hold). For a worker without orphans, holding prompt block i implies holding blocks 0..i-1, so the set
of workers holding all of blocks 0..i only shrinks as i grows, and the depth where it shrinks is found
by binary search: a 256-block prompt costs a few dozen dict lookups, not 256. A prompt whose first
block is held by a worker with orphans is walked block by block instead (exact either way).

Why stores are fast: a worker's blocks are kept as runs (the chain of one BlockStored event), so a
store costs one dict insert per block for the worker plus one for the bitsets, and a block's parent
and children are read off its run when it is removed.

Pure: no I/O, no asyncio, deterministic.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable, Sequence
from itertools import accumulate, compress, repeat, takewhile
from operator import and_, ne

from dynamo_lite.protocol.messages import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent

logger = logging.getLogger(__name__)

# bin(mask) reversed gives '0'/'1' characters per bit; this table turns them into 0/1 bytes so
# itertools.compress can pick the workers of a bitset without a Python-level loop.
_BIT_CHARS_TO_FLAGS = bytes.maketrans(b"01", b"\x00\x01")


class _WorkerBlocks:
    """One worker's blocks, as runs: a run is (parent of its first block, its chain of blocks).

    Invariants, for orphan counting:
    - held children of a held block b = branch[b] (runs whose first block's parent is b) + 1 if the
      block after b in b's run is held through that same run;
    - held children of a block b not held = waiting[b]; successor[b] remembers the run-successor b had
      when it was removed, so storing b again moves that successor (if its run still follows b) into
      a run whose parent is b.
    """

    __slots__ = ("bit", "held", "branch", "waiting", "successor", "orphans")

    def __init__(self, bit: int) -> None:
        self.bit = bit  # 1 << position
        self.held: dict[int, tuple[int | None, list[int]]] = {}  # block -> its run
        self.branch: dict[int, int] = {}
        self.waiting: dict[int, int] = {}
        self.successor: dict[int, int] = {}
        self.orphans = 0  # held blocks whose parent the worker does not hold

    def add_chain(self, chain: list[int], parent: int | None) -> list[int] | None:
        """Hold `chain` (a fresh list) after `parent` (held). Returns the blocks that are new to the
        worker, or None if the chain repeats a hash (nothing changed)."""
        held = self.held
        if not held.keys().isdisjoint(chain):
            # Usually a chain stored again from its start: skip the prefix the worker already holds.
            flags = list(map(held.__contains__, chain))
            skip = flags.index(False) if False in flags else len(chain)
            if True in flags[skip:]:
                return self._add_one_by_one(chain, parent)
            if skip == len(chain):
                return []
            parent, chain = chain[skip - 1], chain[skip:]
        if self.waiting and not self.waiting.keys().isdisjoint(chain):
            return self._add_one_by_one(chain, parent)  # the chain adopts orphans
        run = (parent, chain)
        known = len(held)
        held.update(zip(chain, repeat(run)))
        if len(held) - known != len(chain):  # a hash repeats: not a chain of content hashes
            for block_hash in chain:
                if held.get(block_hash) is run:
                    del held[block_hash]
            return None
        if parent is not None:
            self.branch[parent] = self.branch.get(parent, 0) + 1
        return chain

    def remove(self, block_hash: int) -> bool:
        run = self.held.pop(block_hash, None)
        if run is None:
            return False
        first_parent, chain = run
        next_held = False
        if chain[-1] == block_hash:  # runs are usually evicted from their tail: O(1)
            index = len(chain) - 1
            chain.pop()
        else:
            index = chain.index(block_hash)
            following = chain[index + 1]
            next_held = self.held.get(following) is run
        parent = chain[index - 1] if index else first_parent
        if parent is not None:
            if not index:
                _decrement(self.branch, parent)
            if parent not in self.held:  # it was an orphan itself
                self.orphans -= 1
                if not _decrement(self.waiting, parent):
                    self.successor.pop(parent, None)
        children = self.branch.get(block_hash, 0) + next_held
        if children:  # they become orphans
            self.orphans += children
            self.waiting[block_hash] = children
            if next_held:
                self.successor[block_hash] = following
        return True

    def clear(self) -> None:
        for table in (self.held, self.branch, self.waiting, self.successor):
            table.clear()
        self.orphans = 0

    def _add_one_by_one(self, chain: list[int], parent: int | None) -> list[int] | None:
        if len(set(chain)) != len(chain):
            return None
        held, added = self.held, []
        for block_hash in chain:
            if block_hash not in held:
                held[block_hash] = (parent, [block_hash])
                if parent is not None:
                    self.branch[parent] = self.branch.get(parent, 0) + 1
                if block_hash in self.waiting:
                    self._adopt(block_hash)
                added.append(block_hash)
            parent = block_hash
        return added

    def _adopt(self, block_hash: int) -> None:
        """`block_hash` is held again: its waiting children are orphans no more."""
        self.orphans -= self.waiting.pop(block_hash)
        following = self.successor.pop(block_hash, None)
        run = self.held.get(following) if following is not None else None
        if run is None:
            return
        chain = run[1]
        index = chain.index(following)
        if index and chain[index - 1] == block_hash:
            # The successor sits in a run this block has left: give it (and the rest of that run) a run
            # of its own whose parent is this block, so the invariants above keep holding.
            new_run = (block_hash, chain[index:])
            del chain[index:]
            for moved in new_run[1]:
                if self.held.get(moved) is run:
                    self.held[moved] = new_run
            self.branch[block_hash] = self.branch.get(block_hash, 0) + 1


def _decrement(counts: dict[int, int], key: int) -> int:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
    return left


class KvIndexer:
    """Prefix-cache index of every worker's KV blocks, fed by KV events."""

    def __init__(self, block_size: int | None = None) -> None:
        # block_size: if set, BlockStored events of another block size are dropped (their hashes could
        # never match the router's, and it means the engine and router are configured differently).
        self.block_size = block_size
        self._masks: dict[int, int] = {}  # block hash -> bitset of workers holding it
        self._workers: dict[int, _WorkerBlocks] = {}
        self._bit_worker: list[int | None] = []  # bit position -> worker id (None: free)
        self._free_bits: list[int] = []  # heap of released positions, reused lowest first
        self._with_orphans = 0  # bitset of workers that have orphans (looked up block by block)
        self.dropped_events = 0  # events rejected as inconsistent (counted for metrics and tests)

    # ------------------------------------------------------------------ events

    def apply_event(self, worker_id: int, event: KvEvent) -> bool:
        """Apply one KV event from `worker_id`. Returns False if it was dropped as inconsistent."""
        if isinstance(event, BlockStored):
            if self.block_size is not None and event.block_size != self.block_size:
                logger.warning("worker %x: dropped BlockStored with block_size %s (router uses %s)",
                               worker_id, event.block_size, self.block_size)
                self.dropped_events += 1
                return False
            return self.store_blocks(worker_id, event.block_hashes, event.parent_block_hash)
        if isinstance(event, BlockRemoved):
            self.remove_blocks(worker_id, event.block_hashes)
            return True
        if isinstance(event, AllBlocksCleared):
            self.clear_worker(worker_id)
            return True
        logger.warning("worker %x: dropped unknown KV event %r", worker_id, type(event).__name__)
        self.dropped_events += 1
        return False

    def apply_events(self, worker_id: int, events: Iterable[KvEvent]) -> int:
        """Apply events in order; returns how many were dropped."""
        dropped = 0
        for event in events:
            if not self.apply_event(worker_id, event):
                dropped += 1
        return dropped

    def store_blocks(self, worker_id: int, block_hashes: Sequence[int],
                     parent_hash: int | None = None) -> bool:
        """Record that `worker_id` caches the chain `block_hashes`, following `parent_hash`."""
        worker = self._worker(worker_id)
        if parent_hash is not None and parent_hash not in worker.held:
            logger.warning("worker %x: dropped BlockStored of %d blocks: parent %x not held by that worker",
                           worker_id, len(block_hashes), parent_hash)
            self.dropped_events += 1
            return False
        added = worker.add_chain(list(block_hashes), parent_hash)
        if added is None:
            logger.warning("worker %x: dropped BlockStored repeating a block hash", worker_id)
            self.dropped_events += 1
            return False
        # One probe per block: blocks nobody held get the worker's bit object itself; blocks other
        # workers hold are then OR-ed one by one.
        bit, masks = worker.bit, self._masks
        before = list(map(masks.setdefault, added, repeat(bit)))
        if before.count(bit) != len(before):
            masks.update([(h, mask | bit) for h, mask in zip(added, before) if mask is not bit])
        self._update_orphan_bit(worker)
        return True

    def remove_blocks(self, worker_id: int, block_hashes: Iterable[int]) -> int:
        """Forget that `worker_id` caches these blocks; returns how many it actually held."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return 0
        bit, masks = worker.bit, self._masks
        removed = 0
        for block_hash in block_hashes:
            if not worker.remove(block_hash):
                logger.debug("worker %x: removal of unknown block %x ignored", worker_id, block_hash)
                continue
            removed += 1
            remaining = masks[block_hash] ^ bit
            if remaining:
                masks[block_hash] = remaining
            else:
                del masks[block_hash]
        self._update_orphan_bit(worker)
        return removed

    def clear_worker(self, worker_id: int) -> None:
        """Forget every block of `worker_id` (AllBlocksCleared); the worker stays known."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return
        masks, bit = self._masks, worker.bit
        for block_hash in worker.held:
            remaining = masks[block_hash] ^ bit
            if remaining:
                masks[block_hash] = remaining
            else:
                del masks[block_hash]
        worker.clear()
        self._update_orphan_bit(worker)

    def remove_worker(self, worker_id: int) -> None:
        """Forget the worker entirely and release its bit position."""
        self.clear_worker(worker_id)
        worker = self._workers.pop(worker_id, None)
        if worker is None:
            return
        position = worker.bit.bit_length() - 1
        self._bit_worker[position] = None
        heapq.heappush(self._free_bits, position)

    def clear(self) -> None:
        """Forget everything."""
        for worker_id in list(self._workers):
            self.remove_worker(worker_id)

    # ------------------------------------------------------------------ queries

    def find_matches(self, block_hashes: Sequence[int]) -> dict[int, int]:
        """Overlap per worker: how many leading blocks of `block_hashes` each worker holds.

        Workers with no overlap are absent from the result.
        """
        if not block_hashes:
            return {}
        get = self._masks.get
        holders = get(block_hashes[0], 0)
        if not holders:
            return {}
        if holders & self._with_orphans:
            return self._walk(block_hashes, 1, holders, {})
        # Among workers without orphans, whoever holds block j holds all blocks before it, so the
        # workers of `holders` holding block j, R(j) = masks[j] & holders, only shrink as j grows. Split
        # [0, n) in halves, skipping every half whose ends have equal R: its inside is equal too. The
        # cost is a few probes per distinct overlap depth, rather than one per prompt block.
        scores: dict[int, int] = {}
        credit = self._credit
        intervals = [(0, len(block_hashes), holders, 0)]  # (lo, hi, R(lo), R(hi)); R(n) = 0
        pop, push = intervals.pop, intervals.append
        while intervals:
            lo, hi, at_lo, at_hi = pop()
            if hi - lo == 1:
                credit(scores, at_lo ^ at_hi, hi)  # workers holding block lo but not block hi
                continue
            mid = (lo + hi) >> 1
            at_mid = get(block_hashes[mid], 0) & holders
            if at_mid != at_hi:
                push((mid, hi, at_mid, at_hi))
            if at_mid != at_lo:
                push((lo, mid, at_lo, at_mid))
        return scores

    def workers(self) -> list[int]:
        """Workers the index knows about, sorted."""
        return sorted(self._workers)

    def blocks_of(self, worker_id: int) -> frozenset[int]:
        worker = self._workers.get(worker_id)
        return frozenset(worker.held) if worker else frozenset()

    def block_count(self, worker_id: int | None = None) -> int:
        """Blocks held by `worker_id`, or distinct blocks held by anyone."""
        if worker_id is None:
            return len(self._masks)
        worker = self._workers.get(worker_id)
        return len(worker.held) if worker else 0

    def holders(self, block_hash: int) -> list[int]:
        """Workers holding `block_hash`, sorted."""
        return sorted(self._workers_in(self._masks.get(block_hash, 0)))

    def orphan_count(self, worker_id: int) -> int:
        worker = self._workers.get(worker_id)
        return worker.orphans if worker else 0

    # ------------------------------------------------------------------ helpers

    def _walk(self, block_hashes: Sequence[int], start: int, holders: int,
              scores: dict[int, int]) -> dict[int, int]:
        """Credit the workers of `holders` (which hold blocks 0..start-1) with their depth, walking
        block by block: the running intersection is computed at C speed until it is empty, and only
        the depths where it changes are visited in Python."""
        running = list(takewhile(bool, accumulate(map(self._masks.get, block_hashes[start:], repeat(0)),
                                                  and_, initial=holders)))
        for k in compress(range(1, len(running)), map(ne, running, running[1:])):
            self._credit(scores, running[k - 1] ^ running[k], start + k - 1)
        self._credit(scores, running[-1], start + len(running) - 1)
        return scores

    def _credit(self, scores: dict[int, int], workers: int, depth: int) -> None:
        if workers & (workers - 1):
            scores.update(dict.fromkeys(self._workers_in(workers), depth))
        else:  # a single worker
            scores[self._bit_worker[workers.bit_length() - 1]] = depth

    def _update_orphan_bit(self, worker: _WorkerBlocks) -> None:
        assert worker.orphans >= 0, "orphan count went negative"
        if worker.orphans:
            self._with_orphans |= worker.bit
        else:
            self._with_orphans &= ~worker.bit

    def _worker(self, worker_id: int) -> _WorkerBlocks:
        worker = self._workers.get(worker_id)
        if worker is not None:
            return worker
        if self._free_bits:
            position = heapq.heappop(self._free_bits)
            self._bit_worker[position] = worker_id
        else:
            position = len(self._bit_worker)
            self._bit_worker.append(worker_id)
        worker = self._workers[worker_id] = _WorkerBlocks(1 << position)
        return worker

    def _workers_in(self, mask: int) -> Iterable[int]:
        flags = bin(mask)[:1:-1].encode().translate(_BIT_CHARS_TO_FLAGS)  # flags[i] = bit i
        return compress(self._bit_worker, flags)
