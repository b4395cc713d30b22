"""What `serve` starts, on the launch scripts' Stack: the planes it needs, one worker per engine on its
own cores or GPUs, the frontend, then a wait with the progress display until every engine serves.

Planes: serve starts no etcd or NATS and passes no plane options. With no ETCD_ENDPOINTS / NATS_SERVER
exported the components use the embedded planes (planes.py), which need no server, in the private
discovery directory serve gives them all, so two `serve` runs never see each other; exported, they are
used as they are.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dynamo_lite import planes
from dynamo_lite.launch.stack import Stack
from dynamo_lite.launch.supervisor import LaunchError, Process
from dynamo_lite.protocol.errors import ConfigError
from dynamo_lite.serve.args import ServeArgs
from dynamo_lite.serve.placement import Placement
from dynamo_lite.serve.progress import Progress
from dynamo_lite.serve.side_ports import side_port_args

ARGUMENT_ERROR_STATUS = 2  # argparse's exit status: how a worker refuses its arguments


class WorkerArgumentsError(LaunchError):
    """A worker exited with status 2 while starting: it refused its arguments. serve exits 2 as well."""

    exit_status = ARGUMENT_ERROR_STATUS


def say_planes(stack: Stack, env: Mapping[str, str]) -> None:
    """One line on which planes the children will take: they resolve them the same way from the same
    environment (planes.resolve_planes). A bad choice there is the children's error to report."""
    try:
        discovery, events = planes.resolve_planes(
            env.get("DYN_DISCOVERY", ""), env.get("DYN_DISCOVERY_DIR", ""), env.get("DYN_EVENT_PLANE", ""),
            env.get("ETCD_ENDPOINTS", ""), env.get("NATS_SERVER", ""), env)
    except ConfigError:
        return
    describe = {"embedded": "embedded (no etcd or NATS needed)"}
    stack.say(f"planes: discovery {describe.get(planes.discovery_kind(discovery), 'etcd at ' + discovery)}, "
              f"events {describe.get(planes.event_plane_kind(events), 'NATS at ' + events)}")


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
    extra += side_port_args(args.side_port, 0)  # the first worker's: Stack gives each next one the next port
    procs = {}
    for spec in engines:
        p = spec.placement
        procs[spec.name] = stack.start_worker(spec.name, p.omp_bind(), spec.role, extra,
                                              env=p.env(), cpus=p.cpus or None)
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
    frontend starts. Stopping goes newest first: the frontend, then the workers."""
    say_planes(stack, os.environ)
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
