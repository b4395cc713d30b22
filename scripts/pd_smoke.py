"""Standalone smoke test of vLLM prefill/decode disaggregation over NIXL on this CPU box.

Starts two vLLM AsyncLLM engines in two child processes (each pinned to its own core, each with
its own NIXL side-channel port), prefills prompts on one with `max_tokens=1` and
`kv_transfer_params={"do_remote_decode": True}`, hands the returned params to the other, and checks
that greedy output equals aggregated serving on the decode engine (prefix cache reset first).
Then it checks two abort paths: a decode request aborted before it pulls, and prefill blocks that
nobody pulls (freed by the prefill engine's KV lease).

    .venv/bin/python scripts/pd_smoke.py [--model DIR] [--max-tokens 24]

Exit status 0 only if every check passes. Engine logs are kept in a temp dir (printed).
Each engine re-pins its vLLM worker's main thread to its bound core after start (NIXL moves it to
the last core, see docs/disaggregation-notes.md); PD_SMOKE_REPIN=0 turns that off.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import secrets
import socket
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dynamo_lite.launch.supervisor import LaunchError, start_process, wait_until  # noqa: E402
from dynamo_lite.runtime.net import free_tcp_port  # noqa: E402
from dynamo_lite.runtime.models import default_model_path  # noqa: E402
from dynamo_lite.vllm.cpu_pinning import bound_cpus, restore_worker_affinity  # noqa: E402
from dynamo_lite.vllm.nixl_settings import kv_transfer_config, side_channel_env  # noqa: E402

DEFAULT_MODEL = Path(default_model_path())
KV_LEASE_SECONDS = 10  # short prefill-side lease so the "never pulled" check finishes quickly


# ----------------------------------------------------------------------------- child (engine)

class _ConnectorStatsLogger:
    """vLLM stat logger that keeps what the connector and scheduler report, for the parent."""

    def __init__(self, vllm_config, engine_index: int = 0):
        self.transfers: dict[str, list] = {}
        self.kv_cache_usage = 0.0

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        if scheduler_stats is None:
            return
        self.kv_cache_usage = scheduler_stats.kv_cache_usage
        data = (scheduler_stats.kv_connector_stats or {})
        for key, values in data.items():
            if isinstance(values, list):
                self.transfers.setdefault(key, []).extend(values)

    def log_engine_initialized(self):
        pass

    def log(self):
        pass

    def record_sleep_state(self, is_awake: int, level: int):
        pass

    def take(self) -> dict:
        taken, self.transfers = self.transfers, {}
        return {"transfers": taken, "kv_cache_usage": self.kv_cache_usage}


async def _engine_main(role: str, model: str, parent_port: int, token: str) -> None:
    from vllm import SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    stats = _ConnectorStatsLogger(None)
    lease = KV_LEASE_SECONDS if role == "prefill" else None
    transfer = KVTransferConfig(**kv_transfer_config("nixl", platform_is_cpu=True, kv_lease_duration=lease))
    args = AsyncEngineArgs(model=model, max_model_len=2048, kv_transfer_config=transfer,
                           disable_log_stats=False)
    engine = AsyncLLM.from_engine_args(args, stat_loggers=[lambda cfg, idx: stats])
    cpus = bound_cpus(os.environ.get("VLLM_CPU_OMP_THREADS_BIND", ""))
    if cpus and os.environ.get("PD_SMOKE_REPIN", "1") == "1":
        print(f"re-pinned worker main threads {restore_worker_affinity(os.getpid(), cpus)} to {cpus}", flush=True)
    cache = engine.vllm_config.cache_config
    sock = socket.create_connection(("127.0.0.1", parent_port), timeout=30)
    sock.setblocking(True)  # Connection does blocking reads on the raw fd
    conn = Connection(sock.detach())
    conn.send({"token": token, "role": role, "block_size": cache.block_size,
               "cache_dtype": str(cache.cache_dtype), "dtype": str(engine.vllm_config.model_config.dtype)})
    loop = asyncio.get_running_loop()
    # A thread of our own for the blocking recv: vLLM uses the loop's default executor too.
    reader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pd-smoke-recv")
    try:
        while True:
            cmd = await loop.run_in_executor(reader, conn.recv)
            cmd["recv_at"] = time.time()
            op = cmd["op"]
            if op == "shutdown":
                break
            if op == "generate":
                conn.send(await _generate(engine, cmd, SamplingParams, TokensPrompt, stats))
            elif op == "abort_after_submit":
                conn.send(await _abort_after_submit(engine, cmd, SamplingParams, TokensPrompt))
            elif op == "reset_prefix_cache":
                conn.send({"ok": await engine.reset_prefix_cache()})
            elif op == "stats":
                conn.send(stats.take())
    finally:
        engine.shutdown()
        conn.close()
        reader.shutdown(wait=False)


def _sampling(SamplingParams, cmd: dict):
    extra = {"kv_transfer_params": cmd["kv_transfer_params"]} if cmd.get("kv_transfer_params") else None
    # ignore_eos: compare exactly max_tokens greedy tokens even if the model stops early
    return SamplingParams(temperature=0.0, max_tokens=cmd["max_tokens"], ignore_eos=True, extra_args=extra)


async def _generate(engine, cmd, SamplingParams, TokensPrompt, stats) -> dict:
    start = time.perf_counter()
    first = None
    final = None
    prompt = TokensPrompt(prompt_token_ids=cmd["token_ids"])
    async for out in engine.generate(prompt, _sampling(SamplingParams, cmd), cmd["request_id"]):
        if first is None and out.outputs and out.outputs[0].token_ids:
            first = time.perf_counter()
        final = out
    end = time.perf_counter()
    return {"token_ids": list(final.outputs[0].token_ids), "finish_reason": final.outputs[0].finish_reason,
            "num_cached_tokens": final.num_cached_tokens, "kv_transfer_params": final.kv_transfer_params,
            "ttft": (first or end) - start, "total": end - start, "recv_at": cmd["recv_at"],
            "done_at": time.time(), **stats.take()}


async def _abort_after_submit(engine, cmd, SamplingParams, TokensPrompt) -> dict:
    """Submit a request and abort it after `delay` seconds (cancelling the generator aborts it)."""
    prompt = TokensPrompt(prompt_token_ids=cmd["token_ids"])

    async def consume() -> int:
        n = 0
        async for out in engine.generate(prompt, _sampling(SamplingParams, cmd), cmd["request_id"]):
            n = len(out.outputs[0].token_ids)
        return n

    task = asyncio.create_task(consume())
    await asyncio.sleep(cmd["delay"])
    task.cancel()
    try:
        n = await task
        return {"aborted": False, "tokens": n}
    except asyncio.CancelledError:
        return {"aborted": True}


# ----------------------------------------------------------------------------- parent (driver)

class EngineProc:
    """One engine child process and the connection to it."""

    def __init__(self, role: str, core: int, side_port: int, model: str, log_dir: Path, listen_port: int, token: str):
        self.role = role
        self.log_path = log_dir / f"{role}.log"
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=str(core), VLLM_CPU_KVCACHE_SPACE="1",
                   **side_channel_env("127.0.0.1", side_port))
        self.log_path.unlink(missing_ok=True)
        # Own session and log file; stop() kills the group: this child and its vLLM engine core.
        self.proc = start_process(role, [sys.executable, __file__, "--engine-child", role, "--model", model,
                                         "--parent-port", str(listen_port), "--token", token],
                                  self.log_path, env=env)
        self.conn: Connection | None = None
        self.info: dict = {}

    def call(self, cmd: dict, timeout: float) -> dict:
        assert self.conn is not None
        self.conn.send(cmd)
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.role}: no answer to {cmd['op']} within {timeout}s")
        return self.conn.recv()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the engine to shut down; whatever still runs after `timeout` s is stopped by the supervisor."""
        try:
            if self.conn is not None and self.proc.alive():
                self.conn.send({"op": "shutdown"})
            self.proc.popen.wait(timeout)
        except Exception:  # noqa: BLE001 - fall through to a hard stop of our own process group
            pass
        self.proc.stop(5)
        if self.conn is not None:
            self.conn.close()


