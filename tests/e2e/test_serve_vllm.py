"""`python -m dynamo_lite.serve` with real vLLM and the default model, on the embedded planes (no etcd, no
NATS): aggregated and disaggregated, it serves, answers a chat request with the model's answer, and
SIGTERM stops every process it started."""

from __future__ import annotations

import signal
import subprocess

import httpx
import openai
import pytest

from dynamo_lite.launch.supervisor import wait_until
from dynamo_lite.runtime.net import free_tcp_port
from tests.e2e.harness import REPO, SERVED_MODEL_NAME, metric_sum
from tests.e2e.test_launch_scripts import gone, started_pids
from tests.e2e.test_serve import group_members, serve, serve_env  # noqa: F401 - the fixture

pytestmark = pytest.mark.vllm


def test_serve_the_default_model_answers_and_sigterm_stops_everything(serve_env, tmp_path):  # noqa: F811
    port = free_tcp_port()
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(serve("--port", str(port), "--max-model-len", "2048", "--max-num-seqs", "8"),
                                env=serve_env, cwd=REPO, stdout=stdout, stderr=stderr)
    pids: dict[str, int] = {}
    try:
        wait_until(lambda: "press Ctrl-C" in err.read_text(), 600, "serve to load the model", [], interval=1)
        assert f"Serving {SERVED_MODEL_NAME} at http://127.0.0.1:{port}/v1" in out.read_text()
        assert "worker0 (CPU " in err.read_text() and "ready in" in err.read_text()
        pids = started_pids(tmp_path / "run")
        assert list(pids) == ["worker0", "frontend"]  # no etcd, no NATS: the embedded planes
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        reply = client.chat.completions.create(
            model=SERVED_MODEL_NAME, max_tokens=24, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in reply.choices[0].message.content
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert pids and all(gone(pid) for pid in pids.values()), err.read_text()
    assert group_members(set(pids.values())) == []  # vLLM's engine core went too
    assert "Traceback" not in (tmp_path / "run" / "worker0.log").read_text()


def test_serve_disaggregated_vllm_prefills_remotely_over_the_embedded_planes(serve_env, tmp_path):  # noqa: F811
    """One prefill and one decode vLLM engine, each on its own core, KV moved over NIXL, found and
    routed through the embedded planes alone."""
    port = free_tcp_port()
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(serve("--prefill-workers", "1", "--decode-workers", "1", "--port", str(port),
                                      "--enforce-disagg", "--disagg-min-prefill-tokens", "0",
                                      "--max-model-len", "2048", "--max-num-seqs", "8"),
                                env=serve_env, cwd=REPO, stdout=stdout, stderr=stderr)
    pids: dict[str, int] = {}
    try:
        wait_until(lambda: "press Ctrl-C" in err.read_text(), 600, "serve to load both engines", [], interval=1)
        pids = started_pids(tmp_path / "run")
        assert list(pids) == ["prefill0", "decode0", "frontend"]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        reply = client.chat.completions.create(
            model=SERVED_MODEL_NAME, max_tokens=24, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in reply.choices[0].message.content
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert metric_sum(metrics, "dynamo_lite_frontend_disagg_requests_total", mode="disaggregated") == 1.0
        assert metric_sum(metrics, "dynamo_lite_frontend_kv_transfer_blocks_sum") >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert pids and all(gone(pid) for pid in pids.values()), err.read_text()
