"""Replay a Mooncake-style trace against an OpenAI /v1/completions endpoint on a fixed schedule.

The trace gives, per request, an arrival time, input and output lengths and one hash id per
512-token block (equal ids = equal prefix up to that block). `scale_trace` shrinks it for a CPU box:
each block becomes `block_tokens` tokens, lengths shrink by the same factor (the last block stays
partial when the original was), outputs are divided too and capped, timestamps are divided by
`time_scale`. The block structure is kept, so prefix sharing is exactly the trace's.

Prompts are token ids, not text: hash id h always maps to the same `block_tokens` ids (drawn from a
generator seeded with h), so equal hash ids give equal token prefixes with no tokenizer drift at
block boundaries. The client sends each request at its scheduled time (never earlier, and late only
if the event loop is), streams it, and records the time to the first content chunk and the usage.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

TRACE_BLOCK_TOKENS = 512  # tokens per hash id in the Mooncake trace


@dataclass(frozen=True)
class TraceRequest:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def load_trace(path: Path, limit: int) -> list[TraceRequest]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(rows) >= limit:
                break
            row = json.loads(line)
            rows.append(TraceRequest(float(row["timestamp"]), int(row["input_length"]),
                                     int(row["output_length"]), tuple(row["hash_ids"])))
    return rows


def scale_trace(rows: list[TraceRequest], block_tokens: int, time_scale: float, output_divisor: float,
                output_cap: int) -> list[TraceRequest]:
    """Shrink blocks to block_tokens tokens, divide timestamps and outputs (see the module doc)."""
    shrink = TRACE_BLOCK_TOKENS / block_tokens
    scaled = []
    for row in rows:
        full_blocks = len(row.hash_ids) - 1
        # The last block keeps its fraction of a block (at least one token).
        tail = row.input_length - full_blocks * TRACE_BLOCK_TOKENS
        tail_tokens = max(1, min(block_tokens, math.ceil(tail / shrink)))
        output = max(1, min(output_cap, round(row.output_length / output_divisor)))
        scaled.append(TraceRequest(row.timestamp_ms / time_scale, full_blocks * block_tokens + tail_tokens,
                                   output, row.hash_ids))
    return scaled


def write_trace(rows: list[TraceRequest], path: Path) -> None:
    """The scaled trace in Mooncake's format (for aiperf's mooncake_trace dataset type)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"timestamp": round(row.timestamp_ms, 3), "input_length": row.input_length,
                                "output_length": row.output_length, "hash_ids": list(row.hash_ids)}) + "\n")


@dataclass
class PromptBuilder:
    """Token ids for a request: hash id h -> a fixed block of ids from [first_id, end_id)."""

    block_tokens: int
    first_id: int
    end_id: int
    _blocks: dict[int, list[int]] = field(default_factory=dict)

    def block(self, hash_id: int) -> list[int]:
        ids = self._blocks.get(hash_id)
        if ids is None:
            rng = random.Random(hash_id * 1_000_003 + 17)
            ids = [rng.randrange(self.first_id, self.end_id) for _ in range(self.block_tokens)]
            self._blocks[hash_id] = ids
        return ids

    def prompt(self, row: TraceRequest) -> list[int]:
        ids: list[int] = []
        for hash_id in row.hash_ids:
            ids.extend(self.block(hash_id))
        return ids[:row.input_length]


@dataclass
class RequestResult:
    ok: bool
    ttft: float | None = None  # seconds from send to the first chunk with text
    latency: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    send_lag: float = 0.0  # how late the request left vs its schedule
    error: str = ""
    itls: list[float] = field(default_factory=list)  # seconds between successive chunks with text
    stages: dict[str, float] = field(default_factory=dict)  # the frontend's X-Stage-Timing, when it sends one


# dynamo_lite's frontend answers it with the request's time per stage up to its first token (docs/http-api.md);
# other servers ignore it.
STAGE_HEADER = "X-Stage-Timing"
REQUEST_HEADERS = {"Content-Type": "application/json", STAGE_HEADER: "1"}


def parse_stages(value: str) -> dict[str, float]:
    stages = {}
    for item in value.split(";"):
        name, _, seconds = item.partition("=")
        try:
            stages[name] = float(seconds)
        except ValueError:
            continue
    return stages


