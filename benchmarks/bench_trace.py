"""Routing on a real trace: the Mooncake conversation trace through frontend + 4 mocker workers.

For each --router-mode (kv, round-robin, random) a fresh etcd, NATS, frontend and
`python -m dynamo_lite.mocker --num-workers 4` are started (so every mode starts with cold caches),
the scaled trace slice is replayed on its fixed schedule (benchmarks/trace_replay.py: streaming
/v1/completions with token-id prompts, hash id -> fixed block of token ids), and the figures are
printed as a table:

- cached fraction: sum(usage.prompt_tokens_details.cached_tokens) / sum(usage.prompt_tokens);
  "ceiling" is what one unbounded cache would hit (every reuse of an earlier prefix block);
- TTFT p50/p99: send -> first chunk with text, measured by the replay client.

Scaling (defaults): the first 1000 requests (330 s of trace); each 512-token block -> 64 tokens
(= 4 mocker blocks of 16), output lengths / 8 capped at 64 (ignore_eos, so exact), timestamps / 5
(~66 s of replay, ~15 req/s, mean prompt 1.7k tokens). Both systems' mockers run the same step-time
model (--timing, dynamo_lite/mocker/timing.py): `dynamo` (default) is Dynamo's mocker's own default
polynomials, which dynamo_lite's mocker reproduces with --timing dynamo; `native` is dynamo_lite's
(0.1 ms per prefill token + 5 ns per new x context token, 4 ms per decode step), handed to Dynamo as
profile data. At --speedup-ratio 2 an uncached mean prompt prefills in ~90 ms (native; the
"unloaded" column measures it), and uncached prefill alone would keep each of the 4 workers ~35%
busy, so queueing shows in TTFT and every cache hit shortens it. Timestamps / 10 with speedup 4 is the same
simulated load in half the time, but doubles the frontend's CPU load on a 2-core box.

    .venv/bin/python benchmarks/bench_trace.py --trace conversation_trace.jsonl \
        [--requests 1000 --block-tokens 64 --time-scale 5]

The trace is not in this repository: it is FAST25-release/traces/conversation_trace.jsonl of the
public Mooncake repository, kvcache-ai/Mooncake (see benchmarks/README.md). --trace may also come
from DYN_TRACE.

Optional, the same slice through other clients / NVIDIA Dynamo (nothing of Dynamo is in this repo):

    --aiperf /path/to/aiperf          also drive each dynamo_lite mode with aiperf
                                      (mooncake_trace dataset, --fixed-schedule); needs a tokenizer it
                                      can resolve: a fake HF hub cache is built from --model-path
    --dynamo-python /venv/bin/python  also run NVIDIA Dynamo (`python -m dynamo.frontend --router-mode kv`
                                      + `python -m dynamo.mocker --num-workers 4`, same block size and
                                      speedup) with the same replay client (and aiperf if given)

Dynamo 1.6.1 venv used for the reference figures: `pip install --no-deps ai-dynamo==1.6.1
ai-dynamo-runtime==1.6.1`, then ai-dynamo's listed requirements except aisimulate (and certifi
unpinned, pydantic==2.13.5).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.trace_replay import (PromptBuilder, load_trace, replay, reuse_ceiling,  # noqa: E402
                                     scale_trace, summarize, write_trace)
from dynamo_lite.mocker.config import MockerConfig, load_model_facts  # noqa: E402
from dynamo_lite.mocker.timing import StepTimeModel  # noqa: E402
from dynamo_lite.runtime.models import DEFAULT_SERVED_MODEL_NAME  # noqa: E402
from tests.e2e.harness import DEFAULT_MODEL_PATH, Proc, ProcGroup, wait_until  # noqa: E402
from tests.services import free_tcp_port, start_etcd, start_nats  # noqa: E402

TRACE_SOURCE = "FAST25-release/traces/conversation_trace.jsonl of the public repository kvcache-ai/Mooncake"
MODEL_NAME = DEFAULT_SERVED_MODEL_NAME  # served name; also what aiperf resolves as a tokenizer
NAMESPACE = "dynamo"  # Dynamo's default namespace; dynamo_lite uses the same
WARMUP_HASH_ID = -1  # no trace request starts with it: warm-up blocks are never shared


@dataclass
class Setup:
    """One system under test and its router mode."""

    label: str
    system: str  # "dynamo_lite" or "dynamo"
    router_mode: str


def start_dynamo_lite(group: ProcGroup, args, mode: str, port: int) -> list[Proc]:
    frontend = group.start("frontend", "dynamo_lite.frontend", "--http-host", "127.0.0.1", "--http-port",
                           str(port), "--namespace", NAMESPACE, "--router-mode", mode)
    mocker = group.start("mocker", "dynamo_lite.mocker", "--model-path", str(args.model_path),
                         "--served-model-name", MODEL_NAME, "--num-workers", str(args.workers),
                         "--block-size", str(args.mocker_block_size), "--num-gpu-blocks-override",
                         str(args.mocker_blocks), "--speedup-ratio", str(args.speedup_ratio), "--timing", args.timing,
                         "--context-length", str(args.context_length), "--namespace", NAMESPACE)
    return [frontend, mocker]


def start_dynamo(group: ProcGroup, args, mode: str, port: int) -> list[Proc]:
    py = args.dynamo_python
    timing = ["--planner-profile-data", str(args.dynamo_timing_file)] if args.dynamo_timing_file else []
    frontend = group.start_argv("dynamo-frontend", [
        py, "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port", str(port),
        "--router-mode", mode])
    mocker = group.start_argv("dynamo-mocker", [
        py, "-m", "dynamo.mocker", "--model-path", str(args.model_path), "--model-name", MODEL_NAME,
        "--num-workers", str(args.workers), "--block-size", str(args.mocker_block_size),
        "--num-gpu-blocks-override", str(args.mocker_blocks), "--speedup-ratio", str(args.speedup_ratio),
        *timing])
    return [frontend, mocker]


def write_dynamo_timing(path: Path, context_length: int) -> Path:
    """dynamo_lite's mocker timing model (mocker/timing.py) as Dynamo's mocker-format NPZ
    (--planner-profile-data): prefill TTFT by prompt length, decode ITL by (active KV tokens, context)."""
    import numpy as np  # only this optional mode needs it

    model = StepTimeModel()
    isl = np.linspace(1, context_length, 512)
    ttft_ms = (model.prefill_seconds_per_token * isl + model.prefill_seconds_per_attention * isl * isl) * 1e3
    kv_tokens = np.linspace(0, 16384 * 16, 128)
    context = np.linspace(1, context_length, 128)
    batch = np.maximum(1.0, kv_tokens[:, None] / context[None, :])
    itl_ms = (model.decode_seconds_per_step + model.decode_seconds_per_sequence * batch) * 1e3
    np.savez(path, prefill_isl=isl, prefill_ttft_ms=ttft_ms, decode_active_kv_tokens=kv_tokens,
             decode_context_length=context, decode_itl=itl_ms)
    return path


class BenchGroup(ProcGroup):
    """ProcGroup that can also start a non-`-m` argv (Dynamo's venv python)."""

    def start_argv(self, name: str, argv: list[str]) -> Proc:
        return self.supervisor.start(name, argv, cwd=self.run_dir)


def models_ready(base: str, workers: int, system: str) -> bool:
    """All workers registered: dynamo_lite lists instances on /health; Dynamo needs a probe request."""
    if system == "dynamo_lite":
        r = httpx.get(f"{base}/health", timeout=5)
        return r.status_code == 200 and len([i for i in r.json().get("instances", [])
                                             if i.get("model") == MODEL_NAME]) == workers
    r = httpx.get(f"{base}/v1/models", timeout=5)
    return r.status_code == 200 and any(m.get("id") == MODEL_NAME for m in r.json().get("data", []))


def warm_up(base: str, prompts: PromptBuilder) -> None:
    """One request with blocks no trace request shares: loads the tokenizer, opens connections."""
    body = {"model": MODEL_NAME, "prompt": prompts.block(WARMUP_HASH_ID), "max_tokens": 4, "ignore_eos": True}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    r.raise_for_status()


def unloaded_ttft_ms(base: str, prompts: PromptBuilder, blocks: int, samples: int = 5) -> float:
    """Median TTFT of sequential, uncached requests of `blocks` trace blocks (the no-queueing floor)."""
    ttfts = []
    with httpx.Client(timeout=60) as client:  # one client: building one costs more than a request
        for i in range(samples + 1):
            prompt = [t for b in range(blocks) for t in prompts.block(WARMUP_HASH_ID - 1 - i * blocks - b)]
            body = json.dumps({"model": MODEL_NAME, "prompt": prompt, "max_tokens": 2, "ignore_eos": True,
                               "stream": True}).encode()
            sent = time.monotonic()
            with client.stream("POST", f"{base}/v1/completions", content=body,
                               headers={"Content-Type": "application/json"}) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        if i:  # the first one opens the connection
                            ttfts.append(time.monotonic() - sent)
                        break
    return statistics.median(ttfts) * 1e3


def run_aiperf(args, base: str, trace_file: Path, out_dir: Path, hub_cache: Path) -> dict:
    """aiperf on the scaled trace, fixed schedule; returns its TTFT p50/p99 and cached fraction."""
    argv = [args.aiperf, "profile", "--model", MODEL_NAME, "--tokenizer", MODEL_NAME, "--url", base,
            "--endpoint-type", "completions", "--streaming", "--input-file", str(trace_file),
            "--custom-dataset-type", "mooncake_trace", "--isl-block-size", str(args.block_tokens),
            "--fixed-schedule", "--extra-inputs", "ignore_eos:true", "--output-artifact-dir", str(out_dir),
            "--ui-type", "none", "--random-seed", "0", "--use-legacy-max-tokens",
            "--use-server-token-count"]
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(out_dir.parent / f"{out_dir.name}.log", "wb") as log:
        subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.aiperf_timeout,
                       check=True)
    return parse_aiperf(out_dir)