def wait_for_model(model: Path, timeout: float) -> None:
    wait_until(lambda: (model / "config.json").exists() and (model / "model.safetensors").exists(), timeout,
               f"the model files in {model}", interval=5)


def accept_engines(server: socket.socket, engines: dict[str, EngineProc], token: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(e.conn is None for e in engines.values()):
        for e in engines.values():
            if not e.proc.alive():
                raise LaunchError(f"while waiting for the engines: {e.proc.describe_exit()}")
        server.settimeout(max(0.1, min(5.0, deadline - time.monotonic())))
        try:
            sock, _ = server.accept()
        except TimeoutError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"engines not ready within {timeout}s") from None
            continue
        sock.settimeout(None)
        conn = Connection(sock.detach())
        hello = conn.recv() if conn.poll(30) else {}
        if hello.get("token") != token:
            conn.close()
            continue
        engines[hello["role"]].conn, engines[hello["role"]].info = conn, hello


def make_prompts(model: Path) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    para = ("The history of the Roman Empire spans many centuries, from the founding of the city to the "
            "fall of Constantinople. Emperors, senators and soldiers shaped its laws, roads and cities. ")
    texts = ["What is the capital of France?",
             "Explain in simple words why the sky is blue during the day and red at sunset. " * 3,
             para * 40 + "Summarize the text above in one sentence."]
    prompts = [tok.encode(t).ids for t in texts]
    prompts[2] = prompts[2][-1000:]  # ~1000 tokens exactly
    return prompts


