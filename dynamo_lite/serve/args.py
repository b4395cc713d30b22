"""`python -m dynamo_lite.serve` arguments: serve's own options, the frontend's options it passes on, and
everything else, which goes to every worker (vLLM's engine arguments, or the mocker's).

The model comes first (`serve MODEL ...`, as `vllm serve MODEL`) or as `--model MODEL`; with neither,
the default model folder. It is picked out before argparse runs: argparse would otherwise take the value
of an unknown worker flag (`--max-model-len 2048`) for the positional model.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

from dynamo_lite.frontend.config import FrontendConfig
from dynamo_lite.launch.stack import ENGINES
from dynamo_lite.planes import SECURITY_FIELDS
from dynamo_lite.presets import PRESET_HELP, Preset, fill_in, get_preset, local_model_path, pop_preset
from dynamo_lite.protocol.errors import ConfigError
from dynamo_lite.runtime.config import add_config_arguments, config_from_args, env_name, flag_name, parse_list
from dynamo_lite.runtime.models import (
    DEFAULT_MODEL_PATH,
    DEFAULT_SERVED_MODEL_NAME,
    default_model_path,
    refuse_hub_id,
)
from dynamo_lite.serve.placement import parse_cpu_list
from dynamo_lite.serve.side_ports import check_room, pop_side_port

PROG = "python -m dynamo_lite.serve"
# Frontend options serve sets itself (--host/--port, the planes, the namespace it gives every process).
_NOT_PASSED = {"http_host", "http_port", "etcd_endpoints", "nats_server", "namespace"}
API_KEY_ENV = env_name(next(f for f in dataclasses.fields(FrontendConfig) if f.name == "api_key"))


@dataclass(frozen=True)
class ServeArgs:
    model: str                   # model folder
    served_model_names: tuple[str, ...]  # what clients put in "model" (the first is the name printed)
    engine: str                  # "vllm" | "mocker"
    workers: int                 # aggregated engines (0 when disaggregated)
    prefill_workers: int
    decode_workers: int
    host: str
    port: int | None             # None: 8000, or a free port when 8000 is busy
    namespace: str | None        # None: the components' default
    cpus: tuple[int, ...] | None  # None: every core this process may use
    startup_timeout: float
    ask: str | None              # a question to ask once ready
    api_key: str | None          # the frontend's first API key (--api-key, else DYN_API_KEY): --ask sends it
    once: bool                   # stop once ready (and answered)
    frontend_args: tuple[str, ...]
    worker_args: tuple[str, ...]  # without --metrics-endpoint-port: side_port holds it
    side_port: int | None = None  # the first worker's side port, the next get +1 each (serve/side_ports.py)

    @property
    def served_model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def disaggregated(self) -> bool:
        return self.prefill_workers > 0

    def engine_names(self) -> list[tuple[str, str]]:
        """(process name, role) of every engine, in start order: prefill before decode."""
        if self.disaggregated:
            return [(f"prefill{i}", "prefill") for i in range(self.prefill_workers)] + \
                   [(f"decode{i}", "decode") for i in range(self.decode_workers)]
        return [(f"worker{i}", "agg") for i in range(self.workers)]


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum} (got {value})")
        return value
    return parse


def _port(text: str) -> int:
    port = _count(1)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {port}")
    return port


def _cpus(text: str) -> tuple[int, ...]:
    try:
        return parse_cpu_list(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a CPU list like 0-3,6: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,  # a worker flag must never be taken for a prefix of one of ours
        usage=f"{PROG} [MODEL] [options] [worker (vLLM engine) args ...]",
        description="Frontend and workers in one command: a replacement for `vllm serve`. Arguments that are "
                    "not listed here go to every worker (vLLM's engine arguments with --engine vllm).",
        epilog="Exit status: 0 after --help, 2 for bad arguments (serve's, or ones a worker refused), 1 when "
               "something fails to start or a process exits, 130 / 143 after Ctrl-C / SIGTERM. "
               "Docs: docs/serve.md.")
    parser.add_argument("--model", dest="model_flag", metavar="MODEL", default=None,
                        help="The model folder (instead of the first argument; default: the default model, "
                             "served as " + DEFAULT_SERVED_MODEL_NAME + ").")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="Names clients use (default: MODEL as given); goes to every worker.")
    parser.add_argument("--preset", metavar="NAME", default=None, help=PRESET_HELP + " Its vLLM flags go to "
                        "every worker, its parsers and thresholds to the frontend.")
    topo = parser.add_argument_group("topology")
    topo.add_argument("--engine", choices=list(ENGINES), default="vllm",
                      help="vllm, or mocker: simulated engines (no weights, starts in seconds).")
    topo.add_argument("--workers", type=_count(1), default=None,
                      help="Aggregated workers (default 1); with more than one the frontend routes by KV "
                           "cache (--router-mode kv).")
    topo.add_argument("--prefill-workers", type=_count(1), default=None,
                      help="Disaggregated serving: prefill workers (with --decode-workers).")
    topo.add_argument("--decode-workers", type=_count(1), default=None,
                      help="Disaggregated serving: decode workers, which pull the prefilled KV cache "
                           "over NIXL.")
    topo.add_argument("--cpus", type=_cpus, default=None, metavar="LIST",
                      help="CPU cores split among the engines, e.g. 0-3 (default: every core this process "
                           "may use). Each engine gets its own; cores left over run the frontend.")
    topo.add_argument("--startup-timeout", type=float, default=900.0, metavar="SECS",
                      help="How long the engines may take to load (default 900).")
    topo.add_argument("--namespace", default=None,
                      help="Discovery namespace of the frontend and every worker (default: the components' "
                           "default).")
    check = parser.add_argument_group("smoke test")
    check.add_argument("--ask", metavar="QUESTION", default=None,
                       help="Once every engine serves, send QUESTION as one chat request and print the "
                            "answer.")
    check.add_argument("--once", action="store_true",
                       help="Stop everything once every engine serves (after --ask's answer) and exit 0.")
    front = parser.add_argument_group("frontend")
    front.add_argument("--host", default="0.0.0.0", help="Address the frontend binds to (default 0.0.0.0).")
    front.add_argument("--port", type=_port, default=None,
                       help="Port of the frontend (default 8000, or a free port when 8000 is in use).")
    front.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="Accepted for `vllm serve` command lines; tool_choice 'auto' needs only "
                            "--tool-call-parser here.")
    add_config_arguments(parser, FrontendConfig, "frontend options passed on (python -m dynamo_lite.frontend "
                         "--help)", exclude=_NOT_PASSED, given_only=True)
    return parser


def split_model(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """The leading MODEL argument, if the first argument is not an option, and the rest."""
    if argv and not argv[0].startswith("-"):
        return argv[0], list(argv[1:])
    return None, list(argv)


def frontend_argv(ns: argparse.Namespace) -> tuple[str, ...]:
    """The passed-on frontend options that were given, as frontend arguments again."""
    out: list[str] = []
    for field in dataclasses.fields(FrontendConfig):
        if field.name in _NOT_PASSED or not hasattr(ns, field.name):
            continue
        value, flag, kind = getattr(ns, field.name), flag_name(field), str(field.type)
        if kind.startswith("bool"):
            out.append(flag if value else "--no-" + flag[2:])
        elif kind.startswith("tuple"):
            if value:  # an empty list is the frontend's default: nothing to pass
                out += [flag, *value]
        else:
            out += [flag, str(value)]
    return tuple(out)


def security_argv(ns: argparse.Namespace) -> list[str]:
    """The planes' security options given to serve (planes.SECURITY_FIELDS), as worker arguments."""
    out: list[str] = []
    for field in dataclasses.fields(FrontendConfig):
        if field.name in SECURITY_FIELDS and hasattr(ns, field.name):
            out += [flag_name(field), str(getattr(ns, field.name))]
    return out


