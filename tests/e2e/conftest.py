"""Stacks of real processes for end-to-end tests: etcd + NATS (from tests/conftest.py), a frontend
and workers started with `python -m`, exactly as a user starts them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.harness import (DEFAULT_MODEL_PATH, SERVED_MODEL_NAME, Proc, ProcGroup, healthy_instances,
                               wait_until)
from tests.services import free_tcp_port


@dataclass
class Stack:
    base_url: str
    model: str
    namespace: str
    group: ProcGroup
    frontend: Proc
    workers: list[Proc]

    def start_frontend(self, name: str, *args: str) -> tuple[Proc, str]:
        """Start another frontend on the same namespace (e.g. a restarted one)."""
        port = free_tcp_port()
        proc = self.group.start(name, "dynamo_lite.frontend", "--http-host", "127.0.0.1",
                                "--http-port", str(port), "--namespace", self.namespace, *args)
        return proc, f"http://127.0.0.1:{port}"


def require_default_model() -> None:
    """Fail (not skip) a test whose stack needs the default model folder when it is missing."""
    if not (DEFAULT_MODEL_PATH / "config.json").exists():
        pytest.fail(f"default model missing at {DEFAULT_MODEL_PATH}: run scripts/setup.sh")


@pytest.fixture
def embedded_group(tmp_path):
    """A ProcGroup on the embedded planes (no etcd, no NATS: neither ETCD_ENDPOINTS nor NATS_SERVER), with a
    discovery directory and runtime directory of this test's own and no plane secret inherited from the
    environment. Its processes are stopped when the test ends."""
    group = ProcGroup(tmp_path, {"ETCD_ENDPOINTS": "", "NATS_SERVER": "", "PYTHONUNBUFFERED": "1",
                                 "DYN_DISCOVERY_DIR": str(tmp_path / "discovery"),
                                 "XDG_RUNTIME_DIR": str(tmp_path / "run"), "DYN_PLANE_SECRET": ""})
    try:
        yield group
    finally:
        group.stop()


def _new_group(tmp_path_factory, etcd_endpoint: str, nats_url: str, name: str) -> ProcGroup:
    run_dir: Path = tmp_path_factory.mktemp(name)
    # An empty nats_url puts every process on the embedded event bus (its peers found through etcd).
    return ProcGroup(run_dir, {"ETCD_ENDPOINTS": etcd_endpoint, "NATS_SERVER": nats_url,
                               "PYTHONUNBUFFERED": "1"})


def start_stack(group: ProcGroup, worker_module: str, worker_args: list[str], *, model: str,
                router_mode: str = "round-robin", expected_instances: int = 1,
                worker_env: dict[str, str] | None = None, startup_timeout: float = 60,
                frontend_args: list[str] = ()) -> Stack:
    namespace = f"e2e-{uuid.uuid4().hex[:8]}"
    port = free_tcp_port()
    frontend = group.start("frontend", "dynamo_lite.frontend", "--http-host", "127.0.0.1",
                           "--http-port", str(port), "--namespace", namespace, "--router-mode", router_mode, *frontend_args)
    worker = group.start("worker", worker_module, *worker_args, "--namespace", namespace,
                         extra_env=worker_env)
    base_url = f"http://127.0.0.1:{port}"
    wait_until(lambda: len(healthy_instances(base_url, model)) >= expected_instances, startup_timeout,
               f"{expected_instances} {model} instance(s) on {base_url}/health", [frontend, worker])
    return Stack(base_url, model, namespace, group, frontend, [worker])


@pytest.fixture(scope="module")
def mocker_stack(tmp_path_factory, etcd_endpoint, nats_url):
    """Frontend (round-robin) + one mocker process simulating 2 workers on the default model."""
    if not (DEFAULT_MODEL_PATH / "config.json").exists():
        pytest.fail(f"default model missing at {DEFAULT_MODEL_PATH}: run scripts/setup.sh")
    group = _new_group(tmp_path_factory, etcd_endpoint, nats_url, "mocker")
    try:
        yield start_stack(group, "dynamo_lite.mocker",
                          ["--model-path", str(DEFAULT_MODEL_PATH), "--served-model-name", "mock-model",
                           "--num-workers", "2", "--speedup-ratio", "50"],
                          model="mock-model", expected_instances=2)
    finally:
        group.stop()


@pytest.fixture(scope="module")
def vllm_stack(tmp_path_factory, etcd_endpoint, nats_url):
    """Frontend + one real vLLM worker on the default model, shared by the module (~40 s start; torn down after it so engines never pile up)."""
    if not (DEFAULT_MODEL_PATH / "config.json").exists():
        pytest.fail(f"default model missing at {DEFAULT_MODEL_PATH}: run scripts/setup.sh")
    group = _new_group(tmp_path_factory, etcd_endpoint, nats_url, "vllm")
    try:
        yield start_stack(group, "dynamo_lite.vllm",
                          ["--model", str(DEFAULT_MODEL_PATH), "--served-model-name", SERVED_MODEL_NAME,
                           "--max-model-len", "2048", "--max-num-seqs", "16"],
                          model=SERVED_MODEL_NAME,
                          worker_env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0"},
                          startup_timeout=240)
    finally:
        group.stop()
