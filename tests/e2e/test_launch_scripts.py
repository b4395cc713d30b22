"""launch/*.sh and `python -m dynamo_lite.launch` with the mocker engine: each starts its own etcd and
NATS on free ports, serves a request, and on SIGINT stops everything it started (newest first)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dynamo_lite.launch.supervisor import wait_until
from dynamo_lite.runtime.net import free_tcp_port
from tests.e2e.harness import DEFAULT_MODEL_PATH, REPO, SERVED_MODEL_NAME


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.fixture
def launch_env(tmp_path: Path) -> dict[str, str]:
    if not (DEFAULT_MODEL_PATH / "config.json").exists():
        pytest.fail(f"default model missing at {DEFAULT_MODEL_PATH}: run scripts/setup.sh")
    env = {k: v for k, v in os.environ.items() if k not in ("ETCD_ENDPOINTS", "NATS_SERVER", "HTTP_PORT")}
    env.update(PYTHON=sys.executable, RUN_DIR=str(tmp_path / "run"), ETCD_PORT=str(free_tcp_port()),
               NATS_PORT=str(free_tcp_port()), NATS_MONITOR_PORT=str(free_tcp_port()), HTTP_PORT=str(free_tcp_port()),
               STOP_TIMEOUT="20", PYTHONUNBUFFERED="1")
    return env


def free_port_pair() -> int:
    """A port p with p + 1 free too, below the kernel's ephemeral range (where the workers' own free
    ports come from), so the second worker's side port is not taken by chance."""
    for _ in range(100):
        port = random.randint(20000, 30000)
        try:
            for candidate in (port, port + 1):
                with socket.socket() as sock:
                    sock.bind(("0.0.0.0", candidate))
        except OSError:
            continue
        return port
    raise AssertionError("no two adjacent free ports in 20000-30001")


def started_pids(run_dir: Path) -> dict[str, int]:
    return {name: int(pid) for pid, name in (line.split() for line in (run_dir / "pids").read_text().splitlines())}


def complete(port: str) -> dict:
    body = json.dumps({"model": SERVED_MODEL_NAME, "prompt": "Hello there", "max_tokens": 4}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.mark.parametrize("script, names", [
    ("agg.sh", ["etcd", "nats", "frontend", "worker"]),
    ("disagg_router.sh", ["etcd", "nats", "frontend", "prefill0", "decode0"]),
    ("dep.sh", ["etcd", "nats", "frontend", "worker"]),  # one worker of DP_SIZE (2) data-parallel ranks
])
def test_script_serves_and_sigint_stops_everything_newest_first(launch_env, tmp_path, script, names):
    side_port = free_port_pair()  # each worker's /ready: this port for the first, the next for the second
    launch_env.update(PREFILL_WORKERS="1", DECODE_WORKERS="1", DYN_METRICS_ENDPOINT_PORT=str(side_port))
    out = tmp_path / "out.log"
    with open(out, "wb") as log:
        script_proc = subprocess.Popen(["bash", str(REPO / "launch" / script), "--engine", "mocker"],
                                       env=launch_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "press Ctrl-C" in out.read_text(), 90, f"{script} to get ready")
        assert complete(launch_env["HTTP_PORT"])["choices"][0]["text"]
        pids = started_pids(tmp_path / "run")
        assert list(pids) == names
        for index in range(len(names) - 3):  # after etcd, nats and the frontend
            with urllib.request.urlopen(f"http://127.0.0.1:{side_port + index}/ready", timeout=10) as ready:
                assert ready.status == 200
        script_proc.send_signal(signal.SIGINT)
        assert script_proc.wait(60) == 130
    finally:
        if script_proc.poll() is None:
            script_proc.kill()
    assert all(gone(pid) for pid in pids.values()), out.read_text()
    assert f"stopping {len(names)} process(es)" in out.read_text()
    # Newest first: the worker deregistered while etcd was still up.
    worker_log = (tmp_path / "run" / f"{names[-1]}.log").read_text()
    assert "Traceback" not in worker_log, worker_log


def test_a_worker_that_dies_at_start_fails_the_launch_with_its_log(launch_env, tmp_path):
    launch_env["WORKER_ARGS"] = "--no-such-flag"
    result = subprocess.run(["bash", str(REPO / "launch" / "agg.sh"), "--engine", "mocker", "--timeout", "60"],
                            env=launch_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "worker (pid" in result.stderr and "exited with status 2" in result.stderr
    assert "unrecognized arguments: --no-such-flag" in result.stderr
    assert all(gone(pid) for pid in started_pids(tmp_path / "run").values())


def test_run_asks_one_question_and_once_stops(launch_env, tmp_path):
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "dynamo_lite.launch", "run", "--once", "--engine", "mocker"],
                            env=launch_env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "Q: What is the capital of France?\nA: " in result.stdout
    assert "waiting (up to 600s) for the worker" in result.stderr and "--once: stopping everything" in result.stderr
    assert json.loads((tmp_path / "run" / "answer.json").read_text())["choices"][0]["message"]["content"]
    assert all(gone(pid) for pid in started_pids(tmp_path / "run").values())
    assert time.monotonic() - started < 60
