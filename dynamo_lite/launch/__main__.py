"""python -m dynamo_lite.launch TOPOLOGY [--no-frontend] [--timeout SECS] [--engine vllm|mocker] [--once]
                                  [-- EXTRA WORKER ARGS...]

Starts TOPOLOGY (agg, agg_router, disagg, disagg_router; run = agg plus one question), waits until the
frontend's /health lists its workers, and stays in the foreground. Ctrl-C or SIGTERM stops everything,
newest first (a second Ctrl-C kills what is left at once). Exits 1 when something fails to start or a
process exits, 130 / 143 after Ctrl-C / SIGTERM. Settings come from the environment (docs/configuration.md,
"Launch scripts"); --engine mocker starts simulated workers instead of vLLM (seconds, no engine needed).
"""

from __future__ import annotations

import os
import sys

from dynamo_lite.launch.foreground import run_foreground, say
from dynamo_lite.launch.settings import LaunchSettings
from dynamo_lite.launch.stack import ENGINES, Stack
from dynamo_lite.launch.supervisor import LaunchError, Supervisor
from dynamo_lite.launch.topologies import PRECHECKS, TOPOLOGIES, Options


class _Usage(Exception):
    pass


def parse(argv: list[str]) -> tuple[str, str, Options]:
    """The launch scripts' own argument style: options, then worker arguments after `--`."""
    if not argv or argv[0] in ("-h", "--help"):
        raise _Usage()
    name, rest = argv[0], argv[1:]
    if name not in TOPOLOGIES:
        raise LaunchError(f"unknown topology {name} (one of {', '.join(TOPOLOGIES)})")
    timeout, engine, frontend, once, worker_args = None, "vllm", True, False, ()
    while rest:
        arg = rest.pop(0)
        if arg == "--timeout" and rest:
            try:
                timeout = float(rest.pop(0))
            except ValueError:
                raise LaunchError("--timeout takes a number of seconds") from None
        elif arg == "--engine" and rest and rest[0] in ENGINES:
            engine = rest.pop(0)
        elif arg == "--no-frontend" and name == "agg":
            frontend = False
        elif arg == "--once" and name == "run":
            once = True
        elif arg == "--":
            worker_args, rest = tuple(rest), []
        elif arg in ("-h", "--help"):
            raise _Usage()
        else:
            raise LaunchError(f"unknown argument {arg} (worker arguments go after --)")
    return name, engine, Options(timeout, worker_args, frontend, once)


def main(argv: list[str]) -> int:
    try:
        name, engine, opts = parse(argv)
        settings = LaunchSettings.from_env(os.environ, sys.executable)
        PRECHECKS[name](settings)
    except _Usage:
        print(__doc__)
        return 0
    except LaunchError as e:
        say(f"error: {e}")
        return 1

    sup = Supervisor(settings.make_run_dir(name), stop_timeout=settings.stop_timeout, say=say,
                     die_with_parent=True)
    sup.env.update(MODEL_PATH=settings.model_path, SERVED_MODEL_NAME=settings.served_model_name,
                   VLLM_CPU_KVCACHE_SPACE=settings.kv_cache_space, RUN_DIR=str(sup.run_dir))

    def start() -> bool:
        say(f"run dir: {sup.run_dir}")
        TOPOLOGIES[name](Stack(settings, sup, ENGINES[engine]), opts)
        return not opts.once

    return run_foreground(sup, start)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
