"""Admission control: a per-model concurrency limit and worker busy thresholds, with a bounded queue.

A generation request is admitted (it gets a `Ticket`, released when its answer ends) when its model has
fewer than --max-concurrency admitted requests on this frontend and at least one of the model's backend
workers is not busy. A worker is busy when its last load report (the one the kv router receives on the
event plane every --load-report-interval) shows a KV cache usage of at least --busy-kv-usage or at least
--busy-waiting-requests requests waiting in its engine; a worker that has sent no report is not busy.

A request that cannot be admitted at once waits in the model's FIFO queue (at most --max-queued-requests
of them) for up to --queue-timeout seconds; then, or at once when the queue is full, it is refused with
OverloadedError (503, a Retry-After header, OpenAI's error JSON). Every limit at 0 (the defaults) turns
admission off entirely: requests then never wait here and nothing is counted.

Only the request at the head of a queue is woken (a slot freed, or a poll while workers are busy: load
reports come as messages, not as events the queue could wait on), so a flood costs one check per change,
not one per waiting request. Everything runs on the event loop: no locks.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from dynamo_lite.frontend.metrics import FrontendMetrics
from dynamo_lite.protocol.errors import OverloadedError
from dynamo_lite.protocol.messages import LoadReport

logger = logging.getLogger(__name__)

# Seconds between checks of the workers' load while the head of a queue waits for a worker that is not
# busy (load reports arrive every 0.25 s by default).
BUSY_POLL_INTERVAL = 0.05
RETRY_AFTER_SECONDS = 1  # what a refused client is told to wait (the openai client honours it)

# The reasons of dynamo_lite_frontend_rejected_requests (the error's `code`).
QUEUE_FULL = "queue_full"
CONCURRENCY_LIMIT = "concurrency_limit"
WORKERS_BUSY = "workers_busy"


@dataclass(frozen=True)
class AdmissionSettings:
    max_concurrency: int = 0  # admitted requests per model on this frontend; 0 = no limit
    busy_kv_usage: float = 0.0  # KV usage fraction from which a worker is busy; 0 = never
    busy_waiting_requests: int = 0  # waiting requests from which a worker is busy; 0 = never
    queue_timeout: float = 30.0  # seconds a request may wait to be admitted; 0 = refuse at once
    max_queued: int = 1024  # requests waiting per model; more are refused at once

    @property
    def enabled(self) -> bool:
        return bool(self.max_concurrency or self.busy_kv_usage or self.busy_waiting_requests)

    @property
    def checks_busy(self) -> bool:
        return bool(self.busy_kv_usage or self.busy_waiting_requests)


def is_busy(report: LoadReport | None, settings: AdmissionSettings) -> bool:
    """Whether a worker's last load report puts it over a busy threshold (no report: not busy)."""
    if report is None:
        return False
    waiting = settings.busy_waiting_requests
    if waiting and report.waiting_requests >= waiting:
        return True
    usage = settings.busy_kv_usage
    return bool(usage and report.total_blocks and report.active_blocks / report.total_blocks >= usage)


class Ticket:
    """An admitted request's place; `release()` (idempotent) gives it back when the answer has ended."""

    __slots__ = ("_gate",)

    def __init__(self, gate: _ModelGate | None):
        self._gate = gate

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.release()


UNLIMITED = Ticket(None)  # what admission hands out when it is off


class _ModelGate:
    """One model's admitted count and queue."""

    def __init__(self, model: str, admission: Admission):
        self.model = model
        self.admitted = 0
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        self._admission = admission

    def can_admit(self) -> bool:
        limit = self._admission.settings.max_concurrency
        if limit and self.admitted >= limit:
            return False
        return not self._admission.workers_busy(self.model)

    def release(self) -> None:
        self.admitted -= 1
        self.wake_head()

    def wake_head(self) -> None:
        if self.waiters and not self.waiters[0].done():
            self.waiters[0].set_result(None)

    def refusal_reason(self) -> str:
        limit = self._admission.settings.max_concurrency
        return CONCURRENCY_LIMIT if limit and self.admitted >= limit else WORKERS_BUSY


