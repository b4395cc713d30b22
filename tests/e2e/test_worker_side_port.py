"""The mocker's side port (--metrics-endpoint-port), started as a user starts it behind a kv-routing
frontend: probes answer, /metrics counts what the frontend sent (requests, tokens, cache hits by blocks,
relayed KV events), and every metric the Grafana dashboard charts is one these processes export."""

from __future__ import annotations

import httpx
import pytest

from tests.dashboard import ADMISSION_METRICS, SCRAPE_LABELS, dashboard_queries, exported_names, split_query
from tests.e2e.conftest import _new_group, start_stack
from tests.e2e.harness import DEFAULT_MODEL_PATH, metric_samples, metric_sum, wait_until
from tests.services import free_tcp_port


@pytest.fixture(scope="module")
def mocker_with_side_port(tmp_path_factory, etcd_endpoint, nats_url):
    if not (DEFAULT_MODEL_PATH / "config.json").exists():
        pytest.fail(f"default model missing at {DEFAULT_MODEL_PATH}: run scripts/setup.sh")
    group = _new_group(tmp_path_factory, etcd_endpoint, nats_url, "side-port")
    port = free_tcp_port()
    try:
        # The port through its environment twin, as a Kubernetes manifest sets it.
        stack = start_stack(group, "dynamo_lite.mocker",
                            ["--model-path", str(DEFAULT_MODEL_PATH), "--served-model-name", "mock-model",
                             "--speedup-ratio", "50"],
                            model="mock-model", router_mode="kv",
                            worker_env={"DYN_METRICS_ENDPOINT_PORT": str(port)})
        yield stack, f"http://127.0.0.1:{port}"
    finally:
        group.stop()


def test_probes_and_metrics_follow_the_requests(mocker_with_side_port):
    stack, side = mocker_with_side_port
    assert httpx.get(f"{side}/live", timeout=5).status_code == 200
    assert httpx.get(f"{side}/ready", timeout=5).status_code == 200
    prompt = "a prompt long enough to fill several KV blocks of sixteen tokens each " * 8
    for _ in range(2):  # the second time its blocks are in the prefix cache
        r = httpx.post(f"{stack.base_url}/v1/completions", timeout=30,
                       json={"model": stack.model, "prompt": prompt, "max_tokens": 5})
        assert r.status_code == 200, r.text
    usage = r.json()["usage"]

    def scrape() -> str | None:
        text = httpx.get(f"{side}/metrics", timeout=5).text
        return text if metric_sum(text, "dynamo_lite_worker_kv_events_total") > 0 else None

    text = wait_until(scrape, 10, "relayed KV events on the side port", stack.workers)
    assert metric_sum(text, "dynamo_lite_worker_requests_total", outcome="completed", model="mock-model") == 2
    assert metric_sum(text, "dynamo_lite_worker_generated_tokens_total") == 10
    prompt_blocks = metric_sum(text, "dynamo_lite_worker_prompt_blocks_total")
    cached_blocks = metric_sum(text, "dynamo_lite_worker_cached_blocks_total")
    assert prompt_blocks == 2 * (usage["prompt_tokens"] // 16)
    assert cached_blocks * 16 == usage["prompt_tokens_details"]["cached_tokens"] > 0
    [(labels, ready)] = metric_samples(text, "dynamo_lite_worker_ready")
    assert ready == 1 and labels["role"] == "aggregated"
    assert metric_sum(text, "dynamo_lite_worker_kv_total_blocks") > 0
    assert "process_resident_memory_bytes" in text


def test_every_dashboard_query_names_a_metric_the_processes_export(mocker_with_side_port):
    stack, side = mocker_with_side_port
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", timeout=30,
                   json={"model": stack.model, "max_tokens": 3,
                         "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    frontend = httpx.get(f"{stack.base_url}/metrics", timeout=5).text
    worker = httpx.get(f"{side}/metrics", timeout=5).text
    exported, labels = exported_names(frontend, worker)
    ours: set[str] = set()
    used_labels: set[str] = set()
    # Queries of vLLM's own metrics need a real engine: tests/e2e/test_worker_side_port_vllm.py checks those.
    for expr in dashboard_queries():
        if "vllm:" not in expr:
            metrics, expr_labels = split_query(expr)
            ours |= metrics
            if not metrics & ADMISSION_METRICS:  # admission is off here: its labels have no samples yet
                used_labels |= expr_labels
    assert ours and ours <= exported, f"charted but not exported: {sorted(ours - exported)}"
    unset = used_labels - labels - SCRAPE_LABELS
    assert not unset, f"labels nobody sets: {sorted(unset)}"
    assert {"dynamo_lite_frontend_time_to_first_token_seconds_bucket", "dynamo_lite_frontend_requests_total",
            "dynamo_lite_worker_cached_blocks_total", "dynamo_lite_worker_kv_transfer_bytes_total"} | ADMISSION_METRICS <= ours

