"""What `serve` starts, on the launch scripts' Stack: the planes it needs, one worker per engine on its
own cores or GPUs, the frontend, then a wait with the progress display until every engine serves.

Planes: serve passes no plane options. With no ETCD_ENDPOINTS / NATS_SERVER exported the components use
the embedded planes, which need no server; a checkout that does not have them yet (planes.py's
`file://` discovery scheme and `embedded://` event plane, and their modules) gets a private etcd and/or
NATS on free ports instead, so that the command works either way and two `serve` runs never see each other.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dynamo_lite import planes
from dynamo_lite.launch.stack import Stack
from dynamo_lite.launch.supervisor import LaunchError, Process
from dynamo_lite.protocol.errors import ConfigError
from dynamo_lite.serve.args import ServeArgs
from dynamo_lite.serve.placement import Placement
from dynamo_lite.serve.progress import Progress

ARGUMENT_ERROR_STATUS = 2  # argparse's exit status: how a worker refuses its arguments


class WorkerArgumentsError(LaunchError):
    """A worker exited with status 2 while starting: it refused its arguments. serve exits 2 as well."""

    exit_status = ARGUMENT_ERROR_STATUS


EMBEDDED_DISCOVERY = ("file:///", "dynamo_lite.discovery.embedded")  # (url planes.py takes, module)
EMBEDDED_EVENTS = ("embedded://", "dynamo_lite.events.embedded")


def _available(check: Callable[[str], None], url: str, module: str) -> bool:
    # Both: planes.py may know a scheme before its implementation exists (a placeholder that refuses
    # to connect), and a module alone is not reachable by the components.
    try:
        check(url)
    except ConfigError:
        return False
    return importlib.util.find_spec(module) is not None


def embedded_planes() -> tuple[bool, bool]:
    """(embedded discovery, embedded event plane): which of the two this checkout has."""
    return (_available(planes.check_discovery_url, *EMBEDDED_DISCOVERY),
            _available(planes.check_event_bus_url, *EMBEDDED_EVENTS))


def start_planes(stack: Stack) -> None:
    """etcd and/or NATS, each only when its embedded twin is missing (exported ETCD_ENDPOINTS /
    NATS_SERVER are used as they are)."""
    discovery, events = embedded_planes()
    if not discovery:
        stack.start_etcd()
    if not events:
        stack.start_nats()
    if discovery and events:
        stack.say("planes: embedded (no etcd or NATS needed)")


@dataclass(frozen=True)
class EngineSpec:
    name: str
    role: str
    placement: Placement


def start_workers(stack: Stack, args: ServeArgs, engines: Sequence[EngineSpec]) -> dict[str, Process]:
    extra = list(args.worker_args)
    if len(args.served_model_names) > 1:  # Stack passes the first name; vLLM takes the last flag given
        extra = ["--served-model-name", *args.served_model_names, *extra]
    if args.namespace is not None:
        extra += ["--namespace", args.namespace]
    procs = {}
    for spec in engines:
        p = spec.placement
        procs[spec.name] = stack.start_worker(spec.name, p.omp_bind(), spec.role, extra, env=p.env(),
                                              cpus=p.cpus or None)
    return procs


def wait_ready(stack: Stack, procs: dict[str, Process], progress: Progress, timeout: float) -> None:
    """Until /health lists every engine (by pid), redrawing the progress display. A worker that exits
    with status 2 refused its arguments: WorkerArgumentsError."""
    def check() -> bool:
        pids = {instance.get("pid") for instance in stack.served_instances()}
        progress.update(name for name, proc in procs.items() if proc.pid in pids)
        return progress.done

    try:
        stack.sup.wait_until(check, timeout,
                             f"{len(procs)} engine(s) to serve {stack.settings.served_model_name}")
    except LaunchError as e:
        refused = [p for p in procs.values() if p.returncode == ARGUMENT_ERROR_STATUS]
        if refused:
            raise WorkerArgumentsError(f"{refused[0].name} refused its arguments: "
                                       f"{refused[0].describe_exit()}") from e
        raise


def start_serve(stack: Stack, args: ServeArgs, engines: Sequence[EngineSpec]) -> None:
    """Everything, in the order that gets to the first answer soonest: the engines load while the
    frontend starts. Stopping goes newest first: the frontend, the workers, then etcd / NATS."""
    start_planes(stack)
    stack.pick_http_port("--port")
    started = time.monotonic()
    procs = start_workers(stack, args, engines)
    frontend = list(args.frontend_args)
    if args.namespace is not None:
        frontend += ["--namespace", args.namespace]
    stack.start_frontend(*frontend)
    stack.say(f"loading {len(engines)} engine(s); logs in {stack.sup.run_dir}")
    progress = Progress([e.name for e in engines], [e.placement.describe() for e in engines], started=started)
    wait_ready(stack, procs, progress, args.startup_timeout)
