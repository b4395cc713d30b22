"""The real engine path against vLLM's own server: one vLLM CPU engine behind each, driven by wrk.

Each server runs alone on the whole machine, one after the other, on the default model with the same
engine arguments and KV space:

- `python -m dynamo_lite.serve MODEL` (what a user runs: the frontend and one worker on the embedded
  planes; the lone engine gets every core of the machine);
- `vllm serve MODEL` (`python -m vllm.entrypoints.openai.api_server`) with `--enforce-eager`, the engine
  setting our worker uses on a CPU build, and OMP bound to the same cores;
- with --compiled, `vllm serve` with its own default (torch.compile) too.

Non-streaming chat of ~400 prompt tokens and 64 output tokens (ignore_eos), 8 connections. Prints req/s and
latency p50/p99 per server and the ratio to `vllm serve --enforce-eager` measured in the same run.

    .venv/bin/python benchmarks/bench_real_engine.py [--duration 40] [--connections 8] [--compiled]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_serving import prompt_of_tokens, wrk_run  # noqa: E402
from dynamo_lite.serve.placement import available_cpus, cpu_list  # noqa: E402
from tests.e2e.harness import DEFAULT_MODEL_PATH, SERVED_MODEL_NAME, ProcGroup, wait_until  # noqa: E402
from tests.services import free_tcp_port  # noqa: E402

ENGINE_ARGS = ["--max-model-len", "2048", "--max-num-seqs", "16"]
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def serves(base: str) -> bool:
    try:
        return httpx.get(f"{base}/v1/models", timeout=5).status_code == 200 and \
            httpx.get(f"{base}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def measure(group: ProcGroup, name: str, module: str, argv: list[str], env: dict[str, str], port: int,
            args: argparse.Namespace) -> dict:
    proc = group.start(name, module, *argv, extra_env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: serves(base), 600, name, [proc], interval=1)
        body = {"model": SERVED_MODEL_NAME, "max_tokens": args.output_tokens, "ignore_eos": True,
                "messages": [{"role": "user", "content": prompt_of_tokens(args.prompt_tokens)}]}
        usage = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120).json()["usage"]
        # A short warm-up run: the first requests of an engine pay for lazy allocations.
        wrk_run(f"{base}/v1/chat/completions", body, args.connections, 5, timeout_s=120)
        result = wrk_run(f"{base}/v1/chat/completions", body, args.connections, args.duration, timeout_s=120)
        result["usage"] = usage
        print(f"{name:<34}{result['rps']:>8.2f} req/s  p50 {result['p50_ms']:>6.0f} ms  p99 {result['p99_ms']:>6.0f} ms"
              f"  non-2xx {result['non_2xx']}  timeouts {result['timeouts']}  ({usage['prompt_tokens']} -> {usage['completion_tokens']} tokens)",
              flush=True)
        return result
    finally:
        proc.stop(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=40)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=400)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--compiled", action="store_true", help="also vllm serve with torch.compile (its default)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: run scripts/setup.sh --full")

    cores = cpu_list(available_cpus())
    run_dir = Path(tempfile.mkdtemp(prefix="bench_real_engine_"))
    group = ProcGroup(run_dir, {"DYN_LOG": "warning", "DYN_DISCOVERY_DIR": str(run_dir / "discovery")})
    model = str(DEFAULT_MODEL_PATH)
    vllm_env = {**ENGINE_ENV, "VLLM_CPU_OMP_THREADS_BIND": cores}
    results: dict[str, dict] = {}
    try:
        port = free_tcp_port()
        results["dynamo_lite serve"] = measure(
            group, "dynamo_lite serve", "dynamo_lite.serve",
            [model, "--served-model-name", SERVED_MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
             *ENGINE_ARGS], ENGINE_ENV, port, args)
        servers = [("vllm serve --enforce-eager", ["--enforce-eager"])]
        if args.compiled:
            servers.append(("vllm serve (torch.compile)", []))
        for name, flags in servers:
            port = free_tcp_port()
            results[name] = measure(
                group, name.replace(" ", "_").replace("(", "").replace(")", ""), "vllm.entrypoints.openai.api_server",
                ["--model", model, "--served-model-name", SERVED_MODEL_NAME, "--host", "127.0.0.1",
                 "--port", str(port), *ENGINE_ARGS, *flags], vllm_env, port, args)
    finally:
        group.stop()

    reference = results["vllm serve --enforce-eager"]
    print(f"\ncores {cores} ({os.cpu_count()} online), {args.connections} connections, {args.duration} s each")
    print(f"{'server':<34}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'/ vllm serve eager':>20}")
    for name, r in results.items():
        print(f"{name:<34}{r['rps']:>8.2f}{r['p50_ms']:>9.0f}{r['p99_ms']:>9.0f}{r['rps'] / reference['rps']:>19.2f}x")
    print(f"logs: {run_dir}")


if __name__ == "__main__":
    main()
