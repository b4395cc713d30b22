"""What structured outputs and tool calling cost per request, here and in vLLM's own server.

The same chat requests, each shape in turn, go to dynamo_lite (frontend + one vLLM worker on core 0) and
to vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`, what `vllm serve` runs, on core
1), both on the default model with the same engine arguments; one server is driven at a time. Shapes:
plain text, `response_format` json_schema (a grammar on the worker) and tools with
`tool_choice: required` (a grammar and the parse of its output into tool calls). Prints requests/s and latency per shape and server, and each shape's cost against plain text.

    .venv/bin/python benchmarks/bench_api_features.py [--requests 48] [--concurrency 4] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.harness import (DEFAULT_MODEL_PATH, SERVED_MODEL_NAME, ProcGroup,  # noqa: E402
                               healthy_instances, wait_until)
from tests.services import free_tcp_port, start_etcd, start_nats  # noqa: E402

# --enforce-eager on both: this project's worker's CPU default, not vLLM's server's.
ENGINE_ARGS = ["--max-model-len", "2048", "--max-num-seqs", "16", "--enforce-eager"]
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city"]}}}
PERSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                 "required": ["name", "age"]}
SHAPES = {
    "plain": {},
    "json_schema": {"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}},
    "tools_required": {"tools": [WEATHER_TOOL], "tool_choice": "required"},
}


def body(shape: str, index: int, max_tokens: int) -> dict:
    # A different question each time, so neither server answers from its prefix cache alone.
    question = f"Request {index}: describe the weather in city number {index} and a person who lives there."
    return {"model": SERVED_MODEL_NAME, "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0, **SHAPES[shape]}


async def drive(url: str, shape: str, requests: int, concurrency: int, max_tokens: int) -> dict:
    latencies: list[float] = []
    failures: list[str] = []
    queue = list(range(requests))

    async def user(client: httpx.AsyncClient) -> None:
        while queue:
            index = queue.pop()
            t0 = time.perf_counter()
            r = await client.post(f"{url}/v1/chat/completions", json=body(shape, index, max_tokens))
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                failures.append(f"{r.status_code} {r.text[:200]}")

    async with httpx.AsyncClient(timeout=300) as client:
        await client.post(f"{url}/v1/chat/completions", json=body(shape, -1, max_tokens))  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(user(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {"rps": len(latencies) / wall, "p50_ms": 1e3 * statistics.median(latencies) if latencies else 0.0,
            "p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else 0.0,
            "failures": failures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="bench_api_features_"))
    results: dict[str, dict[str, dict]] = {}
    with start_etcd() as etcd, start_nats() as nats:
        group = ProcGroup(run_dir, {"ETCD_ENDPOINTS": etcd.url, "NATS_SERVER": nats.url, "DYN_LOG": "warning"})
        try:
            vllm_port, port = free_tcp_port(), free_tcp_port()
            reference = group.start(
                "vllm-serve", "vllm.entrypoints.openai.api_server", "--model", str(DEFAULT_MODEL_PATH),
                "--served-model-name", SERVED_MODEL_NAME, "--host", "127.0.0.1", "--port", str(vllm_port),
                "--enable-auto-tool-choice", "--tool-call-parser", "hermes", *ENGINE_ARGS,
                # The JSON-schema constraint for forced tool calls, as this project builds it (with
                # strict tool calling on, vLLM 0.32 uses an xgrammar structural tag instead).
                extra_env={**ENGINE_ENV, "VLLM_CPU_OMP_THREADS_BIND": "1", "VLLM_ENFORCE_STRICT_TOOL_CALLING": "0"})
            frontend = group.start("frontend", "dynamo_lite.frontend", "--http-host", "127.0.0.1",
                                   "--http-port", str(port), "--namespace", "bench-api")
            worker = group.start("worker", "dynamo_lite.vllm", "--model", str(DEFAULT_MODEL_PATH),
                                 "--served-model-name", SERVED_MODEL_NAME, "--namespace", "bench-api",
                                 *ENGINE_ARGS, extra_env={**ENGINE_ENV, "VLLM_CPU_OMP_THREADS_BIND": "0"})
            servers = {"dynamo_lite": f"http://127.0.0.1:{port}", "vllm serve": f"http://127.0.0.1:{vllm_port}"}
            wait_until(lambda: healthy_instances(servers["dynamo_lite"], SERVED_MODEL_NAME), 300,
                       "the dynamo_lite worker", [frontend, worker])

            def reference_up() -> bool:
                try:
                    return httpx.get(f"{servers['vllm serve']}/v1/models", timeout=5).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(reference_up, 300, "vLLM's server", [reference])
            for shape in SHAPES:
                for server, url in servers.items():
                    r = asyncio.run(drive(url, shape, args.requests, args.concurrency, args.max_tokens))
                    results.setdefault(shape, {})[server] = r
                    print(f"{shape:<16}{server:<13}{r['rps']:>7.2f} req/s  p50 {r['p50_ms']:>7.0f} ms  "
                          f"p99 {r['p99_ms']:>7.0f} ms  failures {len(r['failures'])}", flush=True)
                    for failure in r["failures"][:3]:
                        print(f"    {failure}")
        finally:
            group.stop()

    print(f"\n{'shape':<16}{'dynamo_lite req/s':>18}{'vllm serve req/s':>18}{'ours/vllm':>11}"
          f"{'ours vs plain':>15}{'vllm vs plain':>15}")
    plain = results["plain"]
    for shape, row in results.items():
        ours, ref = row["dynamo_lite"], row["vllm serve"]
        print(f"{shape:<16}{ours['rps']:>18.2f}{ref['rps']:>18.2f}{ours['rps'] / ref['rps']:>10.2f}x"
              f"{ours['rps'] / plain['dynamo_lite']['rps']:>14.2f}x{ref['rps'] / plain['vllm serve']['rps']:>14.2f}x")
    print(f"logs: {run_dir}")


if __name__ == "__main__":
    main()