def parse_aiperf(out_dir: Path) -> dict:
    """TTFT and usage totals from aiperf's summary (it sums the usage the server reports)."""
    summary = json.loads(next(out_dir.rglob("profile_export_aiperf.json")).read_text())

    def avg(name: str) -> float:
        return float((summary.get(name) or {}).get("avg", float("nan")))

    ttft = summary.get("time_to_first_token") or {}
    itl = summary.get("inter_token_latency") or {}
    prompt, cached = avg("total_usage_prompt_tokens"), avg("total_usage_prompt_cache_read_tokens")
    return {"ok": int(avg("request_count")), "prompt_tokens": prompt, "cached_tokens": cached,
            "cached_fraction": cached / prompt if prompt else float("nan"),
            "ttft_p50_ms": ttft.get("p50", float("nan")), "ttft_p99_ms": ttft.get("p99", float("nan")),
            "itl_p50_ms": itl.get("p50", float("nan")), "itl_p99_ms": itl.get("p99", float("nan")),
            "first_error": json.dumps(summary["error_summary"])[:300] if summary.get("error_summary") else ""}


def build_hub_cache(model_path: Path, root: Path) -> Path:
    """A fake HF hub cache holding the tokenizer files, so MODEL_NAME resolves offline in aiperf's workers."""
    repo = root / ("models--" + MODEL_NAME.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "special_tokens_map.json", "chat_template.jinja"):
        source = model_path / name
        if source.exists() and not (snapshot / name).exists():
            (snapshot / name).symlink_to(source)
    return root