def kv_bytes_per_token(model: Path, cache_dtype: str, model_dtype: str) -> int:
    import json

    cfg = json.loads((model / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    dtype = model_dtype if cache_dtype == "auto" else cache_dtype
    elem = 4 if "float32" in dtype else 1 if "fp8" in dtype else 2
    return cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim * elem


def run_checks(p: EngineProc, d: EngineProc, model: Path, max_tokens: int) -> bool:
    block_size = p.info["block_size"]
    per_token = kv_bytes_per_token(model, p.info["cache_dtype"], p.info["dtype"])
    print(f"block_size={block_size} dtype={p.info['dtype']} cache_dtype={p.info['cache_dtype']} "
          f"kv bytes/token={per_token} (/block={per_token * block_size})")
    ok = True
    for i, ids in enumerate(make_prompts(model)):
        pre = p.call({"op": "generate", "token_ids": ids, "max_tokens": 1, "request_id": f"pre-{i}",
                      "kv_transfer_params": {"do_remote_decode": True}}, timeout=300)
        params = pre["kv_transfer_params"]
        if i == 0:
            print(f"prefill returned kv_transfer_params: {params}")
        dec = d.call({"op": "generate", "token_ids": ids, "max_tokens": max_tokens, "request_id": f"dec-{i}",
                      "kv_transfer_params": params}, timeout=300)
        d.call({"op": "reset_prefix_cache"}, timeout=60)
        agg = d.call({"op": "generate", "token_ids": ids, "max_tokens": max_tokens, "request_id": f"agg-{i}"},
                     timeout=300)
        blocks = sum(len(g) for g in params["remote_block_ids"])
        moved = sum(dec["transfers"].get("bytes_transferred", []))
        same = dec["token_ids"] == agg["token_ids"]
        ok &= same and moved > 0
        print(f"[{len(ids):4d} tok] prefill {pre['total']:.2f}s | decode TTFT remote {dec['ttft']:.2f}s "
              f"vs aggregated {agg['ttft']:.2f}s | total remote {dec['total']:.2f}s agg {agg['total']:.2f}s")
        print(f"           handoff P done -> D received: {dec['recv_at'] - pre['done_at']:.2f}s | "
              f"tokens compared={len(agg['token_ids'])}")
        print(f"           blocks={blocks} expected bytes={blocks * block_size * per_token} "
              f"NIXL bytes_transferred={moved} transfers={len(dec['transfers'].get('transfer_duration', []))} "
              f"xfer time={sum(dec['transfers'].get('transfer_duration', [])) * 1e3:.1f}ms "
              f"failed={sum(dec['transfers'].get('num_failed_transfers', []))} "
              f"D num_cached_tokens={dec['num_cached_tokens']} | greedy equal: {same}")
        if not same:
            print(f"           remote: {dec['token_ids']}\n           agg:    {agg['token_ids']}")
    ok &= check_aborts(p, d, make_prompts(model)[1])
    return ok


def check_aborts(p: EngineProc, d: EngineProc, ids: list[int]) -> bool:
    """Aborted-before-pull decode frees prefill blocks at once; unpulled blocks wait for the lease."""
    p.call({"op": "stats"}, timeout=30)
    ids = [7] + ids  # a prompt neither engine has cached
    pre = p.call({"op": "generate", "token_ids": ids, "max_tokens": 1, "request_id": "pre-abort",
                  "kv_transfer_params": {"do_remote_decode": True}}, timeout=300)
    res = d.call({"op": "abort_after_submit", "token_ids": ids, "max_tokens": 8, "request_id": "dec-abort",
                  "delay": 0.05, "kv_transfer_params": pre["kv_transfer_params"]}, timeout=60)
    pre2 = p.call({"op": "generate", "token_ids": [9] + ids, "max_tokens": 1, "request_id": "pre-unpulled",
                   "kv_transfer_params": {"do_remote_decode": True}}, timeout=300)
    time.sleep(KV_LEASE_SECONDS + 5)
    p.call({"op": "generate", "token_ids": ids[:20], "max_tokens": 1, "request_id": "tick"}, timeout=120)
    log = p.log_path.read_text(errors="replace")
    abort_id = pre["kv_transfer_params"]["remote_request_id"]
    unpulled_id = pre2["kv_transfer_params"]["remote_request_id"]
    abort_expired = f"request {abort_id} which" in log
    unpulled_expired = f"request {unpulled_id} which" in log
    after = d.call({"op": "generate", "token_ids": ids, "max_tokens": 4, "request_id": "dec-after"}, timeout=300)
    print(f"abort check: decode aborted={res.get('aborted')} | aborted-before-pull blocks expired by lease "
          f"(should be False: D notifies P)={abort_expired} | never-pulled blocks released by "
          f"{KV_LEASE_SECONDS}s lease={unpulled_expired} | D serves after abort: {len(after['token_ids']) == 4}")
    return (not abort_expired) and unpulled_expired and len(after["token_ids"]) == 4


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--engine-child", choices=["prefill", "decode"])
    ap.add_argument("--parent-port", type=int)
    ap.add_argument("--token")
    args = ap.parse_args()
    if args.engine_child:
        asyncio.run(_engine_main(args.engine_child, args.model, args.parent_port, args.token))
        return 0

    model = Path(args.model)
    wait_for_model(model, timeout=900)
    log_dir = Path(tempfile.mkdtemp(prefix="pd_smoke_"))
    print(f"logs: {log_dir}")
    token = secrets.token_hex(8)
    server = socket.create_server(("127.0.0.1", 0))
    listen_port = server.getsockname()[1]
    engines: dict[str, EngineProc] = {}
    try:
        t0 = time.perf_counter()
        engines["prefill"] = EngineProc("prefill", 0, free_tcp_port(), str(model), log_dir, listen_port, token)
        engines["decode"] = EngineProc("decode", 1, free_tcp_port(), str(model), log_dir, listen_port, token)
        accept_engines(server, engines, token, args.start_timeout)
        print(f"both engines ready in {time.perf_counter() - t0:.1f}s")
        ok = run_checks(engines["prefill"], engines["decode"], model, args.max_tokens)
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        for e in engines.values():
            e.stop()
        server.close()


if __name__ == "__main__":
    sys.exit(main())
