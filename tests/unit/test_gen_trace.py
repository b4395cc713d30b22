"""benchmarks/gen_trace.py: Mooncake-format rows, deterministic by seed, and each knob moves what it says."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

import pytest

from benchmarks.gen_trace import PRESETS, TraceKnobs, generate, main
from benchmarks.trace_replay import load_trace, reuse_ceiling

BASE = TraceKnobs(requests=600, seed=3)


def lengths(rows, key="input_length"):
    return [row[key] for row in rows]


def test_rows_are_in_mooncakes_format_and_the_same_seed_gives_the_same_trace(tmp_path):
    rows = generate(BASE)
    assert rows == generate(BASE)
    assert rows != generate(replace(BASE, seed=4))
    for row in rows:
        assert set(row) == {"timestamp", "input_length", "output_length", "hash_ids"}
        assert len(row["hash_ids"]) == math.ceil(row["input_length"] / 512)
        assert row["output_length"] >= 1
    assert rows[0]["timestamp"] == 0 and lengths(rows, "timestamp") == sorted(lengths(rows, "timestamp"))
    path = tmp_path / "t.jsonl"
    main(["--requests", "50", "--seed", "3", "-o", str(path)])
    assert len(load_trace(path, 1000)) == 50  # what bench_trace.py reads
    first = path.read_bytes()
    main(["--requests", "50", "--seed", "3", "-o", str(path)])
    assert path.read_bytes() == first


def test_prompt_length_knobs_move_the_median_and_the_tail():
    plain = dict(shared_fraction=0.0, followup_fraction=0.0)
    short = generate(replace(BASE, **plain, prompt_median=500))
    long = generate(replace(BASE, **plain, prompt_median=4000))
    assert statistics.median(lengths(short)) == pytest.approx(500, rel=0.15)
    assert statistics.median(lengths(long)) == pytest.approx(4000, rel=0.15)
    heavy = generate(replace(BASE, **plain, prompt_median=500, tail_fraction=0.1, tail_min=20000))
    assert sum(n >= 20000 for n in lengths(heavy)) == pytest.approx(60, abs=20)
    assert sum(n >= 20000 for n in lengths(short)) == 0
    clipped = generate(replace(BASE, **plain, prompt_sigma=3.0, prompt_min=100, prompt_max=3000))
    assert min(lengths(clipped)) >= 100 and max(lengths(clipped)) <= 3000


def test_prefix_sharing_knobs_raise_the_reusable_fraction():
    def ceiling(**knobs):
        return reuse_ceiling(load_rows(generate(replace(BASE, **knobs))), 512)

    none = ceiling(shared_fraction=0.0, followup_fraction=0.0)
    shared = ceiling(shared_fraction=1.0, followup_fraction=0.0, prefix_blocks=2)
    conversations = ceiling(shared_fraction=0.0, followup_fraction=0.5)
    assert none == 0.0
    assert shared > 0.1 and conversations > 0.2


def test_output_and_arrival_knobs():
    outputs = lengths(generate(replace(BASE, output_median=50, output_max=80)), "output_length")
    assert statistics.median(outputs) == pytest.approx(50, rel=0.2) and max(outputs) <= 80
    steady = lengths(generate(replace(BASE, rate=10.0, arrival="poisson")), "timestamp")
    gaps = [b - a for a, b in zip(steady, steady[1:])]
    assert statistics.mean(gaps) == pytest.approx(100.0, rel=0.15)  # ms at 10 req/s
    assert len(set(steady)) == len(steady)
    even = lengths(generate(replace(BASE, rate=4.0, arrival="uniform")), "timestamp")
    assert even[:3] == [0.0, 250.0, 500.0]
    bursts = lengths(generate(replace(BASE, rate=10.0, arrival="bursts", burst_size=12)), "timestamp")
    assert len(set(bursts)) == 50  # 600 requests in bursts of 12 at one timestamp each
    assert bursts[-1] / 1000 == pytest.approx(60.0, rel=0.3)  # the same mean rate


def test_presets_are_knobs():
    long = generate(replace(BASE, **PRESETS["long-steady"], shared_fraction=0.0, followup_fraction=0.0))
    assert statistics.median(lengths(long)) == pytest.approx(2700, rel=0.2)
    assert sum(n > 34000 for n in lengths(long)) / len(long) == pytest.approx(0.10, abs=0.04)


def load_rows(rows):
    from benchmarks.trace_replay import TraceRequest

    return [TraceRequest(r["timestamp"], r["input_length"], r["output_length"], tuple(r["hash_ids"])) for r in rows]