def run_setup(setup: Setup, args, rows, prompts: PromptBuilder, trace_file: Path, run_dir: Path,
              hub_cache: Path | None) -> list[tuple[str, dict]]:
    """Start the system fresh, replay with our client (and aiperf, on a second fresh start)."""
    results = []
    clients = [c for c in args.clients.split(",") if c != "aiperf" or args.aiperf]
    for client in clients:
        tag = f"{setup.system}-{setup.router_mode}-{client}"
        with start_etcd() as etcd, start_nats() as nats:
            group = BenchGroup(run_dir / tag, {"ETCD_ENDPOINTS": etcd.url, "NATS_SERVER": nats.url,
                                               "DYN_LOG": "warning"})
            try:
                port = free_tcp_port()
                start = start_dynamo if setup.system == "dynamo" else start_dynamo_lite
                procs = start(group, args, setup.router_mode, port)
                base = f"http://127.0.0.1:{port}"
                wait_until(lambda: models_ready(base, args.workers, setup.system), 120,
                           f"{setup.label}: {args.workers} workers", procs, interval=0.5)
                if setup.system == "dynamo":
                    time.sleep(5)  # Dynamo lists the model on the first worker; let the others register
                warm_up(base, prompts)
                floor = unloaded_ttft_ms(base, prompts, round(mean_blocks(rows)))
                load_before = os.getloadavg()[0]
                began = time.monotonic()
                if client == "replay":
                    replies = asyncio.run(replay(base, MODEL_NAME, rows, prompts,
                                                 request_timeout=args.request_timeout))
                    write_results(replies, group.run_dir / "requests.jsonl")
                    summary = summarize(replies)
                else:
                    summary = run_aiperf(args, base, trace_file, group.run_dir / "aiperf", hub_cache)
                summary["wall_s"] = time.monotonic() - began
                summary["unloaded_ttft_ms"] = floor
                summary["load"] = max(load_before, os.getloadavg()[0])
                results.append((f"{setup.label} [{client}]", summary))
                print(f"{setup.label} [{client}]: {json.dumps(summary)}", flush=True)
            except Exception as e:  # noqa: BLE001 - one failed setup must not hide the others' figures
                print(f"{setup.label} [{client}] failed: {e}", flush=True)
                results.append((f"{setup.label} [{client}]", {"first_error": str(e)[:300]}))
            finally:
                group.stop()
    return results


