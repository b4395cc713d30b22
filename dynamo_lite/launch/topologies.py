"""What each launch script starts (launch/*.sh and scripts/run.sh are thin wrappers around these).

Each topology starts its processes on a Stack, waits until the frontend's /health lists the workers
it expects, and returns; the caller then watches the processes until one exits or a signal comes.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dynamo_lite.launch.settings import LaunchSettings
from dynamo_lite.launch.stack import Stack, check_model
from dynamo_lite.launch.supervisor import LaunchError


@dataclass(frozen=True)
class Options:
    timeout: float | None     # None: the topology's default
    worker_args: tuple[str, ...]
    frontend: bool = True     # agg only: --no-frontend starts the worker alone (a second node)
    once: bool = False        # run only: stop after the answer

    def wait(self, default: float) -> float:
        """How long to wait for the workers: --timeout, else the topology's default."""
        return default if self.timeout is None else self.timeout


def agg(stack: Stack, opts: Options) -> None:
    """etcd, NATS, the frontend and one worker that runs both prefill and decode."""
    s = stack.settings
    stack.start_etcd()
    stack.start_nats()
    if opts.frontend:
        stack.pick_http_port()
        stack.start_frontend()
    stack.start_worker("worker", s.omp_bind, "agg", opts.worker_args)
    if opts.frontend:
        timeout = opts.wait(600)
        stack.say(f"waiting (up to {timeout:g}s) for the worker to serve {s.served_model_name}; "
                  f"log: {stack.sup.run_dir}/worker.log")
        stack.wait_health({None: 1}, timeout)
        stack.say(f"ready: {stack.url}/v1  (model {s.served_model_name})")


def agg_router(stack: Stack, opts: Options) -> None:
    """A kv-mode frontend and two workers, each pinned to its own core (0 and 1)."""
    s = stack.settings
    stack.start_etcd()
    stack.start_nats()
    stack.pick_http_port()
    stack.start_frontend("--router-mode", "kv")
    stack.start_worker("worker0", "0", "agg", opts.worker_args)
    stack.start_worker("worker1", "1", "agg", opts.worker_args)
    timeout = opts.wait(600)
    stack.say(f"waiting (up to {timeout:g}s) for both workers to serve {s.served_model_name}; "
              f"logs: {stack.sup.run_dir}/worker{{0,1}}.log")
    stack.wait_health({None: 2}, timeout)
    stack.say(f"ready: {stack.url}/v1  (model {s.served_model_name}, kv routing over 2 workers)")


def disagg(stack: Stack, opts: Options) -> None:
    """The frontend, one prefill worker (PREFILL_CPUS) and one decode worker (DECODE_CPUS) over NIXL."""
    s = stack.settings
    stack.start_etcd()
    stack.start_nats()
    stack.pick_http_port()
    stack.start_frontend()
    stack.start_worker("prefill", s.prefill_cpus, "prefill", opts.worker_args)
    stack.start_worker("decode", s.decode_cpus, "decode", opts.worker_args)
    timeout = opts.wait(600)
    stack.say(f"waiting (up to {timeout:g}s) for the prefill and decode workers; "
              f"logs: {stack.sup.run_dir}/{{prefill,decode}}.log")
    stack.wait_health({"prefill": 1, "decode": 1}, timeout)
    stack.say(f"ready: {stack.url}/v1  (model {s.served_model_name}, 1 prefill + 1 decode worker)")


def disagg_router(stack: Stack, opts: Options) -> None:
    """A kv-mode frontend, PREFILL_WORKERS prefill and DECODE_WORKERS decode workers pinned round-robin."""
    s = stack.settings
    prefill, decode, cores = pool_sizes(s)
    if prefill + decode > cores:
        stack.say(f"warning: {prefill} prefill + {decode} decode engines on {cores} cores: some share a core and "
                  "slow each other down (on CPU engines, use at most one engine per core)")
    stack.start_etcd()
    stack.start_nats()
    stack.pick_http_port()
    stack.start_frontend("--router-mode", "kv")
    core = 0
    for role, count in (("prefill", prefill), ("decode", decode)):
        for i in range(count):
            stack.start_worker(f"{role}{i}", str(core % cores), role, opts.worker_args)
            core += 1
    timeout = opts.wait(900)
    stack.say(f"waiting (up to {timeout:g}s) for {prefill} prefill + {decode} decode workers")
    stack.wait_health({"prefill": prefill, "decode": decode}, timeout)
    stack.say(f"ready: {stack.url}/v1  (model {s.served_model_name}, kv-routed prefill pool of {prefill}, "
              f"decode pool of {decode})")