async def _one(client: httpx.AsyncClient, url: str, body: bytes, scheduled: float, start: float,
               timeout: float) -> RequestResult:
    await asyncio.sleep(max(0.0, start + scheduled - time.monotonic()))
    sent = time.monotonic()
    result = RequestResult(ok=False, send_lag=sent - (start + scheduled))
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", url, content=body, headers=REQUEST_HEADERS) as response:
                if response.status_code != 200:
                    result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                    return result
                result.stages = parse_stages(response.headers.get(STAGE_HEADER, ""))
                last_text = 0.0
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        result.error = str(chunk["error"])[:200]
                        return result
                    choices = chunk.get("choices") or []
                    # A 1-token output may decode to no text (part of a UTF-8 character): then
                    # its finish chunk is its first token.
                    if choices and choices[0].get("text"):
                        now = time.monotonic()
                        if last_text:
                            result.itls.append(now - last_text)
                        last_text = now
                    if result.ttft is None and choices and (choices[0].get("text")
                                                            or choices[0].get("finish_reason")):
                        result.ttft = time.monotonic() - sent
                    usage = chunk.get("usage")
                    if usage:
                        result.prompt_tokens = usage.get("prompt_tokens", 0)
                        result.completion_tokens = usage.get("completion_tokens", 0)
                        details = usage.get("prompt_tokens_details") or {}
                        result.cached_tokens = details.get("cached_tokens") or 0
        result.latency = time.monotonic() - sent
        result.ok = result.ttft is not None and result.prompt_tokens > 0
        if not result.ok:
            result.error = "stream ended without text or usage"
    except (httpx.HTTPError, TimeoutError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"[:200]
    return result


async def replay(base_url: str, model: str, rows: list[TraceRequest], prompts: PromptBuilder,
                 request_timeout: float = 120.0) -> list[RequestResult]:
    """Send every row at its timestamp (streaming /v1/completions with usage); results in row order."""
    url = f"{base_url}/v1/completions"
    # Encoded up front: the client's own CPU time must not delay the schedule.
    bodies = [json.dumps({"model": model, "prompt": prompts.prompt(row), "max_tokens": row.output_length,
                          "ignore_eos": True, "temperature": 0.0, "stream": True,
                          "stream_options": {"include_usage": True}}).encode() for row in rows]
    # A fresh connection per request (what aiperf's client effectively measures): on a reused
    # connection some servers' first chunk waits out the client's delayed ACK (~40 ms; Dynamo 1.6.1's
    # frontend does), which would charge the client's TCP settings to the server. Local connects cost
    # ~0.2 ms. It also rules out sending on a connection the server is closing (a spurious ReadError).
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    timeout = httpx.Timeout(request_timeout, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.monotonic() + 0.5  # build the tasks before the first send
        tasks = [asyncio.create_task(_one(client, url, body, row.timestamp_ms / 1000.0, start,
                                          request_timeout)) for row, body in zip(rows, bodies, strict=True)]
        return await asyncio.gather(*tasks)


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (1..99), linear interpolation between order statistics."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def stage_breakdown(results: list[RequestResult], low: float, high: float = math.inf) -> dict[str, float]:
    """Mean ms per frontend stage (and the client's TTFT) over the requests with low <= TTFT < high."""
    chosen = [r for r in results if r.ok and r.stages and low <= r.ttft < high]
    if not chosen:
        return {}
    names = sorted({name for r in chosen for name in r.stages})
    out = {name: statistics.mean(r.stages.get(name, 0.0) for r in chosen) * 1e3 for name in names}
    out["ttft"] = statistics.mean(r.ttft for r in chosen) * 1e3
    out["requests"] = len(chosen)
    out["prompt_tokens"] = statistics.mean(r.prompt_tokens for r in chosen)
    out["cached_tokens"] = statistics.mean(r.cached_tokens for r in chosen)
    return out


def summarize(results: list[RequestResult]) -> dict:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok]
    itls = [gap for r in ok for gap in r.itls]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    errors = [r.error for r in results if not r.ok]
    p50, p99 = percentile(ttfts, 50), percentile(ttfts, 99)
    return {"requests": len(results), "ok": len(ok), "prompt_tokens": prompt, "cached_tokens": cached,
            "cached_fraction": cached / prompt if prompt else float("nan"),
            "ttft_p50_ms": p50 * 1e3, "ttft_p99_ms": p99 * 1e3,
            "itl_p50_ms": percentile(itls, 50) * 1e3, "itl_p99_ms": percentile(itls, 99) * 1e3,
            "stages_p99": stage_breakdown(ok, p99), "stages_p50": stage_breakdown(ok, 0.0, p50),
            "latency_p50_ms": percentile([r.latency for r in ok], 50) * 1e3,
            "send_lag_max_ms": max((r.send_lag for r in results), default=0.0) * 1e3,
            "first_error": errors[0] if errors else ""}


def reuse_ceiling(rows: list[TraceRequest], block_tokens: int) -> float:
    """Cached fraction with one unbounded cache holding every full block seen so far (the upper bound)."""
    seen: set[tuple[int, ...]] = set()
    cached = total = 0
    for row in rows:
        total += row.input_length
        for i in range(len(row.hash_ids)):
            if (i + 1) * block_tokens > row.input_length:
                break  # a partial last block is never reused
            prefix = row.hash_ids[:i + 1]
            if prefix in seen:
                cached += block_tokens
            else:
                seen.add(prefix)
    return cached / total if total else 0.0
