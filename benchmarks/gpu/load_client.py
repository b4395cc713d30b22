"""A closed-loop streaming load client for /v1/completions, the same for vLLM's server and dynamo_lite's.

`concurrency` requests are in flight at all times until `requests` have been sent. Each prompt is fresh
random token ids (no prefix-cache hits on either server), each output is exactly `output_tokens` long
(ignore_eos). Per request it records the time to the first chunk with text (TTFT) and the mean time per
output token after the first (TPOT = (latency - TTFT) / (tokens - 1)), which does not depend on how
many tokens a server puts in one SSE chunk. Chunks are not JSON-parsed after the first text, so the
client's own CPU stays low (it shares the machine with the servers).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass

import aiohttp

VOCAB_LOW, VOCAB_HIGH = 100, 49000  # SmolLM2's vocabulary is 49152; clear of its special tokens


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    tokens: int = 0
    error: str = ""


def percentile(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def _one(session: aiohttp.ClientSession, url: str, body: dict, timeout: float) -> Result:
    start = time.monotonic()
    ttft = None
    tokens = 0
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status != 200:
                return Result(False, error=f"HTTP {response.status}: {(await response.text())[:200]}")
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: {"):
                    continue
                if ttft is None and b'"text":""' not in line.replace(b" ", b""):
                    chunk = json.loads(line[6:])
                    if (chunk.get("choices") or [{}])[0].get("text"):
                        ttft = time.monotonic() - start
                if b'"usage"' in line and b'"completion_tokens"' in line:
                    usage = json.loads(line[6:]).get("usage") or {}
                    tokens = usage.get("completion_tokens") or tokens
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return Result(False, error=f"{type(e).__name__}: {e}"[:200])
    latency = time.monotonic() - start
    if ttft is None or tokens == 0:
        return Result(False, error="stream ended without text or usage")
    return Result(True, ttft, latency, tokens)


async def run_load(base_url: str, model: str, concurrency: int, requests: int, input_tokens: int,
                   output_tokens: int, seed: int = 0, timeout: float = 600.0) -> dict:
    rng = random.Random(seed)
    bodies = [{"model": model, "prompt": [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(input_tokens)],
               "max_tokens": output_tokens, "min_tokens": output_tokens, "ignore_eos": True,
               "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
              for _ in range(requests)]
    url = f"{base_url}/v1/completions"
    results: list[Result] = []
    queue = list(reversed(bodies))
    connector = aiohttp.TCPConnector(limit=concurrency + 8)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def lane() -> None:
            while queue:
                results.append(await _one(session, url, queue.pop(), timeout))

        start = time.monotonic()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        wall = time.monotonic() - start
    ok = [r for r in results if r.ok]
    tpot = [(r.latency - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1]
    out_tokens = sum(r.tokens for r in ok)
    errors = [r.error for r in results if not r.ok]
    return {"concurrency": concurrency, "requests": requests, "ok": len(ok), "errors": len(errors),
            "first_error": errors[0] if errors else "", "input_tokens": input_tokens,
            "output_tokens": output_tokens, "wall_s": wall,
            "output_tok_per_s": out_tokens / wall, "requests_per_s": len(ok) / wall,
            "ttft_p50_ms": percentile([r.ttft for r in ok], 50) * 1e3,
            "ttft_p99_ms": percentile([r.ttft for r in ok], 99) * 1e3,
            "tpot_p50_ms": percentile(tpot, 50) * 1e3, "tpot_p99_ms": percentile(tpot, 99) * 1e3}