def dep(stack: Stack, opts: Options) -> None:
    """A kv-mode frontend and one worker with DP_SIZE data-parallel ranks (one instance; the router picks
    the rank of each request), rank r's engine core pinned to core r (modulo CPU_COUNT)."""
    s = stack.settings
    ranks, cores = dp_size(s)
    if ranks > cores:
        stack.say(f"warning: {ranks} data-parallel ranks on {cores} cores: some share a core and slow each "
                  "other down (on CPU engines, use at most one rank per core)")
    stack.start_etcd()
    stack.start_nats()
    stack.pick_http_port()
    stack.start_frontend("--router-mode", "kv")
    # vLLM's CPU build reads one "|"-separated core list per data-parallel rank.
    bind = "|".join(str(rank % cores) for rank in range(ranks))
    stack.start_worker("worker", bind, "agg", ("--data-parallel-size", str(ranks), *opts.worker_args))
    timeout = opts.wait(600)
    stack.say(f"waiting (up to {timeout:g}s) for the worker's {ranks} ranks to serve {s.served_model_name}; "
              f"log: {stack.sup.run_dir}/worker.log")
    stack.wait_health({None: 1}, timeout)
    stack.say(f"ready: {stack.url}/v1  (model {s.served_model_name}, kv routing over {ranks} "
              "data-parallel ranks)")


def dp_size(settings: LaunchSettings) -> tuple[int, int]:
    """DP_SIZE and CPU_COUNT, checked."""
    if not settings.dp_size.isdigit() or int(settings.dp_size) < 1:
        raise LaunchError(f"DP_SIZE must be a whole number >= 1 (got {settings.dp_size!r})")
    if not settings.cpu_count.isdigit() or int(settings.cpu_count) < 1:
        raise LaunchError("CPU_COUNT must be >= 1")
    return int(settings.dp_size), int(settings.cpu_count)


def pool_sizes(settings: LaunchSettings) -> tuple[int, int, int]:
    """PREFILL_WORKERS, DECODE_WORKERS and CPU_COUNT, checked."""
    prefill, decode, cpu_count = settings.prefill_workers, settings.decode_workers, settings.cpu_count
    if not (prefill.isdigit() and decode.isdigit() and int(decode) >= 1):
        raise LaunchError(f"PREFILL_WORKERS must be >= 0 and DECODE_WORKERS >= 1 (got {prefill} / {decode})")
    if not cpu_count.isdigit() or int(cpu_count) < 1:
        raise LaunchError("CPU_COUNT must be >= 1")
    return int(prefill), int(decode), int(cpu_count)


QUESTION = "What is the capital of France?"


def run(stack: Stack, opts: Options) -> None:
    """scripts/run.sh: agg, then one question with the answer printed, then the stack's addresses."""
    agg(stack, opts)
    s, url = stack.settings, stack.url
    stack.say(f"POST {url}/v1/chat/completions: {QUESTION}")
    try:
        answer = ask(url, s.served_model_name, QUESTION, stack.sup.run_dir / "answer.json",
                     context=stack.client_context)
    except LaunchError:
        stack.show_logs("frontend", "worker")
        raise
    print(f"\nQ: {QUESTION}\nA: {answer}\n", flush=True)
    if opts.once:
        stack.say("--once: stopping everything")
        return
    print(f"""The stack is up (logs in {stack.sup.run_dir}):
  OpenAI API   {url}/v1   (model "{s.served_model_name}")
  health       {url}/health (200 once a worker serves a model)   metrics {url}/metrics
  try it       curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
                 -d '{{"model": "{s.served_model_name}", "messages": [{{"role": "user", "content": "Hi!"}}]}}'
Stop it: press Ctrl-C here (or run: kill {os.getpid()}). Everything started by this script stops with it.""",
          flush=True)


def ask(url: str, model: str, question: str, reply_file: Path, api_key: str | None = None,
        context: ssl.SSLContext | None = None) -> str:
    """One greedy chat completion (sent with `api_key` as its bearer token when given; an https:// `url`
    verified with `context`); the reply is kept in `reply_file`. LaunchError unless it has text."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}],
                       "max_tokens": 48, "temperature": 0}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120, context=context) as resp:
            code, reply = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        code, reply = e.code, e.read()
    except OSError as e:
        code, reply = 0, str(e).encode()
    reply_file.write_bytes(reply)
    text = reply.decode(errors="replace")
    if code != 200:
        raise LaunchError(f"the request failed with HTTP {code:03d}: {text}")
    try:
        answer = json.loads(reply)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise LaunchError(f"unexpected reply: {text}") from None
    if not (answer or "").strip():
        raise LaunchError(f"the model returned an empty answer: {text}")
    return answer


TOPOLOGIES: dict[str, Callable[[Stack, Options], None]] = {
    "agg": agg, "agg_router": agg_router, "disagg": disagg, "disagg_router": disagg_router, "run": run,
    "dep": dep,
}

# What each topology checks before anything starts (so a mistake leaves no run dir and no process).
PRECHECKS: dict[str, Callable[[LaunchSettings], object]] = {
    "agg": check_model, "agg_router": check_model, "disagg": check_model, "run": check_model,
    "disagg_router": lambda s: (pool_sizes(s), check_model(s)),
    "dep": lambda s: (dp_size(s), check_model(s)),
}