class Admission:
    """Admits generation requests per model; see the module doc."""

    def __init__(self, settings: AdmissionSettings, workers_busy: Callable[[str], bool],
                 metrics: FrontendMetrics):
        self.settings = settings
        self.workers_busy = workers_busy  # model -> every backend worker of it is busy now
        self._metrics = metrics
        self._gates: dict[str, _ModelGate] = {}

    def admitted(self, model: str) -> int:
        gate = self._gates.get(model)
        return gate.admitted if gate else 0

    def queued(self, model: str) -> int:
        gate = self._gates.get(model)
        return len(gate.waiters) if gate else 0

    async def admit(self, model: str) -> Ticket:
        """A ticket for a request for `model`, at once or after queueing; OverloadedError when refused."""
        settings = self.settings
        if not settings.enabled:
            return UNLIMITED
        gate = self._gates.get(model)
        if gate is None:
            gate = self._gates[model] = _ModelGate(model, self)
        if not gate.waiters and gate.can_admit():
            gate.admitted += 1
            self._metrics.queue_wait.labels(model).observe(0.0)
            return Ticket(gate)
        if settings.queue_timeout <= 0:
            raise self._refuse(gate, gate.refusal_reason(), waited=0.0)
        if len(gate.waiters) >= settings.max_queued:
            raise self._refuse(gate, QUEUE_FULL)
        return await self._wait(gate)

    async def _wait(self, gate: _ModelGate) -> Ticket:
        settings = self.settings
        loop = asyncio.get_running_loop()
        queued = self._metrics.queued_requests.labels(gate.model)
        started = time.monotonic()
        deadline = started + settings.queue_timeout
        waiter = loop.create_future()
        gate.waiters.append(waiter)
        queued.inc()
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._refuse(gate, gate.refusal_reason(), waited=time.monotonic() - started)
                at_head = gate.waiters[0] is waiter
                # The head polls while workers may be busy; everyone else sleeps until it is their turn.
                timeout = min(left, BUSY_POLL_INTERVAL) if at_head and settings.checks_busy else left
                try:
                    await asyncio.wait_for(asyncio.shield(waiter), timeout)
                except TimeoutError:
                    pass
                if gate.waiters[0] is waiter and gate.can_admit():
                    gate.admitted += 1
                    self._metrics.queue_wait.labels(gate.model).observe(time.monotonic() - started)
                    return Ticket(gate)
                if waiter.done():  # woken but not admitted (the slot went, or workers are busy): wait again
                    gate.waiters[gate.waiters.index(waiter)] = waiter = loop.create_future()
        finally:
            # Admitted, refused, or cancelled (a client that left): either way out of the queue, and the
            # next one in line looks for itself.
            gate.waiters.remove(waiter)
            queued.dec()
            gate.wake_head()

    def _refuse(self, gate: _ModelGate, reason: str, waited: float | None = None) -> OverloadedError:
        self._metrics.rejected_requests.labels(gate.model, reason).inc()
        if waited is not None:
            self._metrics.queue_wait.labels(gate.model).observe(waited)
        settings = self.settings
        if reason == QUEUE_FULL:
            why = f"{settings.max_queued} requests are already waiting (--max-queued-requests)"
        elif reason == CONCURRENCY_LIMIT:
            why = f"{gate.admitted} requests are in progress (--max-concurrency {settings.max_concurrency})"
        else:
            why = "every worker is busy (--busy-kv-usage, --busy-waiting-requests)"
        waited_text = f" after waiting {waited:.1f}s" if waited else ""
        logger.debug("refused a request for %s (%s)%s", gate.model, reason, waited_text)
        return OverloadedError(f"The server is overloaded for model {gate.model}: {why}; refused{waited_text}. "
                               f"Retry after {RETRY_AFTER_SECONDS}s.", code=reason,
                               retry_after=RETRY_AFTER_SECONDS)
