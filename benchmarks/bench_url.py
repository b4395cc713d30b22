"""Benchmark any OpenAI-compatible URL (dynamo_lite, vllm serve, ...): TTFT, ITL, latency and throughput
of streamed chat completions at one or more concurrencies; JSON results and PNG plots.

    python benchmarks/bench_url.py --single                     # one request: latency alone
    python benchmarks/bench_url.py --quick                      # 20 prompts at concurrency 1 and 4
    python benchmarks/bench_url.py                              # full: 100 prompts at 1, 4 and 16
    python benchmarks/bench_url.py -n 50 -c 8 32 -o results/    # custom
    python benchmarks/bench_url.py --dataset ShareGPT_V3_unfiltered_cleaned_split.json --quick
    python benchmarks/bench_url.py --matrix qwen2.5-7b llama3.1-8b --quick   # serve each preset, compare
    python benchmarks/bench_url.py --compare a/results.json b/results.json     # table of saved runs

Prompts are the first human turns of a ShareGPT-style file (JSON list or JSONL of {"conversations":
[{"from": "human", "value": ...}, ...]}, or of {"prompt": ...}), else synthetic ones of --input-words
words. Every request streams with `stream_options.include_usage`, so output tokens are the server's count.
Plots (ttft.png, itl.png, throughput.png) need matplotlib (`pip install -e '.[bench]'`); without it the
JSON is written and the script says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROFILES = {"single": (1, [1]), "quick": (20, [1, 4]), "full": (100, [1, 4, 16])}
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "quietly", "judge", "boxing", "matches", "near", "old", "castles", "under", "bright", "northern", "stars"]


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0  # seconds to the first content token
    latency: float = 0.0  # seconds to the end of the stream
    itl: list[float] = field(default_factory=list)  # seconds between content chunks after the first
    # (a server may pack several tokens into one chunk: summarize's TPOT counts tokens)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(results: list[RequestResult], concurrency: int, wall: float) -> dict:
    good = [r for r in results if r.ok]
    ttft = [r.ttft for r in good]
    itl = [x for r in good for x in r.itl]
    latency = [r.latency for r in good]
    # Time per output token after the first (vLLM's benchmark's TPOT): independent of how many tokens a
    # server packs into one chunk, which the chunk gaps (ITL) are not.
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in good if r.output_tokens > 1]
    out_tokens = sum(r.output_tokens for r in good)

    def stats(values: list[float]) -> dict:
        return {"mean": statistics.fmean(values) if values else 0.0, "p50": percentile(values, 50),
                "p90": percentile(values, 90), "p99": percentile(values, 99)}

    return {"concurrency": concurrency, "requests": len(results), "failed": len(results) - len(good),
            "errors": sorted({r.error for r in results if r.error})[:5], "wall_s": wall,
            "requests_per_s": len(good) / wall if wall else 0.0,
            "output_tokens_per_s": out_tokens / wall if wall else 0.0,
            "ttft_s": stats(ttft), "itl_s": stats(itl), "tpot_s": stats(tpot), "latency_s": stats(latency),
            "raw": {"ttft": ttft, "itl": itl, "latency": latency}}


def load_prompts(dataset: str | None, count: int, input_words: int, seed: int = 0) -> list[str]:
    """`count` prompts: the dataset's first human turns (cycled if it has fewer), else synthetic."""
    rng = random.Random(seed)
    if not dataset:
        return [f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(input_words))
                for i in range(count)]
    text = Path(dataset).read_text()
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    prompts = []
    for row in rows:
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompts.append(row["prompt"])
            continue
        turns = row.get("conversations", []) if isinstance(row, dict) else []
        first = next((t.get("value", "") for t in turns if t.get("from") in ("human", "user")), "")
        if first:
            prompts.append(first)
    if not prompts:
        raise SystemExit(f"{dataset}: no prompts found (ShareGPT conversations or {{'prompt': ...}} rows)")
    rng.shuffle(prompts)
    return [prompts[i % len(prompts)] for i in range(count)]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                      ignore_eos: bool) -> RequestResult:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM's (and dynamo_lite's) extension: fixed output lengths
    start = time.perf_counter()
    result, last = RequestResult(ok=False), None
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"].get("completion_tokens", 0)
                    result.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                delta = (chunk.get("choices") or [{}])[0].get("delta", {})
                if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency = time.perf_counter() - start
    result.ok = last is not None
    if not result.ok:
        result.error = "no content streamed"
    return result


