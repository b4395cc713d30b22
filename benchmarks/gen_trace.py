"""Generate a Mooncake-format trace (JSON lines) with chosen prompt lengths, prefix sharing, outputs and arrivals.

So that routing and the frontend are tuned on families of traces, not on one. Each line is one request, as in
the Mooncake traces (benchmarks/README.md): `timestamp` (ms), `input_length`, `output_length` (tokens) and
`hash_ids`, one id per `--block-tokens` (512) block of the prompt, equal ids meaning an equal prefix up to that
block; `len(hash_ids) == ceil(input_length / 512)`. bench_trace.py and aiperf replay it as they replay
Mooncake's.

Knobs (each documented by its --help):
- prompt length: log-normal around --prompt-median with spread --prompt-sigma, plus a heavy tail: a
  --tail-fraction of requests drawn from a Pareto distribution (--tail-alpha, from --tail-min tokens);
  clipped to [--prompt-min, --prompt-max];
- prefix sharing: a --shared-fraction of requests start with one of --prefix-groups shared prefixes
  (--prefix-blocks blocks; groups picked by Zipf popularity --prefix-zipf, like a few popular system
  prompts); a --followup-fraction of requests continue an earlier conversation (the previous turn's full
  blocks, its answer and a new user turn of ~--turn-median tokens);
- output length: log-normal around --output-median with --output-sigma, clipped to [1, --output-max];
- arrivals at --rate requests/s: `poisson` (steady, exponential gaps), `uniform` (evenly spaced) or
  `bursts` (--burst-size requests at one timestamp, bursts arriving as a Poisson process).

--preset sets a family's knobs at once (flags given explicitly still win):
  short-steady  chat-like prompts (median 800), Poisson
  long-steady   long prompts (median 2.7k, one in ten over ~34k), outputs ~170, Poisson
  short-bursty  as short-steady, in bursts of 12
  long-bursty   as long-steady, in bursts of 12

The same seed and knobs give the same file, byte for byte.

    .venv/bin/python benchmarks/gen_trace.py --preset long-steady --requests 1000 --rate 3 -o long.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path

TRACE_BLOCK_TOKENS = 512


@dataclass(frozen=True)
class TraceKnobs:
    requests: int = 1000
    seed: int = 0
    block_tokens: int = TRACE_BLOCK_TOKENS
    prompt_median: float = 800.0
    prompt_sigma: float = 0.8
    prompt_min: int = 16
    prompt_max: int = 131072
    tail_fraction: float = 0.0
    tail_alpha: float = 1.2
    tail_min: float = 16000.0
    shared_fraction: float = 0.5
    prefix_groups: int = 8
    prefix_blocks: int = 2
    prefix_zipf: float = 1.1
    followup_fraction: float = 0.3
    turn_median: float = 200.0
    output_median: float = 170.0
    output_sigma: float = 0.7
    output_max: int = 2048
    rate: float = 5.0  # requests per second
    arrival: str = "poisson"  # poisson | uniform | bursts
    burst_size: int = 12


ARRIVALS = ("poisson", "uniform", "bursts")
PRESETS: dict[str, dict] = {
    "short-steady": dict(prompt_median=800.0, prompt_sigma=0.8, arrival="poisson"),
    # sigma 1.98: P(prompt > 34k) = P(z > ln(34000 / 2700) / 1.98 = 1.28) = 0.10.
    "long-steady": dict(prompt_median=2700.0, prompt_sigma=1.98, output_median=170.0, arrival="poisson"),
    "short-bursty": dict(prompt_median=800.0, prompt_sigma=0.8, arrival="bursts", burst_size=12),
    "long-bursty": dict(prompt_median=2700.0, prompt_sigma=1.98, output_median=170.0, arrival="bursts",
                        burst_size=12),
}


class _Ids:
    """Fresh hash ids, never reused."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int) -> list[int]:
        ids = list(range(self.next, self.next + n))
        self.next += n
        return ids


def _lognormal(rng: random.Random, median: float, sigma: float) -> float:
    return median * math.exp(rng.gauss(0.0, sigma)) if sigma > 0 else median


def _prompt_length(rng: random.Random, k: TraceKnobs) -> int:
    if k.tail_fraction > 0 and rng.random() < k.tail_fraction:
        length = k.tail_min * rng.paretovariate(k.tail_alpha)
    else:
        length = _lognormal(rng, k.prompt_median, k.prompt_sigma)
    return int(min(k.prompt_max, max(k.prompt_min, round(length))))


def _arrivals(rng: random.Random, k: TraceKnobs) -> Iterator[float]:
    """Timestamps in ms, non-decreasing, the first at 0."""
    t = 0.0
    for i in range(k.requests):
        if k.arrival == "bursts":
            if i and i % k.burst_size == 0:
                t += rng.expovariate(k.rate / k.burst_size) * 1e3
        elif i:
            t += (rng.expovariate(k.rate) if k.arrival == "poisson" else 1.0 / k.rate) * 1e3
        yield t


def generate(k: TraceKnobs) -> list[dict]:
    """The trace's rows (see the module doc)."""
    if k.arrival not in ARRIVALS:
        raise ValueError(f"arrival must be one of {', '.join(ARRIVALS)}")
    rng = random.Random(k.seed)
    ids = _Ids()
    group_prefixes = [ids.take(k.prefix_blocks) for _ in range(k.prefix_groups)]
    group_weights = [1.0 / (g + 1) ** k.prefix_zipf for g in range(k.prefix_groups)]
    rows: list[dict] = []
    for timestamp in _arrivals(rng, k):
        output = int(min(k.output_max, max(1, round(_lognormal(rng, k.output_median, k.output_sigma)))))
        draw = rng.random()
        if rows and draw < k.followup_fraction:
            # The next turn of an earlier conversation: its full blocks are this prompt's prefix.
            previous = rng.choice(rows[-64:])
            turn = max(1, round(_lognormal(rng, k.turn_median, 0.5)))
            length = min(k.prompt_max, previous["input_length"] + previous["output_length"] + turn)
            prefix = previous["hash_ids"][:previous["input_length"] // k.block_tokens]
        else:
            length = _prompt_length(rng, k)
            prefix = []
            if k.prefix_groups and draw < k.followup_fraction + k.shared_fraction * (1 - k.followup_fraction):
                prefix = rng.choices(group_prefixes, group_weights)[0]
        blocks = math.ceil(length / k.block_tokens)
        prefix = prefix[:blocks]
        rows.append({"timestamp": round(timestamp, 3), "input_length": length, "output_length": output,
                     "hash_ids": prefix + ids.take(blocks - len(prefix))})
    return rows


def write(rows: list[dict], out) -> None:
    for row in rows:
        out.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a family's knobs (explicit flags win)")
    parser.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    defaults = TraceKnobs()
    for f in fields(TraceKnobs):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)), default=None,
                            choices=ARRIVALS if f.name == "arrival" else None,
                            help=f"default {getattr(defaults, f.name)}")
    args = parser.parse_args(argv)
    knobs = replace(defaults, **PRESETS.get(args.preset, {}))
    knobs = replace(knobs, **{f.name: getattr(args, f.name) for f in fields(TraceKnobs)
                              if getattr(args, f.name) is not None})
    rows = generate(knobs)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as out:
            write(rows, out)
    else:
        write(rows, sys.stdout)


if __name__ == "__main__":
    main()