def write_results(replies, path: Path) -> None:
    """Each replayed request's figures (trace order), to look into a tail after the run."""
    with open(path, "w", encoding="utf-8") as f:
        for r in replies:
            f.write(json.dumps({"ok": r.ok, "ttft": r.ttft, "prompt_tokens": r.prompt_tokens,
                                "cached_tokens": r.cached_tokens, "send_lag": r.send_lag,
                                "stages": r.stages, "error": r.error}) + "\n")


def mean_blocks(rows) -> float:
    return sum(len(r.hash_ids) for r in rows) / len(rows)


STAGE_COLUMNS = ("parse", "tokenize", "route", "queue", "worker_queue", "prefill", "first_token", "detokenize")


def print_stages(results: list[tuple[str, dict]]) -> None:
    """Mean ms per frontend stage of the requests at or above TTFT p99 (and below p50, for contrast)."""
    rows = [(label, which, r[key]) for label, r in results for which, key in (("p99+", "stages_p99"),
                                                                             ("<p50", "stages_p50")) if r.get(key)]
    if not rows:
        return
    print(f"\nstages (mean ms) of the requests with TTFT at or above p99, and below p50:")
    print(f"{'setup':<34}{'':>5}{'n':>4}{'prompt':>7}{'cached':>7}"
          + "".join(f"{name[:11]:>12}" for name in STAGE_COLUMNS) + f"{'TTFT':>8}")
    for label, which, stages in rows:
        print(f"{label:<34}{which:>5}{stages['requests']:>4}{stages['prompt_tokens']:>7.0f}"
              f"{stages['cached_tokens']:>7.0f}"
              + "".join(f"{stages.get(name, float('nan')):>12.1f}" for name in STAGE_COLUMNS)
              + f"{stages['ttft']:>8.0f}")


