"""Serving overhead: frontend + 2 mocker workers (--speedup-ratio 100000), driven by wrk.

Non-streaming chat requests of ~400 prompt tokens and 64 output tokens (ignore_eos), 32
connections for 20 s. Prints requests/s and p50/p99 latency, next to a baseline measured in the same
run: the bare HTTP stack answering a canned reply (benchmarks/http_floor.py), and with --dynamo-python
NVIDIA Dynamo 1.6.1's Rust frontend with its own mocker (`python -m dynamo.frontend` + `python -m
dynamo.mocker --num-workers 2`, same speedup, router mode and request) on etcd + NATS. Without it, the
table prints an earlier reference figure of Dynamo on this machine kind (483 req/s, p50 64, p99 109 ms).

    .venv/bin/python benchmarks/bench_serving.py [--duration 20] [--connections 32] [--profile]
        [--planes etcd-nats|embedded|both] [--router-mode round-robin|kv] [--dynamo-python PY]

--planes both (the default) measures on etcd + NATS, then on the embedded planes (no servers).
The Dynamo venv: see benchmarks/bench_trace.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.harness import DEFAULT_MODEL_PATH, ProcGroup, healthy_instances, wait_until  # noqa: E402
from tests.services import free_tcp_port, start_etcd, start_nats  # noqa: E402

DYNAMO_REFERENCE = {"rps": 483.0, "p50_ms": 64.0, "p99_ms": 109.0}


def prompt_of_tokens(n_tokens: int) -> str:
    """About n_tokens tokens of varied English for SmolLM2's tokenizer (~1 token per word here)."""
    words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge "
             "boxing matches near old stone bridges").split()
    return " ".join(words[i % len(words)] for i in range(n_tokens - 45))


def wrk_run(url: str, body: dict, connections: int, duration: int, threads: int = 2, timeout_s: int = 2) -> dict:
    """wrk's figures; a reply slower than `timeout_s` (wrk's default: 2 s) counts as a timeout, not a latency."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                     f"wrk.body = {json.dumps(json.dumps(body))}\n")
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s",
                          "--timeout", f"{timeout_s}s", "--latency", "-s", script.name, url], capture_output=True, text=True,
                         timeout=duration + 60, check=True).stdout
    Path(script.name).unlink()

    def latency_ms(pct: str) -> float:
        value, unit = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    timeouts = re.search(r"Socket errors:.*timeout (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": latency_ms("50"), "p99_ms": latency_ms("99"),
            "non_2xx": int(errors.group(1)) if errors else 0,
            "timeouts": int(timeouts.group(1)) if timeouts else 0, "raw": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=20)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=400)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="py-spy the frontend during the run")
    parser.add_argument("--planes", choices=["etcd-nats", "embedded", "both"], default="both",
                        help="discovery + event planes to measure on (both: one after the other, same run)")
    parser.add_argument("--router-mode", default="round-robin", choices=["round-robin", "kv"])
    parser.add_argument("--dynamo-python", help="python of an ai-dynamo 1.6.1 venv: also measure Dynamo")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: run scripts/setup.sh")

    run_dir = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    results: dict[str, dict] = {}
    baseline = None
    for plane in ["etcd-nats", "embedded"] if args.planes == "both" else [args.planes]:
        with contextlib.ExitStack() as servers:
            if plane == "etcd-nats":
                etcd, nats = servers.enter_context(start_etcd()), servers.enter_context(start_nats())
                env = {"ETCD_ENDPOINTS": etcd.url, "NATS_SERVER": nats.url}
            else:  # nothing to start: a private discovery directory
                env = {"DYN_DISCOVERY_DIR": str(run_dir / "discovery")}
            floor, results[plane] = measure(args, run_dir / plane, env, with_floor=baseline is None)
            baseline = baseline or floor
    dynamo = None
    if args.dynamo_python:
        with start_etcd() as etcd, start_nats() as nats:
            dynamo = measure_dynamo(args, run_dir / "dynamo", {"ETCD_ENDPOINTS": etcd.url, "NATS_SERVER": nats.url})

    print(f"\n{'setup':<46}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}")
    rows = [("HTTP floor (canned reply, same run)", baseline)]
    rows += [(f"dynamo_lite + 2 mockers, {plane} planes", r) for plane, r in results.items()]
    for name, r in rows:
        print(f"{name:<46}{r['rps']:>9.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['non_2xx']:>9}")
    if dynamo:
        ref, ref_name = dynamo, "Dynamo 1.6.1 + 2 mockers (same run)"
        print(f"{ref_name:<46}{ref['rps']:>9.1f}{ref['p50_ms']:>9.1f}{ref['p99_ms']:>9.1f}{ref['non_2xx']:>9}")
    else:
        ref, ref_name = DYNAMO_REFERENCE, "Dynamo 1.6.1 (earlier reference, same setup)"
        print(f"{ref_name:<46}{ref['rps']:>9.1f}{ref['p50_ms']:>9.1f}{ref['p99_ms']:>9.1f}")
    for plane, result in results.items():
        print(f"\n{plane}: frontend / HTTP floor: {result['rps'] / baseline['rps']:.2f}x   "
              f"frontend / {'Dynamo' if dynamo else 'Dynamo reference'}: {result['rps'] / ref['rps']:.2f}x req/s, "
              f"p99 {result['p99_ms']:.0f} vs {ref['p99_ms']:.0f} ms")
    if len(results) == 2:
        print(f"embedded / etcd-nats: {results['embedded']['rps'] / results['etcd-nats']['rps']:.2f}x req/s")
    print(f"logs: {run_dir}")


def chat_body(args: argparse.Namespace) -> dict:
    return {"model": "mock-model", "messages": [{"role": "user", "content": prompt_of_tokens(args.prompt_tokens)}],
            "max_tokens": args.output_tokens, "ignore_eos": True}


def measure_dynamo(args: argparse.Namespace, run_dir: Path, plane_env: dict[str, str]) -> dict:
    """Dynamo's frontend + its mocker (2 workers) on the same request, driven the same way."""
    from benchmarks.bench_trace import BenchGroup  # Dynamo's argv starts from its own venv's python

    group = BenchGroup(run_dir, {**plane_env, "DYN_LOG": "warning"})
    try:
        port = free_tcp_port()
        py = args.dynamo_python
        procs = [group.start_argv("dynamo-frontend", [py, "-m", "dynamo.frontend", "--http-host", "127.0.0.1",
                                                      "--http-port", str(port), "--router-mode", args.router_mode]),
                 group.start_argv("dynamo-mocker", [py, "-m", "dynamo.mocker", "--model-path",
                                                    str(DEFAULT_MODEL_PATH), "--model-name", "mock-model",
                                                    "--num-workers", "2", "--speedup-ratio", "100000"])]
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = chat_body(args)

        def answers() -> bool:
            try:
                return httpx.post(url, json=body, timeout=10).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(answers, 120, "Dynamo's frontend and mocker", procs, interval=1)
        time.sleep(5)  # Dynamo serves on the first worker it sees; let the second register
        return wrk_run(url, body, args.connections, args.duration)
    finally:
        group.stop()


