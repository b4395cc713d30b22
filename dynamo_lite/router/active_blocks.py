"""ActiveBlockTracker: the load the router itself has put on each worker, in KV blocks.

The router cannot wait for load reports to learn about the requests it just dispatched, so it counts
them itself: added on dispatch, prefill part dropped at first token, freed at the end:

- On dispatch (`add_request`), the request's prompt blocks become active on its worker: the full
  blocks it passes by content hash (the KV router passes those the worker does not have cached yet:
  the prefill work), and `extra_blocks` (the partial last block) on their own.
  Full blocks are reference-counted per worker, so requests sharing a prefix on the same worker
  count the shared blocks once, as the engine's prefix cache does.
- At the first token (`prefill_done`), the prefill part is dropped: the prompt blocks are released
  and the request counts `decode_blocks` (default 1) instead while it decodes. The router gets no
  per-token callback, so the decode footprint is a constant per running request.
- At the end (`finish`), whatever the request still counts is released. Unknown ids are ignored, so
  calling `finish` twice, or after `remove_worker`, is harmless.

active_blocks(worker) = distinct prompt blocks of its prefilling requests
                        + extra blocks of its prefilling requests
                        + decode_blocks x its decoding requests.

Pure: no I/O, no asyncio, deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class _RequestLoad:
    worker_id: int
    prompt_hashes: Sequence[int]
    extra_blocks: int
    prefilling: bool = True


@dataclass
class _WorkerLoad:
    # prompt block hash -> how many prefilling requests use it
    refcounts: dict[int, int] = field(default_factory=dict)
    extra_blocks: int = 0  # unshared blocks (partial last blocks) of prefilling requests
    decoding_requests: int = 0
    prefilling_requests: int = 0
    requests: set[str] = field(default_factory=set)


class ActiveBlockTracker:
    def __init__(self, decode_blocks: int = 1) -> None:
        if decode_blocks < 0:
            raise ValueError("decode_blocks must be >= 0")
        self.decode_blocks = decode_blocks
        self._requests: dict[str, _RequestLoad] = {}
        self._workers: dict[int, _WorkerLoad] = {}

    def add_request(self, request_id: str, worker_id: int, prompt_hashes: Sequence[int],
                    extra_blocks: int = 0) -> None:
        """Count a dispatched request's prompt on `worker_id`. A known id is finished first
        (a migrated request is routed again under the same id)."""
        if request_id in self._requests:
            self.finish(request_id)
        load = self._workers.get(worker_id)
        if load is None:
            load = self._workers[worker_id] = _WorkerLoad()
        refcounts = load.refcounts
        for block_hash in prompt_hashes:
            refcounts[block_hash] = refcounts.get(block_hash, 0) + 1
        load.extra_blocks += extra_blocks
        load.prefilling_requests += 1
        load.requests.add(request_id)
        self._requests[request_id] = _RequestLoad(worker_id, tuple(prompt_hashes), extra_blocks)

    def prefill_done(self, request_id: str) -> None:
        """First token: release the prompt blocks, count the decode footprint. Idempotent."""
        request = self._requests.get(request_id)
        if request is None or not request.prefilling:
            return
        load = self._workers[request.worker_id]
        self._release_prompt(load, request)
        request.prefilling = False
        load.prefilling_requests -= 1
        load.decoding_requests += 1

    def finish(self, request_id: str) -> None:
        """The request ended: release everything it counts. Unknown ids are ignored."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        load = self._workers[request.worker_id]
        if request.prefilling:
            self._release_prompt(load, request)
            load.prefilling_requests -= 1
        else:
            load.decoding_requests -= 1
        load.requests.discard(request_id)
        if not load.requests:
            del self._workers[request.worker_id]

    def remove_worker(self, worker_id: int) -> None:
        """Forget the worker and every request on it."""
        load = self._workers.pop(worker_id, None)
        if load is None:
            return
        for request_id in load.requests:
            del self._requests[request_id]

    # ------------------------------------------------------------------ queries

    def active_blocks(self, worker_id: int) -> int:
        load = self._workers.get(worker_id)
        if load is None:
            return 0
        return len(load.refcounts) + load.extra_blocks + self.decode_blocks * load.decoding_requests

    def prefilling_requests(self, worker_id: int) -> int:
        """Requests on the worker that have not had their first token yet."""
        load = self._workers.get(worker_id)
        return 0 if load is None else load.prefilling_requests

    def active_requests(self, worker_id: int) -> int:
        load = self._workers.get(worker_id)
        return 0 if load is None else len(load.requests)

    def worker_of(self, request_id: str) -> int | None:
        request = self._requests.get(request_id)
        return None if request is None else request.worker_id

    def __len__(self) -> int:
        return len(self._requests)

    @staticmethod
    def _release_prompt(load: _WorkerLoad, request: _RequestLoad) -> None:
        refcounts = load.refcounts
        for block_hash in request.prompt_hashes:
            remaining = refcounts[block_hash] - 1
            if remaining:
                refcounts[block_hash] = remaining
            else:
                del refcounts[block_hash]
        load.extra_blocks -= request.extra_blocks
