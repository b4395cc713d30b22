"""`python -m dynamo_lite.serve` with real vLLM and the default model: it serves, answers a chat
request with the model's answer, and SIGTERM stops every process it started."""

from __future__ import annotations

import signal
import subprocess

import openai
import pytest

from dynamo_lite.launch.supervisor import wait_until
from dynamo_lite.runtime.net import free_tcp_port
from tests.e2e.harness import REPO, SERVED_MODEL_NAME
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
