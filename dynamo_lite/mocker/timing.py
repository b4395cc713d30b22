"""How long a simulated step takes.

The constants describe a small GPU serving a ~100M-parameter model (roughly what SmolLM2-135M does
on a laptop-class GPU), not a measurement of any one card:

- prefill: 0.1 ms per new token (10k tokens/s), plus an attention term that grows with the context
  each chunk attends to: 5 ns per (new token x context token), so a 4096-token prompt costs
  0.41 s linear + 0.08 s quadratic.
- decode: 4 ms per step whatever the batch (weights are read once per step), plus 0.04 ms per
  running sequence (its KV reads), so a batch of 256 takes ~14 ms.

A step with both prefill chunks and decodes pays both. Everything is divided by --speedup-ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

from dynamo_lite.mocker.scheduler import StepOutput


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
