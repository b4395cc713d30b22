"""`python -m dynamo_lite.doctor`: each check that can fail, on fake records in embedded discovery, fake
command output and fake folders (no GPU, no InfiniBand and no etcd are needed here)."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from dynamo_lite.discovery.embedded import EmbeddedDiscovery
from dynamo_lite.doctor import cluster, host
from dynamo_lite.doctor.__main__ import main, parse_config, run_checks
from dynamo_lite.doctor.report import Status, exit_code
from dynamo_lite.protocol import keys
from dynamo_lite.protocol.messages import InstanceRecord, ModelCard, json_encoder
from dynamo_lite.runtime import fingerprint
from dynamo_lite.runtime.net import free_tcp_port


def no_programs(argv):
    raise FileNotFoundError(argv[0])


def model_folder(path, weights=b"x" * 1000):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (path / "model.safetensors").write_bytes(weights)
    return path


async def register(discovery, instance_id, address, *, versions, digest, model="m", path="/models/m",
                   hostname="spark-1"):
    record = InstanceRecord(instance_id=instance_id, component=keys.COMPONENT_BACKEND, address=address,
                            model=model, host=address.split(":")[0], pid=100 + instance_id, hostname=hostname,
                            versions=versions, model_digest=digest)
    card = ModelCard(name=model, path=path, context_length=2048, kv_block_size=16)
    await discovery.put(keys.model_card_key("dynamo", model, instance_id), json_encoder.encode(card))
    await discovery.put(keys.instance_key("dynamo", keys.COMPONENT_BACKEND, instance_id),
                        json_encoder.encode(record))


def by_area(checks, area, status=None):
    return [c for c in checks if c.area == area and (status is None or c.status is status)]


async def test_a_deployment_with_mismatched_hosts_fails_and_says_who(tmp_path):
    here = fingerprint.component_versions()
    listener = socket.create_server(("127.0.0.1", 0))
    alive = f"127.0.0.1:{listener.getsockname()[1]}"
    dead = f"127.0.0.1:{free_tcp_port()}"
    folder = model_folder(tmp_path / "m")
    good = fingerprint.model_digest(folder)
    discovery = await EmbeddedDiscovery.open(tmp_path / "disc")
    try:
        await register(discovery, 1, alive, versions=here, digest=good, path=str(folder))
        await register(discovery, 2, dead, versions={**here, "vllm": "0.31.0"}, digest="0123456789abcdef",
                       hostname="spark-2")
    finally:
        await discovery.close()
    try:
        config = parse_config(["--discovery-dir", str(tmp_path / "disc"), "--model", str(folder),
                               "--ports", str(listener.getsockname()[1]), "--timeout", "1"])
        checks = await run_checks(config, sysfs=str(tmp_path / "no-ib"), runner=no_programs, ibdev2netdev="")
    finally:
        listener.close()
    assert exit_code(checks) == 1
    workers = by_area(checks, "workers")
    assert [c.status for c in workers] == [Status.OK, Status.FAIL]
    assert dead in workers[1].message and "spark-2" in workers[1].message
    (vllm,) = [c for c in by_area(checks, "versions") if "vllm" in c.message]
    assert vllm.status is Status.FAIL and "0.31.0 on backend 2 (spark-2" in vllm.message
    (files,) = by_area(checks, "model files")
    assert files.status is Status.FAIL and "0123456789abcdef on backend 2" in files.message
    assert good in files.message and "the --model folder here" in files.message
    assert by_area(checks, "ports", Status.WARN)  # the listener holds it
    assert by_area(checks, "gpu")[0].status is Status.INFO and "no GPU" in by_area(checks, "gpu")[0].message
    assert "plain Ethernet" in by_area(checks, "fabric", Status.WARN)[0].message


async def test_matching_hosts_pass(tmp_path, capsys):
    here = fingerprint.component_versions()
    listener = socket.create_server(("127.0.0.1", 0))
    discovery = await EmbeddedDiscovery.open(tmp_path / "disc")
    try:
        for i in (1, 2):
            address = f"127.0.0.1:{listener.getsockname()[1]}"
            await register(discovery, i, address, versions=here, digest="ab" * 8)
    finally:
        await discovery.close()
    try:
        code = await asyncio.to_thread(main, ["--discovery-dir", str(tmp_path / "disc"), "--ports",
                                              str(free_tcp_port())])
    finally:
        listener.close()
    out = capsys.readouterr().out
    assert code == 0, out
    assert "m: the same files (abababababababab) on 2 processes" in out and "0 failed" in out


async def test_unreachable_etcd_and_nats_fail():
    port = free_tcp_port()
    checks, discovery = await cluster.check_discovery(f"http://127.0.0.1:{port}", 0.5)
    assert discovery is None and checks[0].status is Status.FAIL and "does not answer" in checks[0].message
    (nats,) = await cluster.check_nats(f"nats://127.0.0.1:{port}", 0.5)
    assert nats.status is Status.FAIL and f"127.0.0.1:{port}" in nats.message


async def test_a_nats_server_is_recognised_by_its_greeting():
    async def greet(reader, writer):
        writer.write(b'INFO {"server_id":"x","version":"2.9.25"}\r\n')
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    try:
        (check,) = await cluster.check_nats(f"nats://127.0.0.1:{server.sockets[0].getsockname()[1]}", 1)
    finally:
        server.close()
    assert check.status is Status.OK and "NATS 2.9.25" in check.message


async def test_a_loopback_address_fails_when_discovery_is_remote():
    record = InstanceRecord(instance_id=7, component="backend", address="127.0.0.1:1", model="m",
                            host="127.0.0.1", pid=1)
    (check,) = await cluster.check_reachable([cluster.Registered(record, None)], 0.5, remote_discovery=True)
    assert check.status is Status.FAIL and "loopback" in check.message and "--advertise-host" in check.hint


def test_embedded_discovery_nobody_started_yet_is_a_warning(tmp_path):
    checks, discovery = asyncio.run(cluster.check_discovery(f"file://{tmp_path / 'none'}", 1))
    assert discovery is None and checks[0].status is Status.WARN


NVIDIA_SMI_QUERY = "0, NVIDIA H200, 570.124.06, 143771\n1, NVIDIA H200, 570.124.06, 143771\n"
NVIDIA_SMI_SPARK = "0, NVIDIA GB10, 580.95.05, [N/A]\n"


NVIDIA_SMI_HEADER = "| NVIDIA-SMI 570.124.06   Driver Version: 570.124.06   CUDA Version: 12.8 |"


def fake_nvidia_smi(query_out, code=0, header=NVIDIA_SMI_HEADER):
    def run(argv):
        if argv[0] != "nvidia-smi":
            raise FileNotFoundError(argv[0])
        return (code, query_out) if len(argv) > 1 else (0, header)
    return run


def test_gpus_driver_and_cuda_from_nvidia_smi():
    checks, gpus = host.check_gpus(fake_nvidia_smi(NVIDIA_SMI_QUERY))
    assert [g.memory_bytes >> 20 for g in gpus] == [143771, 143771]
    assert all(c.status is Status.OK for c in checks) and "driver 570.124.06, CUDA 12.8" in checks[0].message
    checks, gpus = host.check_gpus(fake_nvidia_smi(NVIDIA_SMI_SPARK))
    assert gpus[0].memory_bytes == 0 and "unified memory" in checks[0].message
    failed, _ = host.check_gpus(fake_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate with "
                                                "the NVIDIA driver.\n", code=9))
    assert failed[0].status is Status.FAIL and "couldn't communicate" in failed[0].message


def test_model_folder_disk_and_memory(tmp_path):
    missing = host.check_model(str(tmp_path / "models" / "gpt-oss-120b"), weights_gb=65,
                               disk_free=lambda p: 20 << 30)
    assert [c.status for c in missing] == [Status.FAIL, Status.FAIL]
    assert "does not exist" in missing[0].message and "20 GiB free" in missing[1].message
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert "no weight files" in host.check_model(str(empty))[0].message
    folder = model_folder(tmp_path / "big", weights=b"x" * 4096)
    too_big = host.check_model(str(folder), memory_available=2048)
    assert too_big[-1].status is Status.FAIL and too_big[-1].area == "memory"
    gpus = [host.Gpu(0, "H200", "570", 1 << 20)]
    assert host.check_model(str(folder), tensor_parallel_size=2, gpus=gpus)[-1].status is Status.OK


def test_nixl_without_a_ucx_backend_fails(tmp_path):
    from dynamo_lite.runtime.fabric import Fabric

    (tmp_path / "nixl").mkdir()
    (tmp_path / "nixl" / "libplugin_POSIX.so").write_bytes(b"")
    checks = host.check_nixl(tmp_path, Fabric(), "1.5.1")
    assert checks[0].status is Status.FAIL and "no UCX backend" in checks[0].message
    assert host.check_nixl(None, Fabric(), "")[0].status is Status.WARN


def test_bad_ports_are_a_usage_error():
    with pytest.raises(SystemExit) as e:
        parse_config(["--ports", "http"])
    assert e.value.code == 2
