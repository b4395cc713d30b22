"""`python -m dynamo_lite.serve [MODEL] [options] [vLLM engine args]`: the frontend and its workers in one
command (docs/serve.md). Everything it starts runs under the launch scripts' supervisor and stops on
Ctrl-C or SIGTERM; `--ask` and `--once` make it a smoke test (scripts/run.sh) and a start-up benchmark.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile

from dynamo_lite.launch.foreground import run_foreground, say
from dynamo_lite.launch.settings import LaunchSettings
from dynamo_lite.launch.stack import ENGINES, Stack, check_model
from dynamo_lite.launch.supervisor import LaunchError, Supervisor
from dynamo_lite.launch.topologies import ask
from dynamo_lite.serve.args import ServeArgs, parse_args
from dynamo_lite.serve.placement import available_cpus, place_engines, visible_gpus
from dynamo_lite.serve.start import ARGUMENT_ERROR_STATUS, EngineSpec, start_serve

DISCOVERY_DIR_ENV = "DYN_DISCOVERY_DIR"


def settings_for(args: ServeArgs, env: dict[str, str]) -> LaunchSettings:
    """The launch settings serve's command line means: the worker's own context length, and none of the
    launch scripts' WORKER_ARGS / FRONTEND_ARGS: serve's command line says everything."""
    base = LaunchSettings.from_env(env, sys.executable)
    return dataclasses.replace(
        base, model_path=args.model, served_model_name=args.served_model_name, http_port=args.port,
        http_host=args.host, max_model_len="", enforce_eager="", worker_args=(), frontend_args=(),
        runs_root=env.get("DL_RUNS_ROOT") or os.path.join(tempfile.gettempdir(), "dynamo_lite-runs"))


def summary(stack: Stack, args: ServeArgs, engines: list[EngineSpec]) -> str:
    if args.disaggregated:
        shape = f"{args.prefill_workers} prefill + {args.decode_workers} decode workers (NIXL)"
    else:
        shape = f"{args.workers} worker{'s' if args.workers > 1 else ''}"
    mode = next((args.frontend_args[i + 1] for i, a in enumerate(args.frontend_args[:-1])
                 if a == "--router-mode"), "round-robin")
    places = ", ".join(f"{e.name} {e.placement.describe()}" for e in engines)
    model = args.served_model_name
    if args.side_port:  # each worker's /live, /ready, /metrics (serve/side_ports.py)
        ports = ", ".join(f"{e.name} {args.side_port + i}" for i, e in enumerate(engines))
        places += f"\n  side ports: {ports}"
    return (f"Serving {model} at {stack.url}/v1\n"
            f"  {shape}, {mode} routing, engine {args.engine}: {places}\n"
            f"  logs in {stack.sup.run_dir}\n"
            f"  try: curl {stack.url}/v1/chat/completions -H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hi!\"}}]}}'")


def main(argv: list[str]) -> int:
    args = parse_args(argv)  # exits 2 with argparse's message for bad arguments
    env = dict(os.environ)
    settings = settings_for(args, env)
    names = args.engine_names()
    try:
        check_model(settings)
        placements = place_engines([n for n, _ in names], engine=args.engine, worker_args=args.worker_args,
                                   cpus=args.cpus or available_cpus(), gpus=visible_gpus(env))
    except LaunchError as e:  # nothing started yet: the command line cannot be served as given
        say(f"error: {e}")
        return ARGUMENT_ERROR_STATUS
    engines = [EngineSpec(name, role, p) for (name, role), p in zip(names, placements)]

    sup = Supervisor(settings.make_run_dir("serve"), stop_timeout=settings.stop_timeout, say=say,
                     die_with_parent=True)
    private_dir = None
    if DISCOVERY_DIR_ENV not in env:  # one private directory: two serve runs never see each other
        private_dir = tempfile.mkdtemp(prefix="dynamo_lite-serve-")
        sup.env[DISCOVERY_DIR_ENV] = private_dir
    sup.env.setdefault("VLLM_CPU_KVCACHE_SPACE", settings.kv_cache_space)
    stack = Stack(settings, sup, ENGINES[args.engine])

    def start() -> bool:
        start_serve(stack, args, engines)
        print(summary(stack, args, engines), flush=True)
        if args.ask:
            answer = ask(stack.url, args.served_model_name, args.ask, sup.run_dir / "answer.json",
                         args.api_key, context=stack.client_context)
            print(f"\nQ: {args.ask}\nA: {answer}\n", flush=True)
        if args.once:
            say("--once: stopping everything")
        return not args.once

    try:
        return run_foreground(sup, start)
    finally:
        if private_dir is not None:
            shutil.rmtree(private_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
