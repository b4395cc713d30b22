"""dynamo_lite on a GPU against vLLM's own server (`vllm serve`), one part per command.

    python benchmarks/gpu/run_gpu.py serve   [--out DIR]   # (a) answers equal to vllm serve's; (d) KV router
    python benchmarks/gpu/run_gpu.py disagg  [--out DIR]   # (b) prefill/decode over NIXL on one GPU
    python benchmarks/gpu/run_gpu.py perf    [--out DIR]   # (c) throughput, TTFT, TPOT vs vllm serve

Each part starts what it needs (etcd and NATS on free ports: DYN_TEST_ETCD / DYN_TEST_NATS name their
binaries, as in the tests; vLLM servers and dynamo_lite workers and frontends as `python -m ...`),
writes DIR/<part>.json and the processes' logs, prints a summary last, and stops what it started.
benchmarks/gpu/README.md says how to bring vLLM and the model to a GPU machine without network.

(a) SmolLM2-135M-Instruct (real weights): the same chat and completion requests at temperature 0 to
    `vllm serve` and to a dynamo_lite frontend + worker with the same engine flags, one at a time;
    every answer text must be equal. (d) then adds a second worker and replays the Mooncake trace
    through a kv-router frontend and a round-robin one (each mode on prompts of its own, so neither
    finds the other's blocks in the caches).
(b) A prefill and a decode worker (--connector nixl, KV in GPU memory) share the GPU: greedy outputs of
    a disaggregated frontend must equal those of an aggregated one on the decode worker; then each
    request's KV pull (bytes and seconds as the decode worker's vLLM measured them) against a
    device-to-device copy of the same size (torch, CUDA events, median of 20).
(c) A Llama-3.1-8B-shaped model (config.json, dummy weights: --load-format dummy) under a closed-loop
    streaming load at several concurrencies, first through `vllm serve`, then through dynamo_lite
    (frontend + one worker), the same engine flags and the same client (load_client.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import trace_replay  # noqa: E402
from benchmarks.gpu.load_client import run_load  # noqa: E402
from tests.e2e.harness import ProcGroup, healthy_instances, metric_sum, wait_until  # noqa: E402
from tests.services import free_tcp_port, start_etcd, start_nats  # noqa: E402

SERVED = "model"  # the served model name on both servers
TRACE = REPO.parent / "shared" / "data" / "mooncake_conversation_trace.jsonl"
START_TIMEOUT = 420.0
REQUEST_TIMEOUT = 300.0

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three prime numbers greater than 50.",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue?",
    "Give me a short recipe for pancakes.",
    "What does HTTP stand for?",
]
COMPLETIONS = [
    "The quick brown fox",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics are",
]


# ---------------------------------------------------------------------------------------------- stack

def engine_env() -> dict[str, str]:
    """Settings every vLLM process here gets: offline, and FlashInfer's sampler off (vLLM's sampler
    imports FlashInfer unless told not to, and its kernel wheel is not on the GPU machine)."""
    return {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
            "VLLM_USE_FLASHINFER_SAMPLER": os.environ.get("VLLM_USE_FLASHINFER_SAMPLER", "0"),
            "PYTHONUNBUFFERED": "1"}


class Stack:
    """etcd, NATS and the processes of one part, all stopped on exit."""

    def __init__(self, run_dir: Path, services: bool = True):
        self.run_dir = run_dir
        self.services = services
        self.namespace = f"gpu-{uuid.uuid4().hex[:8]}"
        self._exit = contextlib.ExitStack()
        self.group: ProcGroup | None = None

    def __enter__(self) -> Stack:
        env = engine_env()
        if self.services:
            etcd = self._exit.enter_context(start_etcd())
            nats = self._exit.enter_context(start_nats())
            env.update(ETCD_ENDPOINTS=etcd.url, NATS_SERVER=nats.url)
        self.group = ProcGroup(self.run_dir, env)
        self._exit.callback(self.group.stop)
        return self

    def __exit__(self, *exc) -> None:
        self._exit.close()

    def vllm_serve(self, name: str, model: str, flags: list[str]) -> str:
        port = free_tcp_port()
        proc = self.group.start(name, "vllm.entrypoints.cli.main", "serve", model, "--host", "127.0.0.1",
                                "--port", str(port), "--served-model-name", SERVED, *flags)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, START_TIMEOUT,
                   f"{name} on /health", [proc], interval=1.0)
        return url

    def worker(self, name: str, model: str, flags: list[str], *more: str, namespace: str | None = None):
        """A dynamo_lite vLLM worker (not waited for: see wait_models)."""
        return self.group.start(name, "dynamo_lite.vllm", "--model", model, "--served-model-name", SERVED,
                                "--namespace", namespace or self.namespace, *flags, *more)

    def frontend(self, name: str, *flags: str, namespace: str | None = None) -> str:
        port = free_tcp_port()
        proc = self.group.start(name, "dynamo_lite.frontend", "--http-host", "127.0.0.1", "--http-port",
                                str(port), "--namespace", namespace or self.namespace, *flags)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{url}/health", timeout=2).status_code in (200, 503), 60,
                   f"{name} up", [proc], interval=0.5)
        return url



def wait_models(url: str, count: int, procs=()) -> None:
    wait_until(lambda: len(healthy_instances(url)) >= count, START_TIMEOUT, f"{count} worker(s) on {url}",
               procs, interval=1.0)


# ---------------------------------------------------------------------------------------------- (a)

def ask(url: str, kind: str, text: str, max_tokens: int, stream: bool = False) -> str:
    if kind == "chat":
        body = {"model": SERVED, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                "temperature": 0, "stream": stream}
        path = "/v1/chat/completions"
    else:
        body = {"model": SERVED, "prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
        path = "/v1/completions"
    if not stream:
        r = httpx.post(url + path, json=body, timeout=REQUEST_TIMEOUT)
        r.raise_for_status()
        choice = r.json()["choices"][0]
        return choice["message"]["content"] if kind == "chat" else choice["text"]
    parts = []
    with httpx.stream("POST", url + path, json=body, timeout=REQUEST_TIMEOUT) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or []
                if choices:
                    delta = choices[0].get("delta", {}).get("content") if kind == "chat" else choices[0].get("text")
                    parts.append(delta or "")
    return "".join(parts)


def answers(url: str, max_tokens: int, stream: bool = False) -> list[dict]:
    out = [{"kind": "chat", "prompt": p, "text": ask(url, "chat", p, max_tokens, stream)} for p in CHATS]
    out += [{"kind": "completion", "prompt": p, "text": ask(url, "completion", p, max_tokens, stream)}
            for p in COMPLETIONS]
    return out


def compare(reference: list[dict], other: list[dict]) -> dict:
    mismatches = [{"prompt": r["prompt"], "reference": r["text"], "other": o["text"]}
                  for r, o in zip(reference, other, strict=True) if r["text"] != o["text"]]
    return {"requests": len(reference), "equal": len(reference) - len(mismatches), "mismatches": mismatches}


# ---------------------------------------------------------------------------------------------- (d)

def trace_rows(args, offset: int) -> list[trace_replay.TraceRequest]:
    rows = trace_replay.scale_trace(trace_replay.load_trace(args.trace, args.trace_requests), args.block_tokens,
                                    args.time_scale, args.output_divisor, args.output_cap)
    return [dataclasses.replace(r, hash_ids=tuple(h + offset for h in r.hash_ids)) for r in rows]


def run_trace(url: str, args, offset: int) -> dict:
    rows = trace_rows(args, offset)
    prompts = trace_replay.PromptBuilder(args.block_tokens, 100, 49000)
    results = asyncio.run(trace_replay.replay(url, SERVED, rows, prompts, REQUEST_TIMEOUT))
    return trace_replay.summarize(results)


# ---------------------------------------------------------------------------------------------- parts

def small_model_flags(args, memory: float) -> list[str]:
    flags = ["--max-model-len", str(args.max_model_len), "--gpu-memory-utilization", str(memory),
             "--max-num-seqs", "64"]
    if args.eager:
        flags.append("--enforce-eager")
    return flags + args.engine_flag


def part_serve(args, run_dir: Path) -> dict:
    result: dict = {"model": args.model, "flags": small_model_flags(args, args.memory)}
    with Stack(run_dir, services=False) as bare:
        t0 = time.monotonic()
        url = bare.vllm_serve("vllm-serve", args.model, small_model_flags(args, args.memory))
        result["vllm_serve_start_s"] = round(time.monotonic() - t0, 1)
        reference = answers(url, args.max_tokens)
    print("vllm serve answered", flush=True)
    with Stack(run_dir) as stack:
        frontend = stack.frontend("frontend-kv", "--router-mode", "kv")
        t0 = time.monotonic()
        w1 = stack.worker("worker-1", args.model, small_model_flags(args, args.memory))
        wait_models(frontend, 1, [w1])
        result["worker_start_s"] = round(time.monotonic() - t0, 1)
        ours = answers(frontend, args.max_tokens)
        ours_stream = answers(frontend, args.max_tokens, stream=True)
        result["a"] = {"vs_vllm_serve": compare(reference, ours), "stream_vs_vllm_serve": compare(reference, ours_stream),
                       "samples": [{"prompt": r["prompt"], "text": r["text"]} for r in reference[:3]]}
        print(f"(a) {result['a']['vs_vllm_serve']['equal']}/{len(reference)} equal (non-streamed), "
              f"{result['a']['stream_vs_vllm_serve']['equal']}/{len(reference)} (streamed)", flush=True)
        if args.skip_router:
            return result
        w2 = stack.worker("worker-2", args.model, small_model_flags(args, args.memory))
        wait_models(frontend, 2, [w1, w2])
        rr = stack.frontend("frontend-rr", "--router-mode", "round-robin")
        wait_models(rr, 2, [w1, w2])
        rows = trace_rows(args, 0)
        d = {"requests": len(rows), "block_tokens": args.block_tokens, "time_scale": args.time_scale,
             "reuse_ceiling": trace_replay.reuse_ceiling(rows, args.block_tokens)}
        for index, (mode, url) in enumerate((("kv", frontend), ("round-robin", rr))):
            t0 = time.monotonic()
            d[mode] = run_trace(url, args, offset=(index + 1) * 10_000_000)
            d[mode]["wall_s"] = round(time.monotonic() - t0, 1)
            print(f"(d) {mode}: {d[mode]}", flush=True)
        result["d"] = d
    return result


def d2d_copy_gbps(n_bytes: int, repeats: int = 20) -> float:
    """Median bytes/s (GB/s) of a device-to-device copy of n_bytes (one read + one write per byte;
    counted once, as NIXL counts its transfers)."""
    import torch

    if not torch.cuda.is_available():
        import numpy as np

        src = np.ones(n_bytes, dtype=np.uint8)
        dst = np.empty_like(src)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            np.copyto(dst, src)
            times.append(time.perf_counter() - t0)
        return n_bytes / sorted(times)[len(times) // 2] / 1e9
    src = torch.randint(0, 255, (n_bytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return n_bytes / sorted(times)[len(times) // 2] / 1e9


def random_prompt(rng, n: int) -> list[int]:
    return [rng.randrange(100, 49000) for _ in range(n)]


def text_prompts(sizes: tuple[int, ...] = (300, 1200, 4000, 12000)) -> list[str]:
    """Real English of about 75 to 3000 tokens (this repository's docs, cut at a word), so greedy
    equality is judged where the top logits are not near-ties as they are on random token ids."""
    text = " ".join((REPO / name).read_text() for name in ("docs/architecture.md", "README.md", "docs/disaggregation.md"))
    return [text[:text.rfind(" ", 0, n)] for n in sizes if len(text) > n]


def complete_tokens(url: str, prompt: list[int], max_tokens: int) -> str:
    r = httpx.post(f"{url}/v1/completions", json={"model": SERVED, "prompt": prompt, "max_tokens": max_tokens,
                                                   "temperature": 0}, timeout=REQUEST_TIMEOUT)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def part_disagg(args, run_dir: Path) -> dict:
    import random

    rng = random.Random(1)
    result: dict = {"model": args.model, "flags": small_model_flags(args, args.memory)}
    with Stack(run_dir) as stack:
        disagg = stack.frontend("frontend-disagg", "--router-mode", "kv", "--disagg-min-prefill-tokens", "32")
        # The aggregated reference: a worker of its own (no connector) under another namespace, so its
        # prefix cache never holds KV the disaggregated requests put there (and the reverse).
        reference_ns = f"{stack.namespace}-agg"
        agg = stack.frontend("frontend-agg", namespace=reference_ns)
        reference = stack.worker("aggregated", args.model, small_model_flags(args, args.memory),
                                 namespace=reference_ns)
        wait_models(agg, 1, [reference])  # one engine starting at a time: vLLM sizes its KV cache from free memory
        flags = small_model_flags(args, args.memory) + ["--connector", "nixl"]
        t0 = time.monotonic()
        prefill = stack.worker("prefill", args.model, flags, "--is-prefill-worker")
        wait_until(lambda: any(i.get("role") == "prefill" for i in healthy_instances(disagg)), START_TIMEOUT,
                   "the prefill worker", [prefill], interval=1.0)
        decode = stack.worker("decode", args.model, flags)
        wait_until(lambda: any(i.get("role") == "decode" for i in healthy_instances(disagg))
                   and healthy_instances(agg), START_TIMEOUT, "the decode and aggregated workers",
                   [prefill, decode, reference], interval=1.0)
        result["workers_start_s"] = round(time.monotonic() - t0, 1)
        complete_tokens(disagg, random_prompt(rng, 200), 4)  # NIXL handshake, not measured
        # Greedy equality: each prompt to the disaggregated frontend, then to the aggregated reference.
        prompts: list = [random_prompt(rng, n) for n in (40, 100, 300, 1000, 3000)]
        prompts += [f"Question: {c}\nAnswer:" for c in CHATS[:4]]
        prompts += text_prompts()
        pairs = []
        for prompt in prompts:
            before = httpx.get(f"{disagg}/metrics", timeout=10).text
            d = complete_tokens(disagg, prompt, args.max_tokens)
            a = complete_tokens(agg, prompt, args.max_tokens)
            # The control: the same prompt again on the aggregated worker, now from its prefix cache, so
            # it too computes the last prompt position over KV it did not compute in the same pass, as
            # the decode worker does over transferred KV.
            a_cached = complete_tokens(agg, prompt, args.max_tokens)
            after = httpx.get(f"{disagg}/metrics", timeout=10).text
            remote = (metric_sum(after, "dynamo_lite_frontend_disagg_requests_total", reason="disaggregated")
                      - metric_sum(before, "dynamo_lite_frontend_disagg_requests_total", reason="disaggregated"))
            pairs.append({"prompt": "random ids" if isinstance(prompt, list) else prompt[:60],
                          "prompt_tokens": len(prompt) if isinstance(prompt, list) else None,
                          "disaggregated": bool(remote), "equal": a == d, "cached_equal": a == a_cached,
                          "agg": a, "disagg": d, "agg_cached": a_cached})
        result["b_equal"] = {"requests": len(pairs), "equal": sum(p["equal"] for p in pairs),
                             "disaggregated": sum(p["disaggregated"] for p in pairs),
                             "cached_equal": sum(p["cached_equal"] for p in pairs), "pairs": pairs}
        print(f"(b) greedy: {result['b_equal']['equal']}/{len(pairs)} equal, "
              f"{result['b_equal']['disaggregated']} prefilled remotely, aggregated from its own prefix cache "
              f"{result['b_equal']['cached_equal']}/{len(pairs)} equal to aggregated", flush=True)
        for p in pairs:
            print(f"    {p['prompt']!r}: disaggregated={p['disaggregated']} equal={p['equal']} "
                  f"cached_equal={p['cached_equal']}", flush=True)
        rows = []
        for n_tokens in args.transfer_tokens:
            for _ in range(args.transfer_repeats):
                before = httpx.get(f"{disagg}/metrics", timeout=10).text
                t0 = time.monotonic()
                complete_tokens(disagg, random_prompt(rng, n_tokens), 2)
                elapsed = time.monotonic() - t0
                time.sleep(0.2)
                after = httpx.get(f"{disagg}/metrics", timeout=10).text

                def delta(name: str, **labels: str) -> float:
                    return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

                row = {"tokens": n_tokens, "request_s": round(elapsed, 4),
                       "disaggregated": delta("dynamo_lite_frontend_disagg_requests_total", reason="disaggregated"),
                       "blocks": delta("dynamo_lite_frontend_kv_transfer_blocks_sum"),
                       "bytes": delta("dynamo_lite_frontend_kv_transfer_bytes_sum"),
                       "seconds": delta("dynamo_lite_frontend_kv_transfer_seconds_sum")}
                rows.append(row)
        for row in rows:
            if row["bytes"] > 0 and row["seconds"] > 0:
                row["gbps"] = row["bytes"] / row["seconds"] / 1e9
                row["d2d_gbps"] = d2d_copy_gbps(int(row["bytes"]))
            print(f"(b) transfer {row}", flush=True)
        result["b_transfer"] = rows
    return result


def part_perf(args, run_dir: Path) -> dict:
    flags = ["--load-format", "dummy", "--max-model-len", str(args.perf_max_model_len),
             "--gpu-memory-utilization", str(args.perf_memory), "--max-num-seqs", str(max(args.concurrency)),
             *args.engine_flag]
    if args.eager:
        flags.append("--enforce-eager")
    result: dict = {"model": args.perf_model, "flags": flags, "runs": {}}

    def measure(server: str, url: str) -> None:
        asyncio.run(run_load(url, SERVED, 4, 8, args.input_tokens, 16, seed=99))  # warm-up, not measured
        runs = []
        for concurrency in args.concurrency:
            requests = max(args.min_requests, args.waves * concurrency)
            run = asyncio.run(run_load(url, SERVED, concurrency, requests, args.input_tokens, args.output_tokens,
                                       seed=concurrency))
            runs.append(run)
            print(f"(c) {server}: {json.dumps(run)}", flush=True)
        result["runs"][server] = runs
        (run_dir.parent / "perf.json").write_text(json.dumps(result, indent=1))

    for server in args.servers:
        t0 = time.monotonic()
        if server == "vllm":
            with Stack(run_dir, services=False) as bare:
                url = bare.vllm_serve("perf-vllm-serve", args.perf_model, flags)
                result[f"{server}_start_s"] = round(time.monotonic() - t0, 1)
                measure(server, url)
        else:
            with Stack(run_dir) as stack:
                frontend = stack.frontend("perf-frontend")
                w = stack.worker("perf-worker", args.perf_model, flags)
                wait_models(frontend, 1, [w])
                result[f"{server}_start_s"] = round(time.monotonic() - t0, 1)
                measure(server, frontend)
    return result


# ---------------------------------------------------------------------------------------------- summary

def summarize(part: str, result: dict) -> None:
    print(f"\n===== {part} summary =====")
    if "a" in result:
        a = result["a"]
        print(f"(a) answers equal to vllm serve's: {a['vs_vllm_serve']['equal']}/{a['vs_vllm_serve']['requests']} "
              f"non-streamed, {a['stream_vs_vllm_serve']['equal']}/{a['stream_vs_vllm_serve']['requests']} streamed")
        for m in a["vs_vllm_serve"]["mismatches"][:3]:
            print(f"    differs: {m['prompt']!r}\n      vllm: {m['reference'][:120]!r}\n      ours: {m['other'][:120]!r}")
    if "d" in result:
        d = result["d"]
        print(f"(d) trace: {d['requests']} requests, {d['block_tokens']}-token blocks, timestamps / {d['time_scale']}, "
              f"reuse ceiling {d['reuse_ceiling']:.1%}")
        for mode in ("kv", "round-robin"):
            s = d[mode]
            print(f"    {mode:<12} ok {s['ok']}/{s['requests']}  cached {s['cached_fraction']:.1%}  TTFT p50 "
                  f"{s['ttft_p50_ms']:.1f} ms  p99 {s['ttft_p99_ms']:.1f} ms  {s['first_error'][:80]}")
    if "b_equal" in result:
        b = result["b_equal"]
        print(f"(b) greedy disaggregated == aggregated: {b['equal']}/{b['requests']} "
              f"({b['disaggregated']} prefilled remotely)")
        print(f"    {'tokens':>7}{'blocks':>7}{'MB':>9}{'ms':>9}{'GB/s':>8}{'d2d GB/s':>10}{'ratio':>7}")
        for r in result["b_transfer"]:
            if "gbps" in r:
                print(f"    {r['tokens']:>7}{int(r['blocks']):>7}{r['bytes'] / 1e6:>9.2f}{r['seconds'] * 1e3:>9.2f}"
                      f"{r['gbps']:>8.2f}{r['d2d_gbps']:>10.1f}{r['gbps'] / r['d2d_gbps']:>7.3f}")
            else:
                print(f"    {r['tokens']:>7}  no transfer attributed ({r})")
    if "runs" in result:
        print(f"(c) {result['model']}  flags {' '.join(result['flags'])}")
        print(f"    {'server':<8}{'conc':>5}{'ok':>6}{'tok/s':>9}{'TTFT p50':>10}{'p99':>8}{'TPOT p50':>10}{'p99':>7}")
        runs = result["runs"]
        for server, rows in runs.items():
            for r in rows:
                print(f"    {server:<8}{r['concurrency']:>5}{r['ok']:>6}{r['output_tok_per_s']:>9.0f}"
                      f"{r['ttft_p50_ms']:>10.1f}{r['ttft_p99_ms']:>8.1f}{r['tpot_p50_ms']:>10.2f}{r['tpot_p99_ms']:>7.2f}")
        if "vllm" in runs and "dynamo" in runs:
            for v, o in zip(runs["vllm"], runs["dynamo"]):
                print(f"    concurrency {v['concurrency']}: dynamo_lite / vllm serve throughput "
                      f"{o['output_tok_per_s'] / v['output_tok_per_s']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["serve", "disagg", "perf"])
    parser.add_argument("--out", type=Path, default=None, help="results and logs (default: a temp dir)")
    parser.add_argument("--model", default=os.environ.get("DYN_MODEL_PATH", str(
        Path.home() / ".cache/dynamo_lite/models/SmolLM2-135M-Instruct")))
    parser.add_argument("--memory", type=float, default=0.2, help="--gpu-memory-utilization per SmolLM2 engine")
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--max-tokens", type=int, default=48, help="(a), (b): tokens per answer")
    parser.add_argument("--eager", action="store_true", help="--enforce-eager on every engine")
    parser.add_argument("--engine-flag", action="append", default=[], help="extra vLLM flag for every engine")
    parser.add_argument("--skip-router", action="store_true", help="serve: only (a)")
    parser.add_argument("--trace", type=Path, default=TRACE)
    parser.add_argument("--trace-requests", type=int, default=500)
    parser.add_argument("--block-tokens", type=int, default=32)
    parser.add_argument("--time-scale", type=float, default=5.0)
    parser.add_argument("--output-divisor", type=float, default=8.0)
    parser.add_argument("--output-cap", type=int, default=64)
    parser.add_argument("--transfer-tokens", type=int, nargs="+", default=[256, 1024, 4096, 8000])
    parser.add_argument("--transfer-repeats", type=int, default=3)
    parser.add_argument("--perf-model", default=str(Path.home() / "models/llama-3.1-8b-shape"))
    parser.add_argument("--perf-memory", type=float, default=0.85)
    parser.add_argument("--perf-max-model-len", type=int, default=4096)
    parser.add_argument("--servers", default="vllm,dynamo", type=lambda s: s.split(","))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--waves", type=int, default=2, help="requests per concurrency level = waves x it")
    parser.add_argument("--min-requests", type=int, default=64)
    parser.add_argument("--input-tokens", type=int, default=1024)
    parser.add_argument("--output-tokens", type=int, default=128)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu_run_"))
    run_dir = out / "logs"
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"results and logs: {out}", flush=True)
    part = {"serve": part_serve, "disagg": part_disagg, "perf": part_perf}[args.part]
    t0 = time.monotonic()
    result = part(args, run_dir)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    (out / f"{args.part}.json").write_text(json.dumps(result, indent=1))
    summarize(args.part, result)


if __name__ == "__main__":
    main()
