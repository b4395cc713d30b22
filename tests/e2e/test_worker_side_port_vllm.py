"""The real vLLM worker's side port, started as a user starts it (`python -m dynamo_lite.vllm
--metrics-endpoint-port N` behind a frontend): alive while the engine loads, ready once registered,
and /metrics carries vLLM's own `vllm:` metrics (kept in the worker process) beside the worker's,
including every vLLM metric the Grafana dashboard charts."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.dashboard import SCRAPE_LABELS, dashboard_queries, exported_names, split_query
from tests.e2e.conftest import Stack, _new_group
from tests.e2e.harness import (
    DEFAULT_MODEL_PATH,
    SERVED_MODEL_NAME,
    healthy_instances,
    metric_samples,
    metric_sum,
    wait_until,
)
from tests.services import free_tcp_port

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_side_port(tmp_path_factory, etcd_endpoint, nats_url):
    if not (DEFAULT_MODEL_PATH / "config.json").exists():
        pytest.fail(f"default model missing at {DEFAULT_MODEL_PATH}: run scripts/setup.sh")
    group = _new_group(tmp_path_factory, etcd_endpoint, nats_url, "vllm-side-port")
    port = free_tcp_port()
    side = f"http://127.0.0.1:{port}"
    seen_loading: list[int] = []

    def ready_while_alive() -> bool:
        # Polled while the stack starts: the first /live answer comes while the engine still loads.
        r = httpx.get(f"{side}/live", timeout=2)
        if not seen_loading:
            seen_loading.append(httpx.get(f"{side}/ready", timeout=2).status_code)
        return r.status_code == 200

    try:
        stack = _start_watching(group, port, ready_while_alive)
        yield stack, side, seen_loading
    finally:
        group.stop()


def _start_watching(group, port: int, ready_while_alive) -> Stack:
    """Frontend + worker as start_stack starts them, polling the side port while the engine loads."""
    namespace = f"e2e-{uuid.uuid4().hex[:8]}"
    http_port = free_tcp_port()
    frontend = group.start("frontend", "dynamo_lite.frontend", "--http-host", "127.0.0.1",
                           "--http-port", str(http_port), "--namespace", namespace)
    worker = group.start("worker", "dynamo_lite.vllm", "--model", str(DEFAULT_MODEL_PATH),
                         "--served-model-name", SERVED_MODEL_NAME, "--max-model-len", "2048",
                         "--max-num-seqs", "8", "--namespace", namespace,
                         "--metrics-endpoint-port", str(port),
                         extra_env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0"})
    wait_until(ready_while_alive, 120, "the worker's /live", [worker])
    base_url = f"http://127.0.0.1:{http_port}"
    wait_until(lambda: healthy_instances(base_url, SERVED_MODEL_NAME), 240,
               f"{SERVED_MODEL_NAME} on {base_url}/health", [frontend, worker])
    return Stack(base_url, SERVED_MODEL_NAME, namespace, group, frontend, [worker])


def test_alive_while_loading_ready_once_registered(vllm_side_port):
    _, side, seen_loading = vllm_side_port
    assert seen_loading == [503]
    assert httpx.get(f"{side}/ready", timeout=5).status_code == 200
    assert httpx.get(f"{side}/live", timeout=5).status_code == 200


def test_metrics_carry_vllm_and_worker_metrics_of_a_request(vllm_side_port):
    stack, side, _ = vllm_side_port
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", timeout=120,
                   json={"model": stack.model, "max_tokens": 8, "temperature": 0,
                         "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    def counted() -> str | None:
        text = httpx.get(f"{side}/metrics", timeout=5).text
        done = metric_sum(text, "vllm:request_success_total", model_name=SERVED_MODEL_NAME)
        return text if done >= 1 else None

    text = wait_until(counted, 10, "vLLM's request_success_total on the side port", stack.workers)
    assert metric_sum(text, "vllm:generation_tokens_total") == usage["completion_tokens"]
    assert metric_sum(text, "vllm:prompt_tokens_total") == usage["prompt_tokens"]
    assert metric_sum(text, "dynamo_lite_worker_requests_total", outcome="completed") == 1
    assert metric_sum(text, "dynamo_lite_worker_generated_tokens_total") == usage["completion_tokens"]
    [(labels, total)] = metric_samples(text, "dynamo_lite_worker_kv_total_blocks")
    assert labels["model"] == SERVED_MODEL_NAME and total > 0
    [instance] = healthy_instances(stack.base_url, SERVED_MODEL_NAME)
    assert int(labels["worker"], 16) == instance["instance_id"]

    exported, exported_labels = exported_names(text)
    charted: set[str] = set()
    for expr in dashboard_queries():
        if "vllm:" in expr:
            metrics, used_labels = split_query(expr)
            charted |= metrics
            assert used_labels <= exported_labels | SCRAPE_LABELS, (expr, used_labels - exported_labels)
    assert charted and charted <= exported, f"charted but not exported: {sorted(charted - exported)}"
