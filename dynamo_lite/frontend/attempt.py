"""One attempt: one request on one worker of one pool.

Every request the frontend sends to a worker goes through here: the aggregated or decode request (and
each retry or migration of it) on the decode pool (backend workers), the remote prefill on the prefill
pool. `Dispatcher.route` picks a worker of the pool through the Router, which starts tracking the
request, and returns an `Attempt`; `Attempt.frames` sends the request and yields the worker's
GenerateFrames, an ErrorFrame raised as its typed error (protocol.errors.worker_error), a frame that
takes longer than the per-frame timeout, a worker silent (not even a heartbeat) for longer than the
heartbeat timeout, or a stream without its last frame, as WorkerFailedError.
Closing the attempt (the end of its `with` block) ends the router's tracking and the pool's in-flight
count once, however the attempt ended.

The in-flight counts are this frontend's own (streams it has open per worker, while they are open): the
prefill policy reads them to find a busy prefill pool, and to spread decodes when the router knows no load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from types import TracebackType

import msgspec

from dynamo_lite.discovery.watcher import InstanceWatcher
from dynamo_lite.frontend.metrics import FrontendMetrics
from dynamo_lite.frontend.stages import StageTimer
from dynamo_lite.protocol import keys
from dynamo_lite.protocol.errors import EngineError, WorkerFailedError, worker_error
from dynamo_lite.protocol.messages import ErrorFrame, GenerateFrame, GenerateRequest, InstanceRecord, Reply
from dynamo_lite.router.base import RouteDecision, Router
from dynamo_lite.transport.client import RequestClient

logger = logging.getLogger(__name__)

POOL_PREFILL = "prefill"
POOL_DECODE = "decode"  # the backend workers: aggregated and decode requests
_POOL_COMPONENT = {POOL_PREFILL: keys.COMPONENT_PREFILL, POOL_DECODE: keys.COMPONENT_BACKEND}
_POOL_NAME = {POOL_PREFILL: "prefill worker", POOL_DECODE: "worker"}  # how messages name a worker


class Dispatcher:
    """The frontend's workers by pool, its router, and the attempts it runs on them."""

    def __init__(self, watcher: InstanceWatcher, client: RequestClient, router: Router, metrics: FrontendMetrics,
                 request_timeout: float = 0.0, heartbeat_timeout: float = 0.0):
        self.watcher = watcher
        self.client = client
        self.router = router
        self.metrics = metrics
        self.request_timeout = request_timeout  # seconds per frame; 0 = no limit
        self.heartbeat_timeout = heartbeat_timeout  # seconds without any frame, heartbeats too; 0 = no limit
        self.stages = StageTimer(metrics)  # per-request stage timelines (app.py begins and ends them)
        self._inflight: dict[str, dict[int, int]] = {POOL_PREFILL: {}, POOL_DECODE: {}}

    def workers(self, model: str, pool: str) -> list[InstanceRecord]:
        """The pool's live workers serving `model`, sorted by id."""
        return self.watcher.instances(model, _POOL_COMPONENT[pool])

    def inflight(self, pool: str, worker_id: int) -> int:
        return self._inflight[pool].get(worker_id, 0)

    def _count(self, pool: str, model: str, worker_id: int, change: int) -> None:
        counts = self._inflight[pool]
        left = counts.get(worker_id, 0) + change
        if left > 0:
            counts[worker_id] = left
        else:
            counts.pop(worker_id, None)
        self.metrics.pool_inflight.labels(model, pool).inc(change)

    def route(self, pool: str, model: str, request_id: str, token_ids: Sequence[int],
              workers: Sequence[InstanceRecord]) -> Attempt:
        """Pick one of `workers` (non-empty) through the router, which starts tracking `request_id`."""
        by_id = {record.instance_id: record for record in workers}
        began = time.monotonic()
        decision = self.router.route(model, request_id, token_ids, list(by_id))
        self.stages.routed(_timeline_id(pool, request_id), time.monotonic() - began)
        return Attempt(self, pool, model, request_id, by_id[decision.worker_id], decision)

    def attempt_on(self, pool: str, model: str, request_id: str, record: InstanceRecord) -> Attempt:
        """An attempt on a worker the caller chose itself (the router tracks nothing for it)."""
        return Attempt(self, pool, model, request_id, record, RouteDecision(record.instance_id))


