"""Disaggregated serving with real vLLM on this box: KV transfer throughput and TTFT/ITL.

Starts etcd + NATS, one prefill worker and one decode worker (vLLM, --connector nixl, pinned to cores
0 and 1 as in tests/e2e/test_disagg_e2e.py), a frontend in the default disaggregated mode (kv router)
and a second frontend on the same namespace with --no-disaggregation (aggregated on the decode worker).

(a) KV transfer: prompts of ~1, 4, 8, 15 KV blocks (128 tokens each on CPU) through the disaggregated
    frontend, one at a time. The bytes and seconds of each request's NIXL pull are what the decode
    worker's vLLM measured (the frontend's dynamo_lite_frontend_kv_transfer_bytes/_seconds histograms:
    delta of _sum around the request). They are set against this machine's memcpy bandwidth for a
    buffer of the same size, measured in this process with numpy (np.copyto, best of N).
(b) TTFT and inter-token latency: the same workload once per frontend — a few decoding streams (short
    prompts, 64 output tokens, restarted back to back) while long prompts (~1000 tokens) arrive every
    few seconds. Every prompt is fresh random token ids, so prefix caching hides no prefill.

    .venv/bin/python benchmarks/bench_disagg.py [--duration 45] [--streams 3] [--long-every 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.harness import DEFAULT_MODEL_PATH, SERVED_MODEL_NAME, ProcGroup, wait_until  # noqa: E402
from tests.services import free_tcp_port, start_etcd, start_nats  # noqa: E402

BLOCK_TOKENS = 128  # vLLM's CPU KV block size
MAX_MODEL_LEN = 2048
TRANSFER_BLOCKS = (1, 4, 8, 15)
MIN_PREFILL_TOKENS = 64  # a 1-block prompt must still be prefilled remotely
SHORT_PROMPT_TOKENS = 40  # decoding streams: below MIN_PREFILL_TOKENS, prefilled on the decode worker either way
VOCAB_LOW, VOCAB_HIGH = 100, 49000  # SmolLM2 vocab is 49152; stay clear of the special tokens at the start
REQUEST_TIMEOUT = 180.0

EXPLANATION = """\
What a 2-core machine can and cannot show. Both vLLM engines share this box's two cores: the prefill
worker is pinned to core 0 and the decode worker to core 1, but memory bandwidth, caches, the frontends,
etcd/NATS and this client share the same socket, and a prefill still competes with decode for them. On
separate GPUs disaggregation removes prefill from the decode engine entirely, so decode steps never
stall behind a long prompt; here that isolation is only partial (one core each, shared memory system),
and the aggregated baseline runs on one core too, so neither mode gets the whole machine. What the run
can show: the KV handoff itself (NIXL moving the blocks inside host memory, compared with a plain memcpy
of the same size), and the direction of the effect on decoding streams (in aggregated mode a long prompt's
prefill runs in the decode engine's steps and shows up in the decoding streams' inter-token p99; in
disaggregated mode it runs on the other core). What it cannot show: absolute TTFT/ITL of a production
deployment, scaling of the prefill pool, or network (RDMA/TCP) transfer rates — the transfer here is a
same-host memory copy, the best case for NIXL."""


# ---------------------------------------------------------------------------------------------- helpers

def random_prompt(rng: np.random.Generator, n_tokens: int) -> list[int]:
    return rng.integers(VOCAB_LOW, VOCAB_HIGH, size=n_tokens).tolist()


def scrape(base_url: str) -> dict[str, float]:
    """Every sample of the frontend's /metrics, summed over label sets, keyed by sample name + labels."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, value = line.rsplit(" ", 1)
        samples[key] = samples.get(key, 0.0) + float(value)
    return samples


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(v for k, v in samples.items()
               if (k == name or k.startswith(name + "{")) and all(f'{a}="{b}"' in k for a, b in labels.items()))


