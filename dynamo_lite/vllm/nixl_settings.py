"""vLLM's NIXL connector settings for a disaggregated worker: pure helpers, no vLLM import.

The worker builds vLLM's `--kv-transfer-config` and the NIXL side-channel environment from these,
before vLLM is imported (vLLM reads `VLLM_NIXL_SIDE_CHANNEL_*` through `vllm.envs` when its
connector scheduler starts, in the engine-core process that inherits our environment).
See docs/disaggregation-notes.md for what flows between prefill and decode and why.
"""

from __future__ import annotations

# Connector names accepted on our `--connector` flag, mapped to vLLM's registered class names.
# NixlConnector is vLLM's pull (READ) connector: the decode worker reads the prefill worker's blocks.
_CONNECTORS = {"nixl": "NixlConnector", "nixlconnector": "NixlConnector"}
_NO_CONNECTOR = {"", "none", "null"}
_KV_ROLES = ("kv_both", "kv_producer", "kv_consumer")
_LOAD_FAILURE_POLICIES = ("recompute", "fail")

# Side channel env vars read by vLLM's NixlConnector scheduler (vllm/envs.py).
SIDE_CHANNEL_HOST_ENV = "VLLM_NIXL_SIDE_CHANNEL_HOST"
SIDE_CHANNEL_PORT_ENV = "VLLM_NIXL_SIDE_CHANNEL_PORT"

# UCX's cuda_ipc transport turns its GET (the READ with which the decode worker pulls KV) off on any GPU
# without active NVLinks: one GPU shared by prefill and decode, or PCIe GPUs. UCX then "emulates" the
# read over TCP loopback, at 0.4 GB/s on an H200, where cuda_ipc GET moves 260 GB/s between two
# processes (benchmarks/README.md, "NVIDIA H200"). Turned on unless the operator set it.
UCX_TRANSPORT_ENV = {"UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "y"}


def kv_transfer_config(
    connector: str,
    platform_is_cpu: bool,
    *,
    kv_role: str = "kv_both",
    kv_lease_duration: int | None = None,
    kv_load_failure_policy: str | None = None,
) -> dict | None:
    """The `--kv-transfer-config` dict for `connector`, or None when no connector is wanted.

    connector: "nixl" (or vLLM's name "NixlConnector"), or "none"/"" for aggregated-only serving.
    platform_is_cpu: vLLM's CPU build registers the KV cache as host memory, so NIXL must be told
        `kv_buffer_device="cpu"` (vLLM rejects any other buffer device on CPU). On GPUs the
        buffer device is left to vLLM's default (the GPU itself: UCX moves device memory).
    kv_role: "kv_both" lets one worker be prefill or decode (vLLM logs a deprecation warning
        but behaves the same); "kv_producer"/"kv_consumer" are vLLM's preferred split roles.
    kv_lease_duration: seconds a prefill worker keeps finished blocks that nobody has pulled
        (vLLM default 30; a decode worker that queued the request extends it by heartbeats).
    kv_load_failure_policy: what a decode request does when pulling its KV fails (dead prefill
        worker, transfer error): "recompute" prefills locally, "fail" ends it with an error
        (vLLM's default). None leaves vLLM's default.

    Raises ValueError naming the flag for an unknown connector or role.
    """
    key = connector.strip().lower()
    if key in _NO_CONNECTOR:
        return None
    if key not in _CONNECTORS:
        known = ", ".join(sorted({*_CONNECTORS, "none"}))
        raise ValueError(f"--connector {connector!r} is not supported (choose one of: {known})")
    if kv_role not in _KV_ROLES:
        raise ValueError(f"kv_role {kv_role!r} is not one of {', '.join(_KV_ROLES)}")
    config: dict = {"kv_connector": _CONNECTORS[key], "kv_role": kv_role}
    if platform_is_cpu:
        config["kv_buffer_device"] = "cpu"
    if kv_lease_duration is not None:
        if kv_lease_duration <= 0:
            raise ValueError(f"kv_lease_duration must be positive, got {kv_lease_duration}")
        config["kv_connector_extra_config"] = {"kv_lease_duration": int(kv_lease_duration)}
    if kv_load_failure_policy is not None:
        if kv_load_failure_policy not in _LOAD_FAILURE_POLICIES:
            raise ValueError(f"kv_load_failure_policy {kv_load_failure_policy!r} is not one of "
                             f"{', '.join(_LOAD_FAILURE_POLICIES)}")
        config["kv_load_failure_policy"] = kv_load_failure_policy
    return config


def side_channel_env(host: str, port: int) -> dict[str, str]:
    """Environment that makes vLLM's NIXL handshake listener bind `host:port` and advertise it.

    vLLM both binds its ZMQ handshake socket to this host and puts it in the `remote_host` it
    returns to the decode side, so `host` must be an address of this machine that the decode
    workers can reach: never "0.0.0.0" (unroutable as a target) and never "localhost" across
    hosts. With data parallelism vLLM adds the DP rank to the port, so leave room above it.
    """
    if not host or host in ("0.0.0.0", "::"):
        raise ValueError(f"NIXL side channel host must be a reachable address, got {host!r}")
    if not 0 < port < 65536:
        raise ValueError(f"NIXL side channel port must be in 1..65535, got {port}")
    return {SIDE_CHANNEL_HOST_ENV: host, SIDE_CHANNEL_PORT_ENV: str(port)}
