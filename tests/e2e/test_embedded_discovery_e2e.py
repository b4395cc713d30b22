"""The frontend and the mocker on the embedded planes (no etcd, no NATS: the default with neither
ETCD_ENDPOINTS nor NATS_SERVER): a kv-routed request is served, a frontend started later still sees the
workers that are up, and a worker killed with SIGKILL drops out of both within its lease TTL."""

from __future__ import annotations

import time
import uuid

import httpx

from tests.e2e.conftest import require_default_model
from tests.e2e.harness import DEFAULT_MODEL_PATH, ProcGroup, healthy_instances, metric_sum, wait_until
from tests.services import free_tcp_port

LEASE_TTL = 2.0


def start_frontend(group: ProcGroup, name: str, namespace: str):
    port = free_tcp_port()
    proc = group.start(name, "dynamo_lite.frontend", "--http-host", "127.0.0.1", "--http-port", str(port),
                       "--namespace", namespace, "--router-mode", "kv")
    return proc, f"http://127.0.0.1:{port}"


def test_serving_worker_death_and_a_late_frontend_over_embedded_discovery(embedded_group):
    require_default_model()
    group = embedded_group
    namespace = f"emb-{uuid.uuid4().hex[:8]}"
    frontend, url = start_frontend(group, "frontend", namespace)
    worker = group.start("mocker", "dynamo_lite.mocker", "--model-path", str(DEFAULT_MODEL_PATH),
                         "--served-model-name", "mock-model", "--num-workers", "2", "--speedup-ratio", "50",
                         "--namespace", namespace, "--lease-ttl", str(LEASE_TTL))
    wait_until(lambda: len(healthy_instances(url, "mock-model")) == 2, 60, "2 mocker instances",
               [frontend, worker])
    reply = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
        "model": "mock-model", "messages": [{"role": "user", "content": "tell me a story " * 20}],
        "max_tokens": 5})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 5
    # The prompt's blocks reached the kv router over the embedded event plane.
    wait_until(lambda: metric_sum(httpx.get(f"{url}/metrics", timeout=5).text,
                                  "dynamo_lite_router_kv_events_total", model="mock-model",
                                  outcome="applied") > 0, 10, "KV events applied by the router", [frontend])

    late, late_url = start_frontend(group, "late-frontend", namespace)  # after the workers registered
    wait_until(lambda: len(healthy_instances(late_url, "mock-model")) == 2, 30, "the late frontend's view",
               [late])

    worker.kill()  # SIGKILL: no deregistration, only the lease's expiry removes it
    killed = time.monotonic()
    for base in (url, late_url):
        wait_until(lambda: healthy_instances(base, "mock-model") == [], LEASE_TTL + 5,
                   f"no instance on {base} after the worker died", [frontend, late])
    assert time.monotonic() - killed < LEASE_TTL + 5
    assert "planes mismatch" not in frontend.log_tail(200)
