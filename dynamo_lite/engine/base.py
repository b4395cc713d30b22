"""The Engine interface: what the worker shell needs from an inference engine.

Invariants:
- `start()` returns once the engine can serve; `info` is valid from then on.
- `generate()` yields GenerateFrames for one request; the first frame carries prompt_tokens and
  cached_tokens, the final one finish_reason and last=True. If the consumer stops iterating
  (aclose / task cancellation), the engine aborts the request and frees its KV blocks.
- A request the engine rejects raises protocol.errors.EngineError (or InvalidRequestError) before
  or while yielding; the shell turns it into an ErrorFrame.
- `kv_events()` yields lists of KV events (content-hashed, protocol.messages) in the order the
  engine produced them, until shutdown. Engines without prefix-cache events yield nothing.
- A data-parallel engine (`info.data_parallel_size` N > 1) runs N ranks, each with its own KV cache:
  `rank_kv_events()` yields (rank, events) and `rank_loads()` one load per rank; `generate()` runs a
  request on `request.dp_rank` when set (else on a rank of its choice) and refuses a rank out of range.
  The defaults describe a single rank 0.
- `shutdown()` is safe to call twice.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from dynamo_lite.protocol.errors import InvalidRequestError
from dynamo_lite.protocol.messages import EmbedReply, EmbedRequest, GenerateFrame, GenerateRequest, KvEvent


@dataclass(frozen=True)
class EngineInfo:
    model_name: str  # served model name
    model_path: str  # folder holding config.json and tokenizer files
    context_length: int
    kv_block_size: int
    total_kv_blocks: int
    model_aliases: tuple[str, ...] = ()  # more names clients may use (vLLM's --served-model-name a b)
    runner: str = "generate"  # "pooling": an embedding model (ModelCard.runner)
    data_parallel_size: int = 1  # ranks behind this engine (InstanceRecord.data_parallel_size)


@dataclass(frozen=True)
class EngineLoad:
    active_blocks: int
    total_blocks: int
    running_requests: int
    waiting_requests: int


@dataclass(frozen=True)
class TransferTotals:
    """KV bytes this engine's connector moved (NIXL reads on a decode worker) since it started."""

    bytes: int = 0
    seconds: float = 0.0
    transfers: int = 0


class Engine(abc.ABC):
    @abc.abstractmethod
    async def start(self) -> EngineInfo: ...

    @abc.abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateFrame]: ...

    @abc.abstractmethod
    def kv_events(self) -> AsyncIterator[list[KvEvent]]: ...

    @abc.abstractmethod
    def load(self) -> EngineLoad: ...

    @abc.abstractmethod
    async def shutdown(self) -> None: ...

    async def rank_kv_events(self) -> AsyncIterator[tuple[int, list[KvEvent]]]:
        """kv_events() tagged with the data-parallel rank they come from (one rank: always 0)."""
        async for events in self.kv_events():
            yield 0, events

    def rank_loads(self) -> list[EngineLoad]:
        """The load of each data-parallel rank, rank 0 first (one rank: load())."""
        return [self.load()]

    def transfer_totals(self) -> TransferTotals:
        """Running totals of KV transfers (engines without a KV connector move none)."""
        return TransferTotals()

    def prometheus_registry(self) -> Any:
        """The prometheus_client registry holding the engine's own metrics (vLLM's `vllm:` ones), or None
        for prometheus_client's default registry (process metrics)."""
        return None

    def failure(self) -> str | None:
        """Why the engine can no longer serve (its engine process died), or None while it can. The worker
        shell polls it every second and, once it is set, deregisters and exits non-zero."""
        return None

    async def embed(self, request: EmbedRequest) -> EmbedReply:
        """Embeddings of request.prompts (pooling engines only; the rest refuse with a 400)."""
        raise InvalidRequestError(f"{type(self).__name__} does not serve embeddings")
