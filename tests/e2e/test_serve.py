"""`python -m dynamo_lite.serve` with the mocker engine: started as a user starts it, it serves a
request, pins each engine to its own core, prints the URL, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dynamo_lite.launch.supervisor import wait_until
from dynamo_lite.runtime.net import free_tcp_port
from tests.e2e.harness import DEFAULT_MODEL_PATH, REPO, SERVED_MODEL_NAME
from tests.e2e.test_launch_scripts import gone, started_pids


@pytest.fixture
def serve_env(tmp_path: Path) -> dict[str, str]:
    if not (DEFAULT_MODEL_PATH / "config.json").exists():
        pytest.fail(f"default model missing at {DEFAULT_MODEL_PATH}: run scripts/setup.sh")
    env = {k: v for k, v in os.environ.items()
           if k not in ("ETCD_ENDPOINTS", "NATS_SERVER", "DYN_DISCOVERY_DIR", "HTTP_PORT", "DYN_HTTP_PORT")}
    env.update(RUN_DIR=str(tmp_path / "run"), STOP_TIMEOUT="20", PYTHONUNBUFFERED="1")
    return env


def serve(*args: str) -> list[str]:
    return [sys.executable, "-m", "dynamo_lite.serve", *args]


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def group_members(pgids: set[int]) -> list[int]:
    """Live processes in any of these process groups: what a started process left behind (vLLM's
    engine core, say) is still in its group."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] not in ("Z", "X") and int(fields[2]) in pgids:
                members.append(int(entry.name))
    return members


def free_port_run(count: int) -> int:
    """The first of `count` consecutive TCP ports free on every interface right now."""
    for _ in range(50):
        first = free_tcp_port()
        sockets = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("", port))
            return first
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports found")


def ready(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def chat(port: int, question: str, api_key: str | None = None) -> str:
    body = json.dumps({"model": SERVED_MODEL_NAME, "max_tokens": 8,
                       "messages": [{"role": "user", "content": question}]}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers=headers)
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())["choices"][0]["message"]["content"]


