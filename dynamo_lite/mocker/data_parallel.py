"""DataParallelMockerEngine: N simulated data-parallel ranks behind one worker (`--data-parallel-size N`).

What vLLM's data-parallel engine looks like to the worker shell, simulated: one instance, one address,
N ranks that each have their own scheduler, KV block pool and KV events (each rank is a MockerEngine).
A request runs on the rank the router named (GenerateRequest.dp_rank); without one, on the least busy
rank (running + waiting requests, then the lowest rank), as vLLM's own balancing would place it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

from dynamo_lite.engine.base import Engine, EngineInfo, EngineLoad
from dynamo_lite.mocker.config import MockerConfig, ModelFacts
from dynamo_lite.mocker.engine import MockerEngine
from dynamo_lite.protocol.errors import InvalidRequestError
from dynamo_lite.protocol.messages import GenerateFrame, GenerateRequest, KvEvent


class DataParallelMockerEngine(Engine):
    def __init__(self, config: MockerConfig, *, facts: ModelFacts | None = None):
        if config.data_parallel_size < 2:
            raise ValueError("DataParallelMockerEngine needs data_parallel_size >= 2")
        self.ranks = [MockerEngine(config, facts=facts) for _ in range(config.data_parallel_size)]
        self._info: EngineInfo | None = None

    async def start(self) -> EngineInfo:
        if self._info is None:
            infos = await asyncio.gather(*(rank.start() for rank in self.ranks))
            self._info = dataclasses.replace(infos[0], data_parallel_size=len(self.ranks))
        return self._info

    @property
    def info(self) -> EngineInfo | None:
        return self._info

    def pick_rank(self, request: GenerateRequest) -> int:
        """The rank a request runs on: its dp_rank (checked), else the least busy one."""
        if request.dp_rank is None:
            loads = self.rank_loads()
            busy = [load.running_requests + load.waiting_requests for load in loads]
            return min(range(len(busy)), key=lambda rank: (busy[rank], rank))
        if not 0 <= request.dp_rank < len(self.ranks):
            raise InvalidRequestError(f"dp_rank {request.dp_rank} is out of range: this worker has "
                                      f"{len(self.ranks)} data-parallel ranks", param="dp_rank")
        return request.dp_rank

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateFrame]:
        engine = self.ranks[self.pick_rank(request)]
        async with contextlib.aclosing(engine.generate(request)) as frames:
            async for frame in frames:
                yield frame

    async def rank_kv_events(self) -> AsyncIterator[tuple[int, list[KvEvent]]]:
        """Every rank's event lists, tagged with the rank, each rank's in its own order."""
        queue: asyncio.Queue[tuple[int, list[KvEvent]] | None] = asyncio.Queue()

        async def pump(rank: int, engine: MockerEngine) -> None:
            try:
                async for events in engine.kv_events():
                    queue.put_nowait((rank, events))
            finally:
                queue.put_nowait(None)  # this rank's events ended (shutdown)

        tasks = [asyncio.create_task(pump(rank, engine), name=f"mocker-dp{rank}-events")
                 for rank, engine in enumerate(self.ranks)]
        running = len(tasks)
        try:
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                    continue
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def kv_events(self) -> AsyncIterator[list[KvEvent]]:
        """All ranks' events without their rank: only meaningful with the rank (use rank_kv_events)."""
        async for _rank, events in self.rank_kv_events():
            yield events

    def rank_loads(self) -> list[EngineLoad]:
        return [rank.load() for rank in self.ranks]

    def load(self) -> EngineLoad:
        loads = self.rank_loads()
        return EngineLoad(active_blocks=sum(load.active_blocks for load in loads),
                          total_blocks=sum(load.total_blocks for load in loads),
                          running_requests=sum(load.running_requests for load in loads),
                          waiting_requests=sum(load.waiting_requests for load in loads))

    async def shutdown(self) -> None:
        await asyncio.gather(*(rank.shutdown() for rank in self.ranks))