def _timeline_id(pool: str, request_id: str) -> str:
    """The request a stage timeline belongs to: a remote prefill runs as "<id>-prefill" (prefill_policy.py)."""
    return request_id.removesuffix("-prefill") if pool == POOL_PREFILL else request_id


class Attempt:
    """One request on one worker; see the module doc. Use as a context manager: leaving it closes it."""

    def __init__(self, dispatcher: Dispatcher, pool: str, model: str, request_id: str, worker: InstanceRecord,
                 decision: RouteDecision):
        self.pool = pool
        self.model = model
        self.request_id = request_id  # the id the router tracks (the same across a request's retries)
        self.worker = worker
        self.decision = decision
        self.name = f"{_POOL_NAME[pool]} {worker.instance_id:x}"
        if decision.dp_rank is not None:
            self.name += f" rank {decision.dp_rank}"
        self.sent_at = 0.0  # time.monotonic() when frames() sent the request
        self._dispatcher = dispatcher
        self._counted = False  # in the pool's in-flight count
        self._closed = False

    def __enter__(self) -> Attempt:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    async def frames(self, request: GenerateRequest) -> AsyncIterator[GenerateFrame]:
        """Send `request` to the worker and yield its frames, up to and including the last one.

        Closing this generator early (a stop string, a client that left) closes the worker stream,
        which makes the worker abort the request.
        """
        dispatcher = self._dispatcher
        if self._closed:
            raise RuntimeError("attempt already closed")
        if not self._counted:
            self._counted = True
            dispatcher._count(self.pool, self.model, self.worker.instance_id, +1)
        if self.decision.dp_rank is not None:  # the rank of a data-parallel worker the router chose
            request = msgspec.structs.replace(request, dp_rank=self.decision.dp_rank)
        self.sent_at = time.monotonic()
        dispatcher.stages.sent(_timeline_id(self.pool, self.request_id), self.sent_at)
        stream = dispatcher.client.stream(self.worker.address, request,
                                          silence_timeout=dispatcher.heartbeat_timeout)
        timeout = dispatcher.request_timeout
        replies = self._with_timeout(stream, timeout) if timeout > 0 else stream
        first_token = True
        async with contextlib.aclosing(stream), contextlib.aclosing(replies):
            async for reply in replies:
                frame = self._generate_frame(reply)
                if first_token and frame.token_ids:
                    first_token = False
                    dispatcher.router.first_token(self.request_id)
                    if self.pool == POOL_DECODE:  # a remote prefill's token is not the answer's first
                        dispatcher.stages.first_token(self.request_id, time.monotonic(), frame.queue_seconds,
                                                      frame.prefill_seconds)
                yield frame
                if frame.last:
                    return
        raise WorkerFailedError(f"{self.name} ended the stream without a last frame",
                                instance_id=self.worker.instance_id)

    def worker_failed(self, error: WorkerFailedError) -> None:
        """The worker failed this attempt: exclude it (the watcher tells the router it is gone)."""
        logger.warning("%s failed on request %s: %s", self.name, self.request_id, error.message)
        self._dispatcher.watcher.mark_failed(self.worker.instance_id)

    def close(self) -> None:
        """End the router's tracking and the in-flight count. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._counted:
                self._dispatcher._count(self.pool, self.model, self.worker.instance_id, -1)
        finally:
            self._dispatcher.router.finished(self.request_id)

    def _generate_frame(self, reply: Reply) -> GenerateFrame:
        if isinstance(reply, GenerateFrame):
            return reply
        if isinstance(reply, ErrorFrame):
            raise worker_error(reply.status, reply.message, worker=self.name, instance_id=self.worker.instance_id)
        raise EngineError(f"{self.name} answered with an unexpected {type(reply).__name__}")

    async def _with_timeout(self, replies: AsyncIterator[Reply], timeout: float) -> AsyncIterator[Reply]:
        """`replies`, failing the worker if one takes longer than `timeout` seconds to arrive."""
        iterator = replies.__aiter__()
        while True:
            try:
                async with asyncio.timeout(timeout):
                    reply = await anext(iterator)
            except StopAsyncIteration:
                return
            except TimeoutError as e:
                raise WorkerFailedError(f"{self.name} sent nothing for {timeout}s",
                                        instance_id=self.worker.instance_id) from e
            yield reply