async def run_level(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int,
                    ignore_eos: bool, api_key: str | None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[RequestResult] = []
    timeout = httpx.Timeout(600, connect=10)
    async with httpx.AsyncClient(timeout=timeout, headers=headers, limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                prompt = queue.get_nowait()
                results.append(await one_request(client, url, model, prompt, max_tokens, ignore_eos))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return summarize(results, concurrency, wall)


def first_model(url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    data = httpx.get(f"{url}/v1/models", headers=headers, timeout=10).json().get("data", [])
    if not data:
        raise SystemExit(f"{url}/v1/models lists no model: is anything serving?")
    return data[0]["id"]


def plot(run: dict, out_dir: Path) -> list[str]:
    """ttft.png, itl.png (distributions per concurrency), throughput.png (against concurrency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plots, JSON only", file=sys.stderr)
        return []
    written = []
    for key, title in (("ttft", "Time to first token"), ("itl", "Inter-token latency")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for level in run["levels"]:
            values = [v * 1000 for v in level["raw"][key]]
            if values:
                ax.hist(values, bins=30, alpha=0.6, label=f"concurrency {level['concurrency']}")
        ax.set(title=f"{title} ({run['model']})", xlabel="ms",
               ylabel="requests" if key == "ttft" else "chunks")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / f"{key}.png", dpi=100)
        plt.close(fig)
        written.append(str(out_dir / f"{key}.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    conc = [lv["concurrency"] for lv in run["levels"]]
    ax.plot(conc, [lv["output_tokens_per_s"] for lv in run["levels"]], marker="o", label="output tokens/s")
    ax2 = ax.twinx()
    ax2.plot(conc, [lv["requests_per_s"] for lv in run["levels"]], marker="s", color="tab:orange",
             label="requests/s")
    ax.set(title=f"Throughput against concurrency ({run['model']})", xlabel="concurrency",
           ylabel="output tokens/s", xticks=conc)
    ax2.set_ylabel("requests/s")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper left")
    fig.tight_layout()
    fig.savefig(out_dir / "throughput.png", dpi=100)
    plt.close(fig)
    written.append(str(out_dir / "throughput.png"))
    return written


def table(runs: list[dict]) -> str:
    """One row per (run, concurrency): what the Spark projects' comparison shows."""
    head = ("| run | model | conc | req/s | out tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
            "| failed |")
    lines = [head, "|" + " --- |" * 10]
    for run in runs:
        for lv in run["levels"]:
            lines.append(f"| {run.get('label', '')} | {run['model']} | {lv['concurrency']} | "
                         f"{lv['requests_per_s']:.2f} | {lv['output_tokens_per_s']:.1f} | "
                         f"{lv['ttft_s']['p50'] * 1000:.0f} | {lv['ttft_s']['p99'] * 1000:.0f} | "
                         f"{lv['itl_s']['p50'] * 1000:.1f} | {lv['itl_s']['p99'] * 1000:.1f} | "
                         f"{lv['failed']} |")
    return "\n".join(lines)


def bench(args: argparse.Namespace, url: str, out_dir: Path, label: str = "") -> dict:
    count, levels = PROFILES[args.profile]
    count, levels = args.num_prompts or count, args.concurrency or levels
    model = args.model or first_model(url, args.api_key)
    prompts = load_prompts(args.dataset, count, args.input_words)
    run = {"label": label or url, "url": url, "model": model, "profile": args.profile, "num_prompts": count,
           "max_tokens": args.max_tokens, "dataset": args.dataset or "synthetic", "levels": []}
    for concurrency in levels:
        level = asyncio.run(run_level(url, model, prompts, concurrency, args.max_tokens, args.ignore_eos,
                                      args.api_key))
        run["levels"].append(level)
        print(f"{label or url}: concurrency {concurrency}: {level['requests_per_s']:.2f} req/s, "
              f"{level['output_tokens_per_s']:.1f} tok/s, TTFT p50 {level['ttft_s']['p50'] * 1000:.0f} ms, "
              f"ITL p50 {level['itl_s']['p50'] * 1000:.1f} ms, {level['failed']} failed", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(run, indent=1))
    plots = plot(run, out_dir)
    print(f"results: {out_dir / 'results.json'}" + (f"; plots: {', '.join(plots)}" if plots else ""))
    return run


def serve_preset(preset: str, engine: str, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dynamo_lite.serve", "--preset", preset, "--engine", engine,
           "--port", str(port), "--host", "127.0.0.1", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_serving(proc: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited with {proc.returncode}:\n{proc.stdout.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).json().get("data"):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not serve within {timeout:.0f} s")


def matrix(args: argparse.Namespace) -> list[dict]:
    """Serve each preset with `python -m dynamo_lite.serve`, benchmark it, stop it."""
    from dynamo_lite.runtime.net import free_tcp_port

    runs = []
    for preset in args.matrix:
        port = free_tcp_port()
        url = f"http://127.0.0.1:{port}"
        proc = serve_preset(preset, args.engine, port, args.serve_args)
        try:
            wait_serving(proc, url, args.startup_timeout)
            runs.append(bench(args, url, Path(args.output) / preset, label=preset))
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-u", "--url", default=os.environ.get("BENCH_URL", "http://127.0.0.1:8000"),
                   help="server base URL (default $BENCH_URL, else http://127.0.0.1:8000)")
    p.add_argument("-m", "--model", default=None, help="model name (default: the first of /v1/models)")
    profile = p.add_mutually_exclusive_group()
    profile.add_argument("--single", dest="profile", action="store_const", const="single",
                         help="one request at concurrency 1")
    profile.add_argument("--quick", dest="profile", action="store_const", const="quick",
                         help="20 prompts at concurrency 1 and 4")
    p.set_defaults(profile="full")
    p.add_argument("-n", "--num-prompts", type=int, default=None, help="prompts per concurrency level")
    p.add_argument("-c", "--concurrency", type=int, nargs="+", default=None, help="concurrency levels")
    p.add_argument("--dataset", default=None, help="ShareGPT-style JSON / JSONL file (default: synthetic)")
    p.add_argument("--input-words", type=int, default=200, help="synthetic prompt length in words")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens per request")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-tokens (vLLM extension)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer key ($OPENAI_API_KEY)")
    p.add_argument("-o", "--output", default="bench-results", help="folder for results.json and plots")
    p.add_argument("--matrix", nargs="+", metavar="PRESET", default=None,
                   help="serve each preset in turn (python -m dynamo_lite.serve --preset), benchmark, "
                        "compare")
    p.add_argument("--engine", default="vllm", choices=["vllm", "mocker"], help="--matrix: serve's engine")
    p.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[],
                   help="--matrix: more arguments for serve (last on the line)")
    p.add_argument("--startup-timeout", type=float, default=900, help="--matrix: seconds a preset may load")
    p.add_argument("--compare", nargs="+", metavar="RESULTS_JSON", default=None,
                   help="print the comparison table of saved results.json files and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        runs = [json.loads(Path(f).read_text()) for f in args.compare]
    elif args.matrix:
        runs = matrix(args)
    else:
        runs = [bench(args, args.url.rstrip("/"), Path(args.output))]
    text = table(runs)
    print(text)
    if not args.compare:
        (Path(args.output) / "comparison.md").write_text(text + "\n")
    return 1 if any(lv["failed"] == lv["requests"] for run in runs for lv in run["levels"]) else 0


if __name__ == "__main__":
    sys.exit(main())