def measure(args: argparse.Namespace, run_dir: Path, plane_env: dict[str, str],
            with_floor: bool) -> tuple[dict | None, dict]:
    """(HTTP floor result or None, frontend result) with the planes `plane_env` selects."""
    group = ProcGroup(run_dir, {**plane_env, "DYN_LOG": "warning"})
    baseline = None
    try:
        port = free_tcp_port()
        frontend = group.start("frontend", "dynamo_lite.frontend", "--http-host", "127.0.0.1",
                               "--http-port", str(port), "--namespace", "bench", "--router-mode", args.router_mode)
        mocker = group.start("mocker", "dynamo_lite.mocker", "--model-path", str(DEFAULT_MODEL_PATH),
                             "--served-model-name", "mock-model", "--num-workers", "2",
                             "--speedup-ratio", "100000", "--namespace", "bench")
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: len(healthy_instances(base, "mock-model")) == 2, 60, "2 mocker workers",
                   [frontend, mocker])
        body = chat_body(args)
        check = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30).json()
        print(f"request: {check['usage']['prompt_tokens']} prompt tokens, "
              f"{check['usage']['completion_tokens']} output tokens")
        if with_floor:
            floor_port = free_tcp_port()
            floor = group.start("http_floor", "benchmarks.http_floor", str(floor_port))
            wait_until(lambda: httpx.get(f"http://127.0.0.1:{floor_port}/docs", timeout=2).status_code == 200,
                       30, "the HTTP floor server", [floor])
            baseline = wrk_run(f"http://127.0.0.1:{floor_port}/v1/chat/completions", body,
                               args.connections, args.duration)
            floor.stop()
        spy = None
        # py-spy comes with the bench extra into the venv, which need not be on PATH.
        py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
        if args.profile and not py_spy:
            print("--profile: py-spy is not installed (pip install py-spy); measuring without it")
        if args.profile and py_spy:
            # Folded stacks (one line per stack, its sample count last): grep-able, and speedscope or
            # flamegraph.pl draw them.
            spy = subprocess.Popen([py_spy, "record", "--format", "raw", "-o", str(run_dir / "frontend.folded"),
                                    "-d", str(args.duration), "-p", str(frontend.pid)])
        result = wrk_run(f"{base}/v1/chat/completions", body, args.connections, args.duration)
        if spy:
            spy.wait(args.duration + 30)
            print(f"profile: {run_dir / 'frontend.folded'}")
    finally:
        group.stop()
    return baseline, result


if __name__ == "__main__":
    main()
