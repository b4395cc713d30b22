"""benchmarks/bench_url.py as a user runs it: a preset matrix served by `python -m dynamo_lite.serve` with
mockers, a ShareGPT-style dataset, JSON results, PNG plots and the comparison table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_matrix_over_a_preset_writes_results_plots_and_a_table(tmp_path):
    dataset = tmp_path / "sharegpt.json"
    dataset.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": f"Question {i}: what is {i} plus {i}?"},
                           {"from": "gpt", "value": "..."}]} for i in range(3)]))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_url.py"), "--matrix", "smollm2-135m", "--engine",
         "mocker", "-n", "4", "-c", "1", "2", "--max-tokens", "16", "--dataset", str(dataset), "-o", str(out),
         "--startup-timeout", "60", "--serve-args", "--speedup-ratio", "5"],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = json.loads((out / "smollm2-135m" / "results.json").read_text())
    assert run["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and run["dataset"] == str(dataset)
    assert [lv["concurrency"] for lv in run["levels"]] == [1, 2]
    for level in run["levels"]:
        assert level["failed"] == 0 and level["requests"] == 4
        assert level["ttft_s"]["p50"] > 0 and level["tpot_s"]["p50"] > 0 and level["output_tokens_per_s"] > 0
    assert any(level["raw"]["itl"] for level in run["levels"])
    for png in ("ttft.png", "itl.png", "throughput.png"):
        assert (out / "smollm2-135m" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| smollm2-135m | HuggingFaceTB/SmolLM2-135M-Instruct | 2 |" in (out / "comparison.md").read_text()
    compare = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_url.py"), "--compare",
                              str(out / "smollm2-135m" / "results.json")], capture_output=True, text=True,
                             timeout=30, cwd=REPO, check=False)
    assert compare.returncode == 0 and "TTFT p50 ms" in compare.stdout
