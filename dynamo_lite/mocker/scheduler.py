"""Continuous batching after vLLM v1's scheduler, without a model: who computes how many tokens each step.

Every request has `num_computed` tokens whose KV is in its blocks, out of `num_tokens` (prompt +
output so far). A step gives each scheduled request `min(num_tokens - num_computed, budget)` new
tokens to compute: a (chunk of) prefill, or one token in decode. A request that catches up samples
one output token. Order of a step:

1. Running requests, oldest first, each within the step's token budget (max_num_batched_tokens).
   If its new tokens need a block and none is free, the newest running request is preempted
   (blocks freed, progress kept as output tokens, requeued at the front of the waiting queue, to be
   recomputed), repeatedly, possibly the request itself.
2. If nothing was preempted: waiting requests in order, while max_num_seqs, the budget and free
   blocks allow. A request first takes the longest cached prefix of its full blocks (never all of
   its tokens: the last one is always computed, so its logits exist); those tokens skip prefill.

After computing, newly full blocks are committed to the pool's prefix cache. Finished requests free
their blocks tail first, so a sequence's tail is evicted before its shared prefix.

Pure, synchronous and deterministic: token ids come from each request's seeded random.Random.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from dynamo_lite.mocker.block_pool import BlockPool
from dynamo_lite.protocol.hashing import block_hashes, hash_block
from dynamo_lite.protocol.messages import FinishReason


class SchedRequest:
    """One request as the scheduler sees it. `sink` is the engine's, opaque here."""

    __slots__ = ("request_id", "prompt_len", "tokens", "max_tokens", "min_tokens", "stop_token_ids", "rng",
                 "kv_ready_tokens", "num_computed", "block_ids", "hashes", "num_committed", "cached_tokens",
                 "finish_reason", "final_block_ids", "num_preemptions", "sink")

    def __init__(self, request_id: str, prompt: Sequence[int], max_tokens: int, *, seed: int,
                 min_tokens: int = 0, stop_token_ids: Sequence[int] = (), kv_ready_tokens: int = 0,
                 sink: object = None):
        assert prompt and max_tokens >= 1
        self.request_id = request_id
        self.prompt_len = len(prompt)
        self.tokens: list[int] = list(prompt)  # prompt + output so far
        self.max_tokens = max_tokens
        self.min_tokens = min_tokens
        self.stop_token_ids = frozenset(stop_token_ids)
        self.rng = random.Random(seed)
        # Prompt tokens whose KV another worker computed and transferred (disaggregated decode):
        # admitted as present, not computed here. At most prompt_len - 1 (the last token is computed).
        self.kv_ready_tokens = min(kv_ready_tokens, self.prompt_len - 1)
        self.num_computed = 0
        self.block_ids: list[int] = []
        self.hashes: list[int] = []  # content hashes of full blocks of `tokens`, grown lazily
        self.num_committed = 0  # leading blocks already committed to (or taken from) the prefix cache
        self.cached_tokens: int | None = None  # prefix-cache hit at first admission
        self.finish_reason: FinishReason | None = None
        self.final_block_ids: list[int] = []  # blocks held when it finished (freed, maybe still cached)
        self.num_preemptions = 0
        self.sink = sink

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_output_tokens(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def output_tokens(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    def __repr__(self) -> str:
        return (f"SchedRequest({self.request_id!r}, computed={self.num_computed}/{self.num_tokens}, "
                f"blocks={len(self.block_ids)})")


@dataclass
class StepOutput:
    """What one step did: the work (for the timing model) and the results (for the engine)."""

    scheduled: dict[str, int] = field(default_factory=dict)  # request id -> tokens computed this step
    prefill_tokens: int = 0  # tokens computed for requests still in prefill
    prefill_attention: int = 0  # sum over prefill chunks of new_tokens * context after the chunk
    decode_requests: int = 0  # requests that computed exactly their last sampled token
    sampled_requests: int = 0  # requests that sampled a token (decodes and prefills that completed)
    sampled_context_tokens: int = 0  # their context (prompt + output before this token), summed
    new_tokens: list[tuple[SchedRequest, int]] = field(default_factory=list)  # (request, sampled id)
    finished: list[SchedRequest] = field(default_factory=list)  # finish_reason set; blocks already freed
    preempted: list[SchedRequest] = field(default_factory=list)
    admitted: list[SchedRequest] = field(default_factory=list)  # scheduled for the first time in this step

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, pool: BlockPool, *, max_num_seqs: int, max_num_batched_tokens: int,
                 token_range: tuple[int, int], max_model_len: int):
        self.pool = pool
        self.block_size = pool.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.first_token_id, self.end_token_id = token_range
        assert self.end_token_id > self.first_token_id
        self._token_span = self.end_token_id - self.first_token_id
        self.max_model_len = max_model_len
        self.waiting: deque[SchedRequest] = deque()
        self.running: list[SchedRequest] = []

    # ------------------------------------------------------------------ requests in and out

    def add_request(self, request: SchedRequest) -> None:
        assert request.prompt_len < self.max_model_len, "the engine rejects prompts that leave no room"
        self.waiting.append(request)

    def abort(self, request: SchedRequest) -> bool:
        """Drop a request wherever it is and free its blocks. False if it was not here (already done)."""
        if request.finish_reason is not None:
            return False
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        else:
            return False
        request.finish_reason = FinishReason.ABORT
        self._release(request)
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ------------------------------------------------------------------ one step

    def step(self) -> StepOutput:
        out = StepOutput()
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[SchedRequest, int]] = []

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed, budget)
            if not self._grow_blocks(request, request.num_computed + n, out):
                break  # `request` itself was preempted: it was the last running one
            scheduled.append((request, n))
            budget -= n
            i += 1

        if not out.preempted:
            while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
                request = self.waiting[0]
                first_admission = request.cached_tokens is None
                n = self._admit(request, budget)
                if n == 0:
                    break  # not enough free blocks: keep FCFS order, try again next step
                if first_admission:
                    out.admitted.append(request)
                self.waiting.popleft()
                self.running.append(request)
                scheduled.append((request, n))
                budget -= n

        for request, n in scheduled:
            self._compute(request, n, out)
        if out.finished:
            done = set(map(id, out.finished))
            self.running = [r for r in self.running if id(r) not in done]
        return out

    # ------------------------------------------------------------------ internals

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _grow_blocks(self, request: SchedRequest, num_tokens: int, out: StepOutput) -> bool:
        """Give `request` blocks for `num_tokens`, preempting the newest running requests if needed."""
        need = self._blocks_for(num_tokens) - len(request.block_ids)
        if need <= 0:
            return True
        while need > self.pool.num_free_blocks:
            victim = self.running.pop()
            self._preempt(victim, out)
            if victim is request:
                return False
        new_blocks = self.pool.allocate(need)
        assert new_blocks is not None
        request.block_ids.extend(new_blocks)
        return True

    def _admit(self, request: SchedRequest, budget: int) -> int:
        """Take cached blocks and allocate the first chunk's blocks. Tokens to compute, or 0 if no room."""
        cached: list[int] = []
        if self.pool.enable_prefix_caching:
            # The last token is always computed, so at most (num_tokens - 1) // block_size blocks hit.
            max_hit_blocks = (request.num_tokens - 1) // self.block_size
            self._hash_full_blocks(request, max_hit_blocks)
            cached = self.pool.match_prefix(request.hashes[:max_hit_blocks])
        num_computed = len(cached) * self.block_size
        # Transferred KV (remote prefill) counts as present: only the rest is computed here.
        num_computed = max(num_computed, request.kv_ready_tokens)
        n = min(request.num_tokens - num_computed, budget)
        new_blocks = self._blocks_for(num_computed + n) - len(cached)
        if new_blocks + self.pool.blocks_needed_to_acquire(cached) > self.pool.num_free_blocks:
            return 0
        self.pool.acquire(cached)
        allocated = self.pool.allocate(new_blocks)
        assert allocated is not None
        request.block_ids = cached + allocated
        request.num_computed = num_computed
        request.num_committed = len(cached)
        if request.cached_tokens is None:
            request.cached_tokens = len(cached) * self.block_size
        if num_computed > len(cached) * self.block_size:
            # The transferred blocks now hold KV: cache them as vLLM does after a NIXL read.
            self._commit_full_blocks(request)
        return n

    def _compute(self, request: SchedRequest, n: int, out: StepOutput) -> None:
        # Runs once per scheduled request per step: kept lean (locals, no properties).
        before = request.num_computed
        computed = request.num_computed = before + n
        out.scheduled[request.request_id] = n
        if n == 1 and before >= request.prompt_len:
            out.decode_requests += 1
        else:
            out.prefill_tokens += n
            out.prefill_attention += n * computed
        if computed // self.block_size > request.num_committed:
            self._commit_full_blocks(request)
        tokens = request.tokens
        if computed < len(tokens):
            return  # a prefill chunk that did not reach the end: nothing to sample yet
        # first + floor(random() * span) rather than randrange: a tenth of the cost, as reproducible.
        token = self.first_token_id + int(request.rng.random() * self._token_span)
        out.sampled_requests += 1
        out.sampled_context_tokens += computed
        tokens.append(token)
        out.new_tokens.append((request, token))
        produced = len(tokens) - request.prompt_len
        if request.stop_token_ids and token in request.stop_token_ids and produced >= request.min_tokens:
            request.finish_reason = FinishReason.STOP
        elif produced >= request.max_tokens or len(tokens) >= self.max_model_len:
            request.finish_reason = FinishReason.LENGTH
        else:
            return
        out.finished.append(request)
        request.final_block_ids = list(request.block_ids)
        self._release(request)

    def _hash_full_blocks(self, request: SchedRequest, upto_blocks: int) -> None:
        """Extend request.hashes to cover its first `upto_blocks` full blocks (each hashed once)."""
        have = len(request.hashes)
        if have >= upto_blocks:
            return
        bs = self.block_size
        if have == 0:
            request.hashes = block_hashes(request.tokens[:upto_blocks * bs], bs)
            return
        parent = request.hashes[-1]
        for b in range(have, upto_blocks):
            parent = hash_block(parent, request.tokens[b * bs:(b + 1) * bs])
            request.hashes.append(parent)

    def _commit_full_blocks(self, request: SchedRequest) -> None:
        full = request.num_computed // self.block_size
        first = request.num_committed
        if full <= first:
            return
        request.num_committed = full
        if not self.pool.enable_prefix_caching:
            return
        self._hash_full_blocks(request, full)
        bs = self.block_size
        parent = request.hashes[first - 1] if first else None
        self.pool.commit(request.block_ids[first:full], request.hashes[first:full], parent,
                         request.tokens[first * bs:full * bs])

    def _preempt(self, request: SchedRequest, out: StepOutput) -> None:
        self._release(request)
        request.kv_ready_tokens = 0  # transferred KV is gone with the blocks: recompute it all
        request.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted.append(request)

    def _release(self, request: SchedRequest) -> None:
        self.pool.free(reversed(request.block_ids))
        request.block_ids = []
        request.num_computed = 0
        request.num_committed = 0
