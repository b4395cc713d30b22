"""Overload curve: offered load -> accepted, refused (503 + Retry-After), TTFT p50/p99 of the accepted.

A frontend with admission control (--max-concurrency, --queue-timeout) in front of 2 mocker workers
(embedded planes) is offered streaming chat requests open-loop (at fixed intervals, whatever the answers)
at each rate for --duration seconds. Past capacity the accepted rate should plateau, the surplus be refused
quickly, and the accepted requests' TTFT stay bounded by the queue timeout instead of growing with the
backlog; no answer may be anything but 200 or 503 + Retry-After. With --max-concurrency 0 the same rates run
without admission control, for comparison.

    .venv/bin/python benchmarks/bench_overload.py [--rates 2,4,8,16,32,64] [--duration 10]
        [--max-concurrency 8] [--queue-timeout 1] [--output-tokens 256] [--speedup-ratio 1]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_serving import prompt_of_tokens  # noqa: E402
from benchmarks.trace_replay import percentile  # noqa: E402
from tests.e2e.harness import DEFAULT_MODEL_PATH, ProcGroup, healthy_instances, metric_sum, wait_until  # noqa: E402
from tests.services import free_tcp_port  # noqa: E402

MODEL = "mock-model"


async def one(client: httpx.AsyncClient, url: str, body: dict, results: list) -> None:
    start = time.monotonic()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                ok_503 = response.status_code == 503 and "retry-after" in response.headers
                results.append(("503" if ok_503 else f"other {response.status_code}", None))
                return
            ttft = None
            async for line in response.aiter_lines():
                if ttft is None and '"content"' in line:
                    ttft = time.monotonic() - start
            results.append(("200", ttft))
    except httpx.HTTPError as e:
        results.append((f"error {type(e).__name__}", None))


async def offer(base: str, body: dict, rate: float, duration: float) -> tuple[list, float]:
    url = f"{base}/v1/chat/completions"
    results: list = []
    limits = httpx.Limits(max_connections=4000, max_keepalive_connections=4000)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        tasks = []
        start = time.monotonic()
        count = int(rate * duration)
        for index in range(count):
            delay = start + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(client, url, body, results)))
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - start
    return results, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="2,4,8,16,32,64", help="offered requests/s, comma-separated")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per rate")
    parser.add_argument("--max-concurrency", type=int, default=8)
    parser.add_argument("--queue-timeout", type=float, default=1.0)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--speedup-ratio", type=float, default=1.0, help="the mockers' (1: real-time steps)")
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="bench_overload_"))
    group = ProcGroup(run_dir, {"DYN_DISCOVERY_DIR": str(run_dir / "discovery"), "DYN_LOG": "warning"})
    rows = []
    try:
        port = free_tcp_port()
        frontend = group.start("frontend", "dynamo_lite.frontend", "--http-host", "127.0.0.1", "--http-port",
                               str(port), "--namespace", "bench", "--max-concurrency", str(args.max_concurrency),
                               "--queue-timeout", str(args.queue_timeout))
        mocker = group.start("mocker", "dynamo_lite.mocker", "--model-path", str(DEFAULT_MODEL_PATH),
                             "--served-model-name", MODEL, "--num-workers", "2", "--speedup-ratio",
                             str(args.speedup_ratio), "--namespace", "bench")
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: len(healthy_instances(base, MODEL)) == 2, 60, "2 mocker workers", [frontend, mocker])
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt_of_tokens(args.prompt_tokens)}],
                "max_tokens": args.output_tokens, "ignore_eos": True, "stream": True}
        for rate in [float(r) for r in args.rates.split(",")]:
            results, elapsed = asyncio.run(offer(base, body, rate, args.duration))
            ttfts = [t for status, t in results if status == "200" and t is not None]
            counts: dict[str, int] = {}
            for status, _ in results:
                counts[status] = counts.get(status, 0) + 1
            rows.append((rate, len(results), counts.get("200", 0), counts.get("503", 0),
                         len(results) - counts.get("200", 0) - counts.get("503", 0),
                         counts.get("200", 0) / elapsed, percentile(ttfts, 50), percentile(ttfts, 99)))
            print(f"rate {rate:g}/s: {counts}", flush=True)
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        rejected = metric_sum(metrics, "dynamo_lite_frontend_rejected_requests_total")
    finally:
        group.stop()
    print(f"\nfrontend --max-concurrency {args.max_concurrency} --queue-timeout {args.queue_timeout:g}, "
          f"2 mockers (--speedup-ratio {args.speedup_ratio:g}), {args.prompt_tokens}-token prompts, "
          f"{args.output_tokens} output tokens, {args.duration:g} s per rate\n")
    print("| offered req/s | sent | accepted (200) | refused (503) | other | accepted req/s | "
          "TTFT p50 ms | TTFT p99 ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for rate, sent, ok, refused, other, ok_rate, p50, p99 in rows:
        print(f"| {rate:g} | {sent} | {ok} | {refused} | {other} | {ok_rate:.1f} | {p50 * 1e3:.0f} | "
              f"{p99 * 1e3:.0f} |")
    print(f"\nfrontend's dynamo_lite_frontend_rejected_requests_total: {rejected:g}; logs: {run_dir}")


if __name__ == "__main__":
    main()
