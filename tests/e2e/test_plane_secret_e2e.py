"""The plane secret as a user sets it (--plane-secret-file / DYN_PLANE_SECRET) on the frontend and the mocker,
on the embedded planes: with the same secret a request is served and KV events reach the router; a
frontend with another secret answers a clear 503 and logs why, and the worker logs the refusal."""

from __future__ import annotations

import uuid

import httpx

from tests.e2e.conftest import require_default_model
from tests.e2e.harness import DEFAULT_MODEL_PATH, healthy_instances, metric_sum, wait_until
from tests.services import free_tcp_port

SECRET = "e2e-plane-secret-0123456789abcdef"


def chat(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
        "model": "mock-model", "messages": [{"role": "user", "content": "tell me a story " * 20}],
        "max_tokens": 4})


def test_same_secret_serves_and_a_wrong_secret_is_refused_with_clear_errors(embedded_group, tmp_path):
    require_default_model()
    group = embedded_group
    namespace = f"sec-{uuid.uuid4().hex[:8]}"
    secret_file = tmp_path / "plane.secret"
    secret_file.write_text(SECRET + "\n")
    worker = group.start("mocker", "dynamo_lite.mocker", "--model-path", str(DEFAULT_MODEL_PATH),
                         "--served-model-name", "mock-model", "--speedup-ratio", "50",
                         "--namespace", namespace, "--plane-secret-file", str(secret_file))
    port = free_tcp_port()
    url = f"http://127.0.0.1:{port}"
    frontend = group.start("frontend", "dynamo_lite.frontend", "--http-host", "127.0.0.1", "--http-port",
                           str(port), "--namespace", namespace, "--router-mode", "kv",
                           extra_env={"DYN_PLANE_SECRET": SECRET})  # the environment twin
    wait_until(lambda: len(healthy_instances(url, "mock-model")) == 1, 60, "the mocker", [frontend, worker])
    reply = chat(url)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 4
    # The embedded event plane's links passed the handshake too: KV events reached the router.
    wait_until(lambda: metric_sum(httpx.get(f"{url}/metrics", timeout=5).text,
                                  "dynamo_lite_router_kv_events_total", model="mock-model",
                                  outcome="applied") > 0, 10, "KV events applied by the router", [frontend])

    wrong_port = free_tcp_port()
    wrong_url = f"http://127.0.0.1:{wrong_port}"
    wrong = group.start("wrong-frontend", "dynamo_lite.frontend", "--http-host", "127.0.0.1", "--http-port",
                        str(wrong_port), "--namespace", namespace,
                        extra_env={"DYN_PLANE_SECRET": "not-the-secret-0123456789abcdef"})
    wait_until(lambda: len(healthy_instances(wrong_url, "mock-model")) == 1, 30, "the wrong frontend's view",
               [wrong])
    refused = chat(wrong_url)
    assert refused.status_code == 503, refused.text
    assert "plane secret" in refused.json()["error"]["message"]
    wait_until(lambda: "refused our plane secret: the secrets differ" in wrong.log_tail(), 10,
               "the frontend's error line", [wrong])
    wait_until(lambda: "wrong plane secret" in worker.log_tail(), 10, "the worker's refusal", [worker])
    assert SECRET not in worker.log_tail() + wrong.log_tail() + frontend.log_tail()
    assert chat(url).status_code == 200  # the right frontend is not affected
