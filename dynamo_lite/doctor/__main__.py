"""`python -m dynamo_lite.doctor [--etcd-endpoints URL --nats-server URL] [--model DIR | --preset NAME]`:
checks this host and the deployment its discovery shows, prints a report, exits 1 if anything failed.

Run it on every host, with the planes the components use (the same ETCD_ENDPOINTS / NATS_SERVER, or none
for the embedded planes). `--fabric-env` prints the fabric's NCCL / UCX settings as shell exports instead
(`eval "$(python -m dynamo_lite.doctor --fabric-env)"`). docs/doctor.md shows a report.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from dynamo_lite import planes
from dynamo_lite.doctor import cluster, host
from dynamo_lite.doctor.report import Check, exit_code, render
from dynamo_lite.presets import DEFAULT_MODELS_DIR, MODELS_DIR_ENV, PRESET_HELP, get_preset, local_model_path
from dynamo_lite.protocol.errors import ConfigError
from dynamo_lite.runtime import fabric, fingerprint
from dynamo_lite.runtime.config import add_config_arguments, check_ranges, config_from_args, option
from dynamo_lite.runtime.net import default_advertise_host

PROG = "python -m dynamo_lite.doctor"


@dataclass(frozen=True)
class DoctorConfig(planes.PlaneOptions):
    """What the doctor looks at; the planes' options are the components' own (planes.PlaneOptions)."""

    namespace: str = option("dynamo", "Discovery namespace of the deployment.")
    model: str = option("", "Model folder to check on this host (files, disk, memory; compared with the "
                            "workers' model digest).", env="DYN_MODEL_PATH")
    preset: str = option("", PRESET_HELP.split(":")[0] + ": its model folder, size and TP are checked.",
                         env="DYN_PRESET")
    tensor_parallel_size: int = option(0, "GPUs the engine spans, for the memory check (0 = the preset's, "
                                          "else 1).", minimum=0)
    ports: tuple[str, ...] = option(("8000",), "TCP ports this host will listen on (frontend, "
                                               "--request-plane-port, ...): free or in use.")
    advertise_host: str = option("", "The address this host's workers advertise (default: the one facing "
                                     "etcd), checked against the RDMA fabric.")
    timeout: float = option(3.0, "Seconds to wait for each connection.", exclusive_minimum=0)
    fabric_env: bool = option(False, "Print the fabric's NCCL / Gloo / UCX settings as shell exports and "
                                     "exit (nothing else is checked).")

    def __post_init__(self) -> None:
        check_ranges(self)
        self._resolve_planes()
        for port in self.ports:
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"--ports {port!r} is not a TCP port", param="--ports")


def parse_config(argv: Sequence[str] | None = None) -> DoctorConfig:
    parser = argparse.ArgumentParser(prog=PROG, description="Checks this host and the deployment in "
                                     "discovery; exit status 1 when a check fails (docs/doctor.md).")
    add_config_arguments(parser, DoctorConfig)
    args = parser.parse_args(argv)
    try:
        return config_from_args(DoctorConfig, args)
    except ConfigError as e:
        parser.error(e.message)
        raise  # unreachable


async def run_checks(config: DoctorConfig, *, sysfs: str = fabric.SYSFS_INFINIBAND,
                     runner: host.Runner = host.run_command, ibdev2netdev: str | None = None) -> list[Check]:
    """Every check, in the order a report reads best: this host, then the planes, then the deployment."""
    checks: list[Check] = []
    gpu_checks, gpus = host.check_gpus(runner)
    checks += gpu_checks
    if ibdev2netdev is None:
        try:
            code, out = runner(["ibdev2netdev"])
            ibdev2netdev = out if code == 0 else ""
        except (OSError, ValueError):
            ibdev2netdev = ""
    fab = fabric.detect(sysfs, ibdev2netdev)
    advertise = config.advertise_host
    if not advertise and planes.discovery_kind(config.discovery_url) == "etcd":
        advertise = default_advertise_host(config.discovery_url)  # what a worker here would advertise
    checks += host.check_fabric(fab, advertise)
    checks += host.check_nixl(host.nixl_libs_dir(), fab, fingerprint.package_version("nixl"))
    checks += host.check_ports([int(p) for p in config.ports])
    local_digest = {}
    model, weights_gb, tp = config.model, 0.0, config.tensor_parallel_size or 1
    if config.preset:
        preset = get_preset(config.preset)
        weights_gb, tp = preset.weights_gb, config.tensor_parallel_size or preset.tensor_parallel_size
        if not model:
            try:
                model = local_model_path(preset, os.environ)
            except ConfigError:
                # Not here: check_model says so, and whether the disk has room for it.
                model = os.path.join(os.environ.get(MODELS_DIR_ENV) or str(DEFAULT_MODELS_DIR),
                                     preset.model.rsplit("/", 1)[-1])
    if model:
        checks += host.check_model(model, weights_gb, tp, gpus)
        digest = fingerprint.model_digest(model)
        if digest:
            local_digest = {get_preset(config.preset).model if config.preset else model: digest}
    found, discovery = await cluster.check_discovery(config.discovery_url, config.timeout)
    checks += found
    checks += await cluster.check_nats(config.event_plane_url, config.timeout)
    if discovery is not None:
        try:
            registered = await cluster.read_registered(discovery, config.namespace)
        finally:
            await discovery.close()
        url = config.discovery_url
        remote = planes.discovery_kind(url) == "etcd" and not _local_url(url)
        checks += await cluster.check_reachable(registered, config.timeout, remote)
        checks += cluster.check_versions(registered, host.local_versions(), host.hostname())
        checks += cluster.check_model_files(registered, _served_names(registered, local_digest, model))
    return checks


def _served_names(registered: list[cluster.Registered], local: dict[str, str], folder: str) -> dict[str, str]:
    """The local digest keyed by the served name of the workers whose card names the same folder (a worker
    started with --model DIR serves DIR under its --served-model-name)."""
    if not local:
        return {}
    out = dict(local)
    digest = next(iter(local.values()))
    for entry in registered:
        if entry.card and os.path.abspath(entry.card.path) == os.path.abspath(folder):
            out[entry.record.model] = digest
    return out


def _local_url(url: str) -> bool:
    return all(cluster._loopback(cluster._host_port(item.strip(), 2379)[0]) for item in url.split(","))


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    if config.fabric_env:
        for key, value in fabric.settings(fabric.detect()).items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    try:
        checks = asyncio.run(run_checks(config))
    except ConfigError as e:
        print(f"{PROG}: error: {e.message}", file=sys.stderr)
        return 2
    versions = ", ".join(f"{k} {v}" for k, v in host.local_versions().items())
    print(render(checks, f"dynamo_lite doctor on {host.hostname()} ({versions}); namespace "
                         f"{config.namespace}, discovery {config.discovery_url}"))
    return exit_code(checks)


if __name__ == "__main__":
    sys.exit(main())
