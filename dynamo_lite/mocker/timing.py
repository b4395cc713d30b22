"""How long a simulated step takes: two models, picked by --timing.

`native` (StepTimeModel, the default) describes a small GPU serving a ~100M-parameter model (roughly
what SmolLM2-135M does on a laptop-class GPU), not a measurement of any one card:

- prefill: 0.1 ms per new token (10k tokens/s), plus an attention term that grows with the context
  each chunk attends to: 5 ns per (new token x context token), so a 4096-token prompt costs
  0.41 s linear + 0.08 s quadratic. Cached and earlier-chunk context is attended to, so it costs.
- decode: 4 ms per step whatever the batch (weights are read once per step), plus 0.04 ms per
  running sequence (its KV reads), so a batch of 256 takes ~14 ms.

`dynamo` (DynamoStepTimeModel) is the rule of NVIDIA Dynamo's mocker (its vLLM-style scheduler with its
default polynomial perf model, lib/mocker in ai-dynamo/dynamo), so both systems can run on equal engines:

- prefill: a step's prefill chunks together cost 4.209989e-7 T^2 + 1.518344e-2 T + 16.50142 ms, T =
  the new tokens of all chunks of the step. Cached and earlier-chunk context costs nothing.
- decode: every request that samples a token in the step (prefills that completed included) pays one
  decode pass of max(1, -25.74 u^2 + 54.01 u + 5.74) ms, u = the context tokens of those requests over
  the pool's capacity (blocks x block size), at most 1.

A step with both prefill chunks and decodes pays both. Everything is divided by --speedup-ratio.

When the tokens of a step reach their streams (`token_seconds`): `native` at the end of the step, as a
real engine returns its sampled tokens. `dynamo` after the step's prefill part, before its decode pass,
because Dynamo's mocker sends each token's output signal and then sleeps out the decode pass: a lone
uncached prompt's TTFT there is its prefill polynomial alone (measured with bench_trace.py on Dynamo
1.6.1: 16 000 tokens at --speedup-ratio 0.6 in 554-556 ms against 550 ms of prefill, where a decode pass
is another 9.6 ms), and a decoding request's next token is one whole step after its last.
"""

from __future__ import annotations

from dataclasses import dataclass

from dynamo_lite.mocker.scheduler import StepOutput

TIMING_MODELS = ["native", "dynamo"]


@dataclass(frozen=True)
class StepTimeModel:
    prefill_seconds_per_token: float = 1.0e-4
    prefill_seconds_per_attention: float = 5.0e-9  # per (new token x attended token)
    decode_seconds_per_step: float = 4.0e-3
    decode_seconds_per_sequence: float = 4.0e-5
    speedup_ratio: float = 1.0

    def step_seconds(self, step: StepOutput) -> float:
        seconds = 0.0
        if step.prefill_tokens:
            seconds += (self.prefill_seconds_per_token * step.prefill_tokens
                        + self.prefill_seconds_per_attention * step.prefill_attention)
        if step.decode_requests:
            seconds += self.decode_seconds_per_step + self.decode_seconds_per_sequence * step.decode_requests
        return seconds / self.speedup_ratio

    def token_seconds(self, step: StepOutput) -> float:
        """Seconds into the step at which its sampled tokens are delivered: its end."""
        return self.step_seconds(step)


@dataclass(frozen=True)
class DynamoStepTimeModel:
    """Dynamo's mocker's default step time (module doc); its polynomials are in milliseconds."""

    capacity_tokens: int  # KV blocks x block size of one worker
    speedup_ratio: float = 1.0
    prefill_ms: tuple[float, float, float] = (4.209989e-07, 1.518344e-02, 1.650142e+01)  # T^2, T, 1
    decode_ms: tuple[float, float, float] = (-25.74, 54.01, 5.74)  # u^2, u, 1
    min_decode_ms: float = 1.0

    def prefill_seconds(self, new_tokens: int) -> float:
        if not new_tokens:
            return 0.0
        a, b, c = self.prefill_ms
        return (a * new_tokens * new_tokens + b * new_tokens + c) * 1e-3

    def decode_seconds(self, context_tokens: int) -> float:
        usage = min(1.0, context_tokens / self.capacity_tokens) if self.capacity_tokens else 1.0
        a, b, c = self.decode_ms
        return max(self.min_decode_ms, a * usage * usage + b * usage + c) * 1e-3

    def step_seconds(self, step: StepOutput) -> float:
        seconds = self.prefill_seconds(step.prefill_tokens)
        if step.sampled_requests:
            seconds += self.decode_seconds(step.sampled_context_tokens)
        return seconds / self.speedup_ratio

    def token_seconds(self, step: StepOutput) -> float:
        """Seconds into the step at which its sampled tokens are delivered: after its prefill part."""
        return self.prefill_seconds(step.prefill_tokens) / self.speedup_ratio


def timing_model(name: str, *, speedup_ratio: float, capacity_tokens: int) -> StepTimeModel | DynamoStepTimeModel:
    """The --timing model by name."""
    if name == "dynamo":
        return DynamoStepTimeModel(capacity_tokens=capacity_tokens, speedup_ratio=speedup_ratio)
    if name == "native":
        return StepTimeModel(speedup_ratio=speedup_ratio)
    raise ValueError(f"unknown timing model {name!r} (one of {', '.join(TIMING_MODELS)})")