def _first_api_key(ns: argparse.Namespace) -> str | None:
    keys = getattr(ns, "api_key", None)
    if keys is None and os.environ.get(API_KEY_ENV):
        keys = parse_list(os.environ[API_KEY_ENV])
    return keys[0] if keys else None


def _preset(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Preset | None:
    """The --preset (or $DYN_PRESET) of serve's own arguments; argparse's error for an unknown one."""
    try:
        name, _ = pop_preset(argv, os.environ)
        return get_preset(name) if name else None
    except ConfigError as e:
        parser.error(e.message)


def parse_args(argv: Sequence[str]) -> ServeArgs:
    """ServeArgs from the command line; argparse's usage error (exit status 2) for bad arguments."""
    parser = build_parser()
    argv = list(argv)
    # Arguments after a `--` go to the workers untouched (as the launch scripts take them).
    after = argv[argv.index("--") + 1:] if "--" in argv else []
    model, rest = split_model(argv[:len(argv) - len(after) - 1] if "--" in argv else argv)
    preset = _preset(parser, rest)
    if preset is not None:
        rest = fill_in(pop_preset(rest, {})[1], preset.frontend_flags())
    ns, worker_args = parser.parse_known_args(rest)
    worker_args += after
    if preset is not None:  # explicit worker flags, given here or after `--`, win
        flags = preset.vllm_flags() if ns.engine == "vllm" else preset.mocker_flags()
        worker_args = fill_in(worker_args, flags)
    if ns.model_flag is not None:
        if model is not None:
            parser.error(f"the model is given twice: {model} and --model {ns.model_flag}")
        model = ns.model_flag
    if model is None and preset is not None:
        try:
            model = local_model_path(preset, os.environ)
        except ConfigError as e:
            parser.error(e.message)
        names = [preset.model]
    elif model is None:  # the prepared default model is served under its hub name; a $DYN_MODEL_PATH as given
        model = default_model_path()
        names = [DEFAULT_SERVED_MODEL_NAME if model == DEFAULT_MODEL_PATH else model]
    else:
        names = [model]
        try:
            refuse_hub_id(model, "MODEL")
        except ConfigError as e:
            parser.error(e.message)
    if ns.served_model_name:
        names = ns.served_model_name

    disagg = ns.prefill_workers is not None or ns.decode_workers is not None
    if disagg and ns.workers is not None:
        parser.error("--workers (aggregated) and --prefill-workers/--decode-workers (disaggregated) exclude "
                     "each other")
    if disagg and (ns.prefill_workers is None or ns.decode_workers is None):
        parser.error("disaggregated serving needs both --prefill-workers and --decode-workers")
    workers = 0 if disagg else (ns.workers or 1)
    prefill, decode = (ns.prefill_workers, ns.decode_workers) if disagg else (0, 0)

    try:  # one side port per worker process (serve/side_ports.py)
        side_port, worker_args = pop_side_port(worker_args, os.environ)
        check_room(side_port or 0, workers + prefill + decode)
    except ValueError as e:
        parser.error(str(e))

    frontend = frontend_argv(ns)
    worker_args += security_argv(ns)  # the planes' credentials are every component's, not the frontend's
    try:  # the frontend's own checks (parser names, ranges), before anything starts
        config_from_args(FrontendConfig, ns)
    except ConfigError as e:
        parser.error(e.message)
    if not hasattr(ns, "router_mode") and max(workers, prefill, decode) > 1:
        frontend = ("--router-mode", "kv", *frontend)
    return ServeArgs(model=model, served_model_names=tuple(names), engine=ns.engine, workers=workers,
                     prefill_workers=prefill, decode_workers=decode, host=ns.host, port=ns.port,
                     namespace=ns.namespace, cpus=ns.cpus, startup_timeout=ns.startup_timeout,
                     ask=ns.ask, once=ns.once, api_key=_first_api_key(ns),
                     frontend_args=frontend, worker_args=tuple(worker_args), side_port=side_port)