def memcpy_gbps(n_bytes: int, repeats: int) -> float:
    """Best-of-`repeats` host copy bandwidth (bytes copied / s, in GB/s) for a buffer of n_bytes."""
    src = np.random.default_rng(0).integers(0, 255, size=n_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return n_bytes / best / 1e9


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def stream_completion(client: httpx.AsyncClient, base_url: str, prompt: list[int], max_tokens: int,
                            ignore_eos: bool = True) -> dict:
    """Stream a completion; -> {ttft, gaps (s between content chunks), tokens, error}."""
    body = {"model": SERVED_MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": ignore_eos}
    start = time.monotonic()
    arrivals: list[float] = []
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            async with client.stream("POST", f"{base_url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[len("data: "):])
                    choices = chunk.get("choices") or []
                    if choices and choices[0].get("text"):
                        arrivals.append(time.monotonic())
    except (TimeoutError, httpx.HTTPError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if not arrivals:
        return {"error": "no content streamed"}
    return {"ttft": arrivals[0] - start, "gaps": list(np.diff(arrivals)), "chunks": len(arrivals),
            "error": None}


# ---------------------------------------------------------------------------------------------- (a)

async def transfer_table(base_url: str, rng: np.random.Generator, repeats: int) -> list[dict]:
    rows = []
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as client:
        for blocks in TRANSFER_BLOCKS:
            # Fill `blocks` blocks, the last one partly; leave room for the 2 generated tokens.
            n_tokens = min(blocks * BLOCK_TOKENS - 28, MAX_MODEL_LEN - 8)
            before = await asyncio.to_thread(scrape, base_url)
            result = await stream_completion(client, base_url, random_prompt(rng, n_tokens), max_tokens=2)
            # The frontend observes the histograms when the decode stream's first frame arrives; the
            # stream has ended by now, but allow a moment for the scrape to see them.
            await asyncio.sleep(0.2)
            after = await asyncio.to_thread(scrape, base_url)

            def delta(name: str, **labels: str) -> float:
                return metric(after, name, **labels) - metric(before, name, **labels)

            row = {"blocks_asked": blocks, "tokens": n_tokens, "error": result["error"],
                   "disaggregated": delta("dynamo_lite_frontend_disagg_requests_total", reason="disaggregated"),
                   "blocks": delta("dynamo_lite_frontend_kv_transfer_blocks_sum"),
                   "count": delta("dynamo_lite_frontend_kv_transfer_bytes_count"),
                   "bytes": delta("dynamo_lite_frontend_kv_transfer_bytes_sum"),
                   "seconds": delta("dynamo_lite_frontend_kv_transfer_seconds_sum"),
                   "ttft": result.get("ttft")}
            if row["bytes"] > 0:
                row["memcpy_gbps"] = memcpy_gbps(int(row["bytes"]), repeats)
            rows.append(row)
            print(f"  {n_tokens} tokens: {row}", flush=True)
    return rows


def print_transfer_table(rows: list[dict]) -> None:
    print(f"\n(a) KV transfer per request (decode worker's NIXL pull) vs memcpy of the same size, same run")
    print(f"{'blocks':>7}{'tokens':>8}{'MB':>9}{'transfer ms':>13}{'GB/s':>9}{'memcpy GB/s':>13}{'ratio':>8}")
    for r in rows:
        if r["error"] or r["bytes"] <= 0 or r["seconds"] <= 0:
            why = r["error"] or ("not disaggregated" if not r["disaggregated"] else
                                 "no transfer attributed by the decode worker")
            print(f"{int(r['blocks'] or r['blocks_asked']):>7}{r['tokens']:>8}   -- {why}")
            continue
        gbps = r["bytes"] / r["seconds"] / 1e9
        print(f"{int(r['blocks']):>7}{r['tokens']:>8}{r['bytes'] / 1e6:>9.2f}{r['seconds'] * 1e3:>13.2f}"
              f"{gbps:>9.2f}{r['memcpy_gbps']:>13.2f}{gbps / r['memcpy_gbps']:>8.2f}")


# ---------------------------------------------------------------------------------------------- (b)

async def mixed_workload(base_url: str, rng: np.random.Generator, duration: float, streams: int,
                         long_every: float, long_tokens: int) -> dict[str, list[dict]]:
    """Decoding streams back to back for `duration` s, a long prompt every `long_every` s."""
    results: dict[str, list[dict]] = {"decode": [], "long": []}
    stop_at = time.monotonic() + duration

    async def decoding_stream(client: httpx.AsyncClient, index: int) -> None:
        await asyncio.sleep(index * 0.7)  # stagger so the streams are at different positions
        while time.monotonic() < stop_at:
            results["decode"].append(await stream_completion(
                client, base_url, random_prompt(rng, SHORT_PROMPT_TOKENS), max_tokens=64))

    async def long_prompts(client: httpx.AsyncClient) -> None:
        tasks = []
        await asyncio.sleep(min(3.0, long_every))  # let the decoding streams get going first
        while time.monotonic() < stop_at:
            tasks.append(asyncio.create_task(stream_completion(
                client, base_url, random_prompt(rng, long_tokens), max_tokens=16)))
            await asyncio.sleep(long_every)
        results["long"] = list(await asyncio.gather(*tasks))

    limits = httpx.Limits(max_connections=streams + 32)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT, limits=limits) as client:
        # Bound: the window, plus time for the last requests started in it to finish.
        async with asyncio.timeout(duration + REQUEST_TIMEOUT + 30):
            await asyncio.gather(long_prompts(client), *(decoding_stream(client, i) for i in range(streams)))
    return results


def summarize(results: list[dict]) -> dict:
    ok = [r for r in results if not r["error"]]
    gaps = [g for r in ok for g in r["gaps"]]
    return {"n": len(ok), "errors": len(results) - len(ok), "ttft": [r["ttft"] for r in ok], "gaps": gaps,
            "first_error": next((r["error"] for r in results if r["error"]), None)}


def print_latency_table(by_mode: dict[str, dict[str, dict]]) -> None:
    print("\n(b) TTFT and inter-token latency (ms), long prompts arriving while other requests decode")
    print(f"{'mode':<15}{'requests':<16}{'n':>4}{'err':>5}{'TTFT p50':>10}{'TTFT p99':>10}"
          f"{'ITL p50':>9}{'ITL p99':>9}{'ITL max':>9}")
    for mode, kinds in by_mode.items():
        for kind, s in kinds.items():
            print(f"{mode:<15}{kind:<16}{s['n']:>4}{s['errors']:>5}"
                  f"{percentile(s['ttft'], 50) * 1e3:>10.0f}{percentile(s['ttft'], 99) * 1e3:>10.0f}"
                  f"{percentile(s['gaps'], 50) * 1e3:>9.1f}{percentile(s['gaps'], 99) * 1e3:>9.1f}"
                  f"{(max(s['gaps']) if s['gaps'] else float('nan')) * 1e3:>9.1f}")
            if s["first_error"]:
                print(f"{'':<15}first error: {s['first_error']}")


# ---------------------------------------------------------------------------------------------- main

def health_roles(base_url: str) -> list[str]:
    r = httpx.get(f"{base_url}/health", timeout=5)
    return [i.get("role") for i in r.json().get("instances", [])] if r.status_code == 200 else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=45.0, help="seconds of mixed workload per mode")
    parser.add_argument("--streams", type=int, default=3, help="decoding streams running back to back")
    parser.add_argument("--long-every", type=float, default=8.0, help="seconds between long prompts")
    parser.add_argument("--long-tokens", type=int, default=1000)
    parser.add_argument("--memcpy-repeats", type=int, default=30)
    parser.add_argument("--startup-timeout", type=float, default=400.0, help="per vLLM worker")
    parser.add_argument("--skip-latency", action="store_true", help="only part (a)")
    args = parser.parse_args()
    if not (DEFAULT_MODEL_PATH / "config.json").exists():
        sys.exit(f"default model missing at {DEFAULT_MODEL_PATH}: run scripts/setup.sh")

    rng = np.random.default_rng()
    run_dir = Path(tempfile.mkdtemp(prefix="bench_disagg_"))
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    transfer_rows: list[dict] = []
    by_mode: dict[str, dict[str, dict]] = {}
    print(f"logs: {run_dir}", flush=True)
    with start_etcd() as etcd, start_nats() as nats:
        group = ProcGroup(run_dir, {"ETCD_ENDPOINTS": etcd.url, "NATS_SERVER": nats.url, "PYTHONUNBUFFERED": "1"})
        try:
            port, agg_port = free_tcp_port(), free_tcp_port()
            disagg_url, agg_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{agg_port}"
            frontend = group.start("frontend", "dynamo_lite.frontend", "--http-host", "127.0.0.1", "--http-port",
                                   str(port), "--namespace", namespace, "--router-mode", "kv",
                                   "--disagg-min-prefill-tokens", str(MIN_PREFILL_TOKENS))
            frontend_agg = group.start("frontend-agg", "dynamo_lite.frontend", "--http-host", "127.0.0.1",
                                       "--http-port", str(agg_port), "--namespace", namespace,
                                       "--no-disaggregation")
            common = ["--model", str(DEFAULT_MODEL_PATH), "--served-model-name", SERVED_MODEL_NAME,
                      "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "8", "--namespace", namespace,
                      "--connector", "nixl"]
            # One engine at a time: while it initialises, vLLM's NIXL worker moves the engine's main thread
            # to the last core (docs/disaggregation-notes.md §1).
            started = time.monotonic()
            prefill = group.start("prefill", "dynamo_lite.vllm", *common, "--is-prefill-worker",
                                  extra_env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0"})
            wait_until(lambda: "prefill" in health_roles(disagg_url), args.startup_timeout,
                       "the prefill worker on /health", [frontend, prefill], interval=1.0)
            decode = group.start("decode", "dynamo_lite.vllm", *common,
                                 extra_env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "1"})
            wait_until(lambda: "decode" in health_roles(disagg_url) and "decode" in health_roles(agg_url),
                       args.startup_timeout, "the decode worker on both frontends",
                       [frontend, frontend_agg, prefill, decode], interval=1.0)
            print(f"workers up in {time.monotonic() - started:.0f} s", flush=True)

            async def warm_up() -> None:
                # First disaggregated request does the NIXL handshake; first request of each kind
                # warms the engines. Not measured.
                async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as client:
                    for url in (disagg_url, agg_url):
                        r = await stream_completion(client, url, random_prompt(rng, 200), max_tokens=4)
                        if r["error"]:
                            raise RuntimeError(f"warm-up request on {url} failed: {r['error']}")

            asyncio.run(warm_up())
            print("(a) transfers:", flush=True)
            transfer_rows = asyncio.run(transfer_table(disagg_url, rng, args.memcpy_repeats))

            if not args.skip_latency:
                for mode, url in (("disaggregated", disagg_url), ("aggregated", agg_url)):
                    before = scrape(url)
                    t0 = time.monotonic()
                    raw = asyncio.run(mixed_workload(url, rng, args.duration, args.streams, args.long_every,
                                                     args.long_tokens))
                    after = scrape(url)
                    reasons = {reason: metric(after, "dynamo_lite_frontend_disagg_requests_total", reason=reason)
                               - metric(before, "dynamo_lite_frontend_disagg_requests_total", reason=reason)
                               for reason in ("disaggregated", "short_prompt", "disabled", "prefill_pool_busy",
                                              "prefill_failed", "no_prefill_workers")}
                    print(f"{mode}: {time.monotonic() - t0:.0f} s, served by reason "
                          f"{ {k: int(v) for k, v in reasons.items() if v} }", flush=True)
                    by_mode[mode] = {"decoding streams": summarize(raw["decode"]),
                                     "long prompts": summarize(raw["long"])}
        finally:
            group.stop()

    if transfer_rows:
        print_transfer_table(transfer_rows)
    if by_mode:
        print_latency_table(by_mode)
        print(f"\nworkload per mode: {args.streams} decoding streams ({SHORT_PROMPT_TOKENS}-token prompts, 64 "
              f"output tokens, back to back) for {args.duration:.0f} s; a {args.long_tokens}-token prompt "
              f"(16 output tokens) every {args.long_every:.0f} s; fresh random token ids per request.")
    print()
    print(EXPLANATION)
    print(f"\nlogs: {run_dir}")


if __name__ == "__main__":
    main()
