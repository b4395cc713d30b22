"""A real vLLM worker whose engine core process dies deregisters and exits non-zero (for a supervisor)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from dynamo_lite.planes import connect_discovery
from dynamo_lite.protocol import keys
from tests.e2e.conftest import _new_group
from tests.e2e.harness import DEFAULT_MODEL_PATH, SERVED_MODEL_NAME, wait_until

pytestmark = pytest.mark.vllm


def registered(etcd_endpoint: str, namespace: str) -> int:
    """How many instance records the namespace holds in etcd."""

    async def count() -> int:
        discovery = await connect_discovery(etcd_endpoint)
        try:
            items, _ = await discovery.get_prefix(keys.instances_prefix(namespace))
            return len(items)
        finally:
            await discovery.close()

    return asyncio.run(count())


def engine_core_pid(pid: int) -> int:
    """The child process vLLM V1 runs its engine core in (titled VLLM::EngineCore), of worker `pid`."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            title = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"EngineCore" in title:
                found.append(int(child))
    assert len(found) == 1, f"engine core processes of {pid}: {found}"
    return found[0]


def test_killed_engine_core_makes_the_worker_deregister_and_exit_non_zero(tmp_path_factory, etcd_endpoint):
    if not (DEFAULT_MODEL_PATH / "config.json").exists():
        pytest.fail(f"default model missing at {DEFAULT_MODEL_PATH}: run scripts/setup.sh")
    group = _new_group(tmp_path_factory, etcd_endpoint, "", "vllm-death")
    namespace = f"e2e-{uuid.uuid4().hex[:8]}"
    try:
        worker = group.start("worker", "dynamo_lite.vllm", "--model", str(DEFAULT_MODEL_PATH),
                             "--served-model-name", SERVED_MODEL_NAME, "--max-model-len", "1024",
                             "--max-num-seqs", "4", "--namespace", namespace,
                             extra_env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0",
                                        "DYN_EVENT_PLANE": "embedded"})
        wait_until(lambda: registered(etcd_endpoint, namespace) == 1, 240, "the vLLM worker to register",
                   [worker])
        os.kill(engine_core_pid(worker.pid), signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: not worker.alive(), 60, "the worker to exit after its engine core died")
        assert worker.returncode not in (0, None), worker.log_tail()
        assert time.monotonic() - killed_at < 60
        assert registered(etcd_endpoint, namespace) == 0  # it revoked its lease on the way out
        assert "the engine died" in worker.log_tail(60)
    finally:
        group.stop()