def print_table(results: list[tuple[str, dict]], ceiling: float) -> None:
    print(f"\n{'setup':<34}{'ok':>6}{'cached':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}"
          f"{'unloaded':>10}{'wall s':>8}{'load':>6}")
    for label, r in results:
        if "ttft_p50_ms" not in r:
            print(f"{label:<34}  failed: {r.get('first_error', '')}")
            continue
        print(f"{label:<34}{r.get('ok', 0):>6}{r['cached_fraction']:>8.1%}{r['ttft_p50_ms']:>8.0f}ms"
              f"{r['ttft_p99_ms']:>8.0f}ms{r.get('itl_p50_ms', float('nan')):>7.1f}ms"
              f"{r.get('itl_p99_ms', float('nan')):>7.1f}ms{r.get('unloaded_ttft_ms', float('nan')):>8.0f}ms"
              f"{r.get('wall_s', 0):>8.1f}{r.get('load', 0):>6.1f}")
        if r.get("first_error"):
            print(f"{'':<34}first error: {r['first_error']}")
    print(f"{'ceiling (one unbounded cache)':<34}{'':>6}{ceiling:>8.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    trace_env = os.environ.get("DYN_TRACE")
    parser.add_argument("--trace", type=Path, default=Path(trace_env) if trace_env else None,
                        required=not trace_env,
                        help=f"Mooncake trace (JSON lines), e.g. {TRACE_SOURCE} (env DYN_TRACE)")
    parser.add_argument("--requests", type=int, default=1000, help="first N requests of the trace")
    parser.add_argument("--block-tokens", type=int, default=64, help="tokens per trace block (trace: 512)")
    parser.add_argument("--time-scale", type=float, default=5.0, help="divide timestamps by this")
    parser.add_argument("--output-divisor", type=float, default=8.0, help="divide output lengths by this")
    parser.add_argument("--output-cap", type=int, default=64, help="then cap output lengths at this")
    parser.add_argument("--speedup-ratio", type=float, default=2.0, help="mocker --speedup-ratio")
    parser.add_argument("--mocker-block-size", type=int, default=16)
    parser.add_argument("--mocker-blocks", type=int, default=16384,
                        help="KV blocks per mocker worker, both systems (Dynamo's decode time reads the usage)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--context-length", type=int, default=32768,
                        help="mocker --context-length (scaled prompts reach ~15k tokens)")
    parser.add_argument("--modes", default="kv,round-robin,random",
                        help="dynamo_lite router modes ('' = none)")
    parser.add_argument("--clients", default="replay,aiperf",
                        help="which clients drive each setup (aiperf only when --aiperf is given)")
    parser.add_argument("--model-path", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--aiperf", help="aiperf executable: also measure each setup with aiperf")
    parser.add_argument("--aiperf-timeout", type=float, default=600.0)
    parser.add_argument("--dynamo-python", help="python of an ai-dynamo 1.6.1 venv: also run Dynamo")
    parser.add_argument("--dynamo-modes", default="kv")
    parser.add_argument("--timing", choices=["dynamo", "native"], default="dynamo",
                        help="step-time model of both systems' mockers: dynamo = Dynamo's default polynomials "
                             "(dynamo_lite's mocker --timing dynamo reproduces them; Dynamo runs its own), "
                             "native = dynamo_lite's model (Dynamo gets it as --planner-profile-data, which "
                             "prices prefill by new tokens only, so the two are close, not equal)")
    args = parser.parse_args()
    if not args.trace.is_file():
        parser.error(f"--trace {args.trace}: no such file (the trace is not in this repository; "
                     f"get {TRACE_SOURCE}, see benchmarks/README.md)")
    args.dynamo_timing_file = None

    rows = scale_trace(load_trace(args.trace, args.requests), args.block_tokens, args.time_scale,
                       args.output_divisor, args.output_cap)
    facts = load_model_facts(MockerConfig(model_path=str(args.model_path)))
    prompts = PromptBuilder(args.block_tokens, facts.first_token_id, facts.end_token_id)
    run_dir = Path(tempfile.mkdtemp(prefix="bench_trace_"))
    trace_file = run_dir / "scaled_trace.jsonl"
    write_trace(rows, trace_file)
    if args.dynamo_python and args.timing == "native":
        args.dynamo_timing_file = write_dynamo_timing(run_dir / "dynamo_lite_timing.npz", args.context_length)
    hub_cache = build_hub_cache(args.model_path.expanduser(), run_dir / "hub") if args.aiperf else None
    ceiling = reuse_ceiling(rows, args.block_tokens)
    print(f"{len(rows)} requests over {rows[-1].timestamp_ms / 1000:.1f} s, "
          f"{sum(r.input_length for r in rows)} prompt tokens, {sum(r.output_length for r in rows)} output "
          f"tokens; reuse ceiling {ceiling:.1%}; run dir {run_dir}", flush=True)

    setups = [Setup(f"dynamo_lite {mode}", "dynamo_lite", mode) for mode in args.modes.split(",") if mode]
    if args.dynamo_python:
        setups += [Setup(f"Dynamo 1.6.1 {mode}", "dynamo", mode) for mode in args.dynamo_modes.split(",")
                   if mode]
    results = []
    for setup in setups:
        results += run_setup(setup, args, rows, prompts, trace_file, run_dir, hub_cache)
    print(f"\n{len(rows)} requests, {args.block_tokens} tokens/block, timestamps / {args.time_scale:g}, "
          f"outputs / {args.output_divisor:g} (cap {args.output_cap}), "
          f"mocker block {args.mocker_block_size}, timing {args.timing}, "
          f"speedup {args.speedup_ratio:g}, {args.workers} workers")
    print_table(results, ceiling)
    print_stages(results)
    print(f"logs: {run_dir}")


if __name__ == "__main__":
    main()
