"""Which mocker timing model is closer to a real engine: vLLM's CPU engine's step times against the mocker's
`native` and `dynamo` step-time models (dynamo_lite/mocker/timing.py), on the same prompts.

vLLM runs in this process (engine core in-process, VLLM_ENABLE_V1_MULTIPROCESSING=0) on one pinned core
(--core), the default model, eager, prefix caching on; each `LLMEngine.step()` is timed. Three families of
steps, the ones where the two models disagree:

- prefill of an uncached prompt of L tokens (one step: the whole prompt fits the token budget);
- prefill of N new tokens behind C cached prompt tokens (the same prefix sent before): `native` charges
  attention over the cached context, `dynamo` prices the new tokens only;
- decode steps at batch B and context length X (median of the steps after the prefill).

The models describe a GPU, not this CPU, so each is compared in shape: one scale factor per model (least
squares on relative error over all points) maps it onto the measured times, and what is left is its
error. The model with the smaller error is the closer one.

    flock /tmp/dl-cpu.lock .venv/bin/python benchmarks/bench_step_times.py [--core 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dynamo_lite.mocker.scheduler import StepOutput  # noqa: E402
from dynamo_lite.mocker.timing import DynamoStepTimeModel, StepTimeModel  # noqa: E402

MOCKER_CAPACITY_TOKENS = 16384 * 16  # the mocker's default pool, which Dynamo's decode time reads


def prefill_step(new: int, cached: int) -> StepOutput:
    """One request's whole prefill in one step (it samples its first token in it)."""
    return StepOutput(prefill_tokens=new, prefill_attention=new * (cached + new), sampled_requests=1,
                      sampled_context_tokens=cached + new)


def decode_step(batch: int, context: int) -> StepOutput:
    return StepOutput(decode_requests=batch, sampled_requests=batch, sampled_context_tokens=batch * context)


class Engine:
    def __init__(self, model: str, core: int, max_model_len: int):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(core))
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        os.sched_setaffinity(0, {core})
        from vllm import EngineArgs, LLMEngine, SamplingParams

        from dynamo_lite.vllm.args import cpu_has_native_bf16

        self._sampling = SamplingParams
        args = EngineArgs(model=model, enforce_eager=True, max_model_len=max_model_len,
                          max_num_batched_tokens=max_model_len, max_num_seqs=64, enable_prefix_caching=True,
                          dtype="bfloat16" if cpu_has_native_bf16() else "float32")
        self.engine = LLMEngine.from_engine_args(args)
        self.vocab = self.engine.get_tokenizer().vocab_size
        self._rng = random.Random(0)
        self._ids = 0

    def fresh_tokens(self, n: int) -> list[int]:
        return [self._rng.randrange(100, self.vocab - 100) for _ in range(n)]

    def run(self, prompts: list[list[int]], max_tokens: int) -> list[float]:
        """Add the prompts, step to the end; the wall time of every step."""
        params = self._sampling(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        for prompt in prompts:
            self._ids += 1
            self.engine.add_request(str(self._ids), {"prompt_token_ids": prompt}, params)
        steps = []
        while self.engine.has_unfinished_requests():
            began = time.perf_counter()
            self.engine.step()
            steps.append(time.perf_counter() - began)
        return steps


def measure(engine: Engine, repeats: int) -> list[tuple[str, StepOutput, float]]:
    """(label, the step as the mocker would see it, median measured seconds)."""
    points = []
    engine.run([engine.fresh_tokens(64)], 4)  # warm-up
    for length in (128, 512, 1024, 2048, 4096):
        times = [engine.run([engine.fresh_tokens(length)], 1)[0] for _ in range(repeats)]
        points.append((f"prefill {length} uncached", prefill_step(length, 0), statistics.median(times)))
    new = 256
    for cached in (1024, 2048, 3840):
        times = []
        for _ in range(repeats):
            prefix = engine.fresh_tokens(cached)
            engine.run([prefix + engine.fresh_tokens(16)], 1)  # caches the prefix's full blocks
            times.append(engine.run([prefix + engine.fresh_tokens(new)], 1)[0])
        points.append((f"prefill {new} behind {cached} cached", prefill_step(new, cached), statistics.median(times)))
    for batch, context in ((1, 512), (8, 512), (1, 3072), (8, 3072)):
        steps = engine.run([engine.fresh_tokens(context) for _ in range(batch)], 17)
        points.append((f"decode batch {batch} at {context}", decode_step(batch, context),
                       statistics.median(steps[-12:])))  # the steps after every prompt is in
    return points


def fit(predicted: list[float], measured: list[float]) -> tuple[float, list[float]]:
    """The scale s minimizing sum(((s p - m) / m)^2), and each point's relative error after it."""
    ratios = [p / m for p, m in zip(predicted, measured)]
    scale = sum(ratios) / sum(r * r for r in ratios)
    return scale, [scale * r - 1.0 for r in ratios]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(Path("~/.cache/dynamo_lite/models/SmolLM2-135M-Instruct").expanduser()))
    parser.add_argument("--core", type=int, default=os.cpu_count() - 1, help="the one core vLLM runs on")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    engine = Engine(args.model, args.core, max_model_len=8192)
    points = measure(engine, args.repeats)
    models = {"native": StepTimeModel(), "dynamo": DynamoStepTimeModel(capacity_tokens=MOCKER_CAPACITY_TOKENS)}
    measured = [seconds for _, _, seconds in points]
    fits = {name: fit([model.step_seconds(step) for _, step, _ in points], measured)
            for name, model in models.items()}
    print(f"\n{'step':<34}{'vLLM ms':>9}" + "".join(f"{name + ' ms':>13}{'err':>7}" for name in models))
    for i, (label, step, seconds) in enumerate(points):
        row = f"{label:<34}{seconds * 1e3:>9.1f}"
        for name, model in models.items():
            scale, errors = fits[name]
            row += f"{model.step_seconds(step) * scale * 1e3:>13.1f}{errors[i]:>+7.0%}"
        print(row)
    for name, (scale, errors) in fits.items():
        print(f"{name}: scale x{scale:.2f}, mean |error| {statistics.mean(map(abs, errors)):.0%}, "
              f"max |error| {max(map(abs, errors)):.0%}")


if __name__ == "__main__":
    main()
