"""`python -m dynamo_lite.vllm` refusals that come before any engine starts (vLLM is imported, not run)."""

from __future__ import annotations

import socket

import pytest

from dynamo_lite.protocol.errors import ConfigError

pytest.importorskip("vllm")


def test_a_hub_id_as_model_is_refused_at_once(capsys):
    from dynamo_lite.vllm.args import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--model", "HuggingFaceTB/SmolLM2-135M-Instruct"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--model HuggingFaceTB/SmolLM2-135M-Instruct: a model hub id, and there is no hub access" in err


def test_a_taken_nixl_side_channel_port_names_its_flag():
    from dynamo_lite.vllm.args import nixl_environment

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot bind 127.0.0.1:{port} .*--nixl-side-channel-port"):
            nixl_environment("127.0.0.1", {}, port)
        with pytest.raises(ConfigError, match="VLLM_NIXL_SIDE_CHANNEL_PORT"):
            nixl_environment("127.0.0.1", {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(port)})
    free = nixl_environment("127.0.0.1", {}, 0)
    assert free["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1" and int(free["VLLM_NIXL_SIDE_CHANNEL_PORT"]) > 0


def test_ucx_cuda_ipc_reads_are_on_unless_the_operator_chose():
    from dynamo_lite.vllm.args import nixl_environment

    # Without it UCX pulls KV between two processes on one GPU over TCP loopback (0.4 GB/s on an H200).
    assert nixl_environment("127.0.0.1", {}, 0)["UCX_CUDA_IPC_ENABLE_GET_ZCOPY"] == "y"
    assert "UCX_CUDA_IPC_ENABLE_GET_ZCOPY" not in nixl_environment(
        "127.0.0.1", {"UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "n"}, 0)


def test_worker_flags_come_from_the_shared_worker_config():
    from dynamo_lite.vllm.args import parse_args

    _, config = parse_args(["--is-prefill-worker", "--connector", "nixl", "--lease-ttl", "4",
                            "--request-plane-port", "0", "--advertise-host", "10.1.2.3"])
    assert (config.role, config.component, config.lease_ttl) == ("prefill", "prefill", 4.0)
    assert config.engine_kind == "vllm"
    _, config = parse_args(["--connector", "nixl"])
    assert (config.role, config.component) == ("decode", "backend")


def test_the_worker_command_exits_with_one_line_when_the_side_channel_port_is_taken():
    import os
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "dynamo_lite.vllm", "--connector", "nixl", "--advertise-host", "127.0.0.1",
             "--nixl-side-channel-port", str(port)], capture_output=True, text=True, timeout=120,
            env={k: v for k, v in os.environ.items() if not k.startswith("VLLM_NIXL_SIDE_CHANNEL")}
            | {"PYTHONPATH": os.getcwd()})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"error: cannot bind 127.0.0.1:{port}" in done.stderr and "--nixl-side-channel-port" in done.stderr


def test_ray_backend_is_refused_with_vllms_reason_where_the_platform_has_no_ray_device(capsys):
    """vLLM's CPU platform has no Ray device key: its Ray executor raises "current platform cpu does not
    support ray" inside the engine core, after the worker registered. The worker says so at once."""
    from vllm.platforms import current_platform

    from dynamo_lite.vllm.args import parse_args

    if current_platform.ray_device_key:
        pytest.skip("this vLLM platform supports Ray (a GPU build); the refusal concerns CPU builds")
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--tensor-parallel-size", "3", "--distributed-executor-backend", "ray"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--distributed-executor-backend ray: this vLLM build's platform has no Ray device" in err
    assert "current platform cpu does not support ray" in err
    # The one-host way stays open: mp parses, with the TP size handed to vLLM unchanged.
    engine_args, _ = parse_args(["--tensor-parallel-size", "3", "--distributed-executor-backend", "mp"])
    assert (engine_args.tensor_parallel_size, engine_args.distributed_executor_backend) == (3, "mp")


def test_ray_backend_checks_ray_and_the_platform():
    from dynamo_lite.vllm.args import check_executor_backend

    check_executor_backend("mp", "", False)  # not Ray: nothing to check
    check_executor_backend(None, "", False)
    check_executor_backend("ray", "GPU", True)
    with pytest.raises(ConfigError, match="needs the ray package on every host"):
        check_executor_backend("ray", "GPU", False)
    with pytest.raises(ConfigError, match="platform has no Ray device"):
        check_executor_backend("ray", "", True)
