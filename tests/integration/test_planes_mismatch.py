"""A frontend on etcd and a worker on embedded discovery: both say so in their logs within seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

from tests.services import free_tcp_port


def _start(args: list[str], log, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT, env=env)


def test_a_frontend_on_etcd_and_a_worker_on_embedded_discovery_both_report_it(etcd_endpoint, nats_url,
                                                                               tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 1000, "max_position_embeddings": 512}))
    namespace = f"mismatch-{uuid.uuid4().hex[:8]}"
    # Their own runtime dir: the presence records of this test's processes only.
    env = {k: v for k, v in os.environ.items() if k not in ("ETCD_ENDPOINTS", "NATS_SERVER")}
    env.update(XDG_RUNTIME_DIR=str(tmp_path / "run"), PYTHONPATH=os.getcwd(), PYTHONUNBUFFERED="1")
    frontend_log, worker_log = tmp_path / "frontend.log", tmp_path / "worker.log"
    procs = []
    try:
        with open(frontend_log, "w") as f, open(worker_log, "w") as w:
            procs.append(_start(["dynamo_lite.frontend", "--http-host", "127.0.0.1", "--http-port",
                                 str(free_tcp_port()), "--namespace", namespace, "--etcd-endpoints",
                                 etcd_endpoint], f, env))
            procs.append(_start(["dynamo_lite.mocker", "--model-path", str(model), "--namespace", namespace,
                                 "--discovery-dir", str(tmp_path / "embedded"), "--nats-server", nats_url],
                                w, env))
        started = time.monotonic()
        deadline = started + 30  # start-up on a shared 2-core box, then CHECK_INTERVAL
        while time.monotonic() < deadline:
            logs = frontend_log.read_text(), worker_log.read_text()
            if all("planes mismatch" in log for log in logs):
                break
            assert all(p.poll() is None for p in procs), logs
            time.sleep(0.2)
        frontend_text, worker_text = frontend_log.read_text(), worker_log.read_text()
        assert "planes mismatch" in frontend_text, frontend_text
        assert "planes mismatch" in worker_text, worker_text
        [line] = [x for x in frontend_text.splitlines() if "planes mismatch" in x]
        assert f"aggregated worker pid {procs[1].pid}" in line and "discovery embedded" in line
        assert "this frontend" in line and f"discovery etcd ({etcd_endpoint})" in line
        [line] = [x for x in worker_text.splitlines() if "planes mismatch" in x]
        assert f"frontend pid {procs[0].pid}" in line and "this aggregated worker" in line
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert not list((tmp_path / "run" / "dynamo_lite" / "presence").glob("*.json"))  # withdrawn at exit