def test_two_mocker_workers_serve_on_their_own_cores_and_sigint_stops_every_child(serve_env, tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.fail("this test needs 2 CPU cores")
    port = free_tcp_port()
    # One side port given (as a pod or compose file sets it): each worker gets its own, base + index.
    side = free_port_run(2)
    serve_env["DYN_METRICS_ENDPOINT_PORT"] = str(side)
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(serve("--engine", "mocker", "--workers", "2", "--cpus", "0-1",
                                      "--port", str(port), "--api-key", "k1"),
                                env=serve_env, cwd=REPO, stdout=stdout, stderr=stderr)
    try:
        wait_until(lambda: "press Ctrl-C" in err.read_text(), 90, "serve to get ready", interval=0.2)
        assert f"Serving {SERVED_MODEL_NAME} at http://127.0.0.1:{port}/v1" in out.read_text()
        assert "worker0 (CPU 0)  ready in" in err.read_text()
        assert "worker1 (CPU 1)  ready in" in err.read_text()
        assert f"side ports: worker0 {side}, worker1 {side + 1}" in out.read_text()
        assert ready(side) == ready(side + 1) == 200
        assert chat(port, "What is the capital of France?", api_key="k1")
        with pytest.raises(urllib.error.HTTPError) as refused:  # the frontend got --api-key
            chat(port, "What is the capital of France?")
        assert refused.value.code == 401
        pids = started_pids(tmp_path / "run")
        assert list(pids) == ["worker0", "worker1", "frontend"]  # no etcd, no NATS: the embedded planes
        assert "planes: discovery embedded (no etcd or NATS needed), events embedded" in err.read_text()
        assert os.sched_getaffinity(pids["worker0"]) == {0} and os.sched_getaffinity(pids["worker1"]) == {1}
        for name, index in (("worker0", 0), ("worker1", 1)):
            argv = Path(f"/proc/{pids[name]}/cmdline").read_bytes().split(b"\0")
            assert argv[argv.index(b"--metrics-endpoint-port") + 1] == str(side + index).encode()
        frontend_argv = Path(f"/proc/{pids['frontend']}/cmdline").read_bytes().split(b"\0")
        assert frontend_argv[frontend_argv.index(b"--router-mode") + 1] == b"kv"
        assert frontend_argv[frontend_argv.index(b"--api-key") + 1] == b"k1"
        # One private discovery directory for every child, removed at exit.
        discovery_dirs = {environ(pid)["DYN_DISCOVERY_DIR"] for name, pid in pids.items()}
        assert len(discovery_dirs) == 1 and os.path.isdir(next(iter(discovery_dirs)))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert all(gone(pid) for pid in pids.values()), err.read_text()
    assert group_members(set(pids.values())) == []
    assert not os.path.exists(next(iter(discovery_dirs)))
    assert f"stopping {len(pids)} process(es)" in err.read_text()


def test_children_stop_when_serve_itself_is_killed(serve_env, tmp_path):
    """SIGKILL gives serve no chance to stop its children: the kernel sends them SIGTERM instead."""
    port = free_tcp_port()
    err = tmp_path / "err.log"
    with open(err, "wb") as stderr:
        proc = subprocess.Popen(serve("--engine", "mocker", "--workers", "1", "--port", str(port)),
                                env=serve_env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_until(lambda: "press Ctrl-C" in err.read_text(), 90, "serve to get ready", interval=0.2)
        pids = started_pids(tmp_path / "run")
        proc.kill()
        proc.wait(10)
        wait_until(lambda: all(gone(pid) for pid in pids.values()), 60, "serve's children to stop", interval=0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert group_members(set(pids.values())) == []


def test_ask_once_answers_and_exits_0(serve_env, tmp_path):
    serve_env["DYN_API_KEY"] = "from-env"  # the frontend's env twin: --ask sends that key
    result = subprocess.run(serve("--engine", "mocker", "--ask", "What is the capital of France?", "--once",
                                  "--port", str(free_tcp_port())),
                            env=serve_env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "Q: What is the capital of France?\nA: " in result.stdout
    assert "--once: stopping everything" in result.stderr
    assert all(gone(pid) for pid in started_pids(tmp_path / "run").values())


def test_too_few_cores_is_a_clear_error_before_anything_starts(serve_env, tmp_path):
    result = subprocess.run(serve("--engine", "mocker", "--workers", "3", "--cpus", "0-1"),
                            env=serve_env, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "3 engines (worker0, worker1, worker2) need 3 CPU cores, one each, but this process may use " \
           "2 (0-1)" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "argument --workers: must be at least 1 (got 0)"),
    (["--prefill-workers", "1"], "needs both --prefill-workers and --decode-workers"),
])
def test_bad_arguments_exit_2_with_a_message(serve_env, args, message):
    result = subprocess.run(serve("--engine", "mocker", *args), env=serve_env, cwd=REPO, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 2 and message in result.stderr and "usage:" in result.stderr


def test_a_worker_that_refuses_its_arguments_exits_2_and_stops_everything(serve_env, tmp_path):
    result = subprocess.run(serve("--engine", "mocker", "--no-such-flag", "--port", str(free_tcp_port())),
                            env=serve_env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert "worker0 refused its arguments" in result.stderr
    assert "unrecognized arguments: --no-such-flag" in result.stderr
    assert all(gone(pid) for pid in started_pids(tmp_path / "run").values())


def test_disaggregated_mocker_prefill_and_decode_workers_answer(serve_env, tmp_path):
    port = free_tcp_port()
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(serve("--engine", "mocker", "--prefill-workers", "1", "--decode-workers", "1",
                                      "--port", str(port), "--enforce-disagg",
                                      "--disagg-min-prefill-tokens", "0"),
                                env=serve_env, cwd=REPO, stdout=stdout, stderr=stderr)
    try:
        wait_until(lambda: "press Ctrl-C" in err.read_text(), 90, "serve to get ready", interval=0.2)
        assert "1 prefill + 1 decode workers (NIXL)" in out.read_text()
        assert chat(port, "What is the capital of France?")
        pids = started_pids(tmp_path / "run")
        assert list(pids) == ["prefill0", "decode0", "frontend"]  # no etcd, no NATS: the embedded planes
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        disagg = [line for line in metrics.splitlines()
                  if line.startswith("dynamo_lite_frontend_disagg_requests_total{")
                  and 'mode="disaggregated"' in line]
        assert disagg and float(disagg[0].rsplit(" ", 1)[1]) == 1.0, metrics  # prefilled on prefill0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
    assert all(gone(pid) for pid in pids.values()), err.read_text()
