"""Where a request's time goes in the frontend: one timeline per request, observed as per-stage histograms.

A request's life is cut into consecutive stages (docs/http-api.md, "Stages"):

    parse        arrival -> body validated and the model resolved
    tokenize     -> GenerationPlan built (chat template, tokenization, checks)
    route        the router's choice of a worker (inside the next interval, subtracted from queue)
    queue        plan built -> request sent to a worker, less route (prefill policy, the event loop)
    first_token  sent -> the worker's first token frame (a remote prefill included); the worker may split it:
      worker_queue   waiting in the engine's queue (reported by the worker)
      prefill        first scheduled -> first token (reported by the worker)
    detokenize   first token frame -> the first answer delta (detokenizer, stop strings, output shaping)
    stream       first delta -> the answer's end (the rest of the decode and its streaming)

app.py marks arrival, parse and plan and ends the timeline; attempt.py marks routing, sending and the
first token (by request id, which is the same across a request's retries). A client may ask for the
stages up to the first answer delta in a response header: send `X-Stage-Timing: 1`, get
`X-Stage-Timing: parse=0.000120;tokenize=...` (seconds), which is how benchmarks attribute a tail request.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from dynamo_lite.frontend.metrics import FrontendMetrics

STAGES = ("parse", "tokenize", "route", "queue", "first_token", "worker_queue", "prefill", "detokenize",
          "stream")
STAGE_HEADER = "X-Stage-Timing"
# Timelines of requests that never end (a bug elsewhere) must not grow without bound.
MAX_OPEN_TIMELINES = 100_000


class Timeline:
    """Monotonic timestamps of one request; 0.0 = not reached."""

    __slots__ = ("arrival", "parsed", "planned", "route_seconds", "sent", "first_token", "worker_queue",
                 "prefill", "first_delta")

    def __init__(self, arrival: float, parsed: float, planned: float):
        self.arrival = arrival
        self.parsed = parsed
        self.planned = planned
        self.route_seconds = 0.0
        self.sent = 0.0
        self.first_token = 0.0
        self.worker_queue: float | None = None
        self.prefill: float | None = None
        self.first_delta = 0.0

    def mark_first_delta(self) -> None:
        if not self.first_delta:
            self.first_delta = time.monotonic()

    def durations(self, ended: float | None = None) -> dict[str, float]:
        """The stages reached so far, in seconds (the `stream` stage needs `ended`)."""
        out = {"parse": self.parsed - self.arrival, "tokenize": self.planned - self.parsed}
        if self.sent:
            out["route"] = self.route_seconds
            out["queue"] = max(0.0, self.sent - self.planned - self.route_seconds)
        if self.first_token and self.sent:
            out["first_token"] = self.first_token - self.sent
            if self.worker_queue is not None:
                out["worker_queue"] = self.worker_queue
            if self.prefill is not None:
                out["prefill"] = self.prefill
        if self.first_delta and self.first_token:
            out["detokenize"] = max(0.0, self.first_delta - self.first_token)
            if ended is not None:
                out["stream"] = ended - self.first_delta
        return out

    def header(self) -> str:
        return ";".join(f"{stage}={seconds:.6f}" for stage, seconds in self.durations().items())


class StageTimer:
    """Open timelines by request id; `finish` observes a request's stages and forgets it."""

    def __init__(self, metrics: FrontendMetrics):
        self._histogram = metrics.stage_seconds
        self._open: OrderedDict[str, Timeline] = OrderedDict()

    def begin(self, request_id: str, arrival: float, parsed: float, planned: float) -> Timeline:
        timeline = self._open[request_id] = Timeline(arrival, parsed, planned)
        if len(self._open) > MAX_OPEN_TIMELINES:
            self._open.popitem(last=False)
        return timeline

    def get(self, request_id: str) -> Timeline | None:
        return self._open.get(request_id)

    def routed(self, request_id: str, seconds: float) -> None:
        timeline = self._open.get(request_id)
        if timeline is not None:
            timeline.route_seconds += seconds

    def sent(self, request_id: str, at: float) -> None:
        timeline = self._open.get(request_id)
        if timeline is not None and not timeline.sent:
            timeline.sent = at

    def first_token(self, request_id: str, at: float, worker_queue: float | None,
                    prefill: float | None) -> None:
        timeline = self._open.get(request_id)
        if timeline is not None and not timeline.first_token:
            timeline.first_token = at
            timeline.worker_queue = worker_queue
            timeline.prefill = prefill

    def finish(self, request_id: str, model: str) -> None:
        timeline = self._open.pop(request_id, None)
        if timeline is None:
            return
        histogram = self._histogram
        for stage, seconds in timeline.durations(time.monotonic()).items():
            histogram.labels(model, stage).observe(seconds)
