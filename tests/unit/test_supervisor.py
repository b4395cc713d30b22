"""The process supervisor: start, wait with a bound, stop by pid, nothing left behind."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from dynamo_lite.launch.supervisor import (LaunchError, Supervisor, http_ok, port_open, start_process,
                                           wait_until)
from dynamo_lite.runtime.net import free_tcp_port

LISTENER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
print("listening", flush=True)
time.sleep(600)
"""

# Records its SIGTERM in a file, then exits: shows the order a group is stopped in.
RECORDS_TERM = """
import signal, sys, time
def on_term(*_):
    open(sys.argv[1], "a").write(sys.argv[2] + "\\n"); sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("up", flush=True)
time.sleep(600)
"""

IGNORES_TERM = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ignoring SIGTERM", flush=True)
time.sleep(600)
"""

# Leaves a child behind in its process group (as a vLLM worker leaves its engine core), then exits on TERM.
WITH_CHILD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time, signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(600)
"""


def gone(pid: int) -> bool:
    """True once `pid` no longer runs (a zombie counts as gone: it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def py(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def test_start_wait_ready_stop(tmp_path: Path):
    port = free_tcp_port()
    with Supervisor(tmp_path, stop_timeout=5) as sup:
        proc = sup.start("listener", py(LISTENER, str(port)))
        sup.wait_until(lambda: port_open("127.0.0.1", port), 10, f"port {port}")
        assert proc.alive() and "listening" in proc.log_tail()
        assert (tmp_path / "pids").read_text() == f"{proc.pid} listener\n"
    assert gone(proc.pid) and not port_open("127.0.0.1", port)


def test_early_exit_names_the_process_and_its_log_tail(tmp_path: Path):
    with Supervisor(tmp_path, stop_timeout=5) as sup:
        proc = sup.start("crasher", py("import sys; print('cannot bind port 1234'); sys.exit(3)"))
        with pytest.raises(LaunchError) as err:
            sup.wait_until(lambda: False, 10, "the crasher to listen")
    message = str(err.value)
    assert f"crasher (pid {proc.pid}) exited with status 3" in message
    assert "cannot bind port 1234" in message and str(proc.log_path) in message


def test_not_ready_in_time_gives_the_bound_and_log_tail(tmp_path: Path):
    with Supervisor(tmp_path, stop_timeout=5) as sup:
        proc = sup.start("sleeper", py("print('still loading', flush=True); import time; time.sleep(600)"))
        started = time.monotonic()
        with pytest.raises(LaunchError) as err:
            sup.wait_until(lambda: http_ok(f"http://127.0.0.1:{free_tcp_port()}/"), 1, "the sleeper's HTTP")
        assert time.monotonic() - started < 5
    assert "timed out after 1s waiting for the sleeper's HTTP" in str(err.value)
    assert "still loading" in str(err.value)
    assert gone(proc.pid)


def test_a_process_that_ignores_sigterm_is_killed_after_the_timeout(tmp_path: Path):
    said: list[str] = []
    sup = Supervisor(tmp_path, stop_timeout=1.0, say=said.append)
    proc = sup.start("stubborn", py(IGNORES_TERM))
    sup.wait_until(lambda: "ignoring" in proc.log_tail(), 10, "the handler")
    started = time.monotonic()
    sup.stop_all()
    took = time.monotonic() - started
    assert gone(proc.pid) and proc.returncode == -9
    assert 1.0 <= took < 4.0
    assert any("stubborn" in line and "still running after 1s: KILL" in line for line in said)


def test_stop_all_goes_newest_first(tmp_path: Path):
    record = tmp_path / "order"
    sup = Supervisor(tmp_path, stop_timeout=5)
    procs = [sup.start(name, py(RECORDS_TERM, str(record), name)) for name in ("etcd", "frontend", "worker")]
    for proc in procs:
        sup.wait_until(lambda p=proc: "up" in p.log_tail(), 10, f"{proc.name} up")
    sup.stop_all()
    assert record.read_text().split() == ["worker", "frontend", "etcd"]
    assert all(gone(p.pid) for p in procs)


def test_children_left_in_the_process_group_are_killed(tmp_path: Path):
    child_file = tmp_path / "child"
    sup = Supervisor(tmp_path, stop_timeout=5)
    proc = sup.start("parent", py(WITH_CHILD, str(child_file)))
    child = int(wait_until(lambda: child_file.exists() and child_file.read_text(), 10, "the child"))
    assert not gone(child)
    sup.stop_all()
    deadline = time.monotonic() + 5
    while not gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(proc.pid) and gone(child)


def test_wait_any_returns_the_process_that_exited(tmp_path: Path):
    with Supervisor(tmp_path, stop_timeout=5) as sup:
        sup.start("long", py("import time; time.sleep(600)"))
        short = sup.start("short", py("import time; time.sleep(0.3)"))
        assert sup.wait_any(interval=0.05) is short


def test_cpu_pin(tmp_path: Path):
    cpu = min(os.sched_getaffinity(0))
    proc = start_process("pinned", py("import time; time.sleep(600)"), tmp_path / "pinned.log", cpus=[cpu])
    try:
        assert os.sched_getaffinity(proc.pid) == {cpu}
    finally:
        proc.stop(5)
    assert gone(proc.pid)


def test_a_missing_program_is_a_launch_error(tmp_path: Path):
    with pytest.raises(LaunchError, match="cannot start nothing-here"):
        start_process("nothing-here", ["/nonexistent/program"], tmp_path / "x.log")


def test_hurry_cuts_the_graceful_wait_short(tmp_path: Path):
    """A second Ctrl-C during the stop: what is left is killed at once, not after stop_timeout."""
    import threading

    sup = Supervisor(tmp_path, stop_timeout=60)
    proc = sup.start("stubborn", py(IGNORES_TERM))
    sup.wait_until(lambda: "ignoring" in proc.log_tail(), 10, "the handler")
    threading.Timer(0.5, sup.hurry).start()
    started = time.monotonic()
    sup.stop_all()
    assert gone(proc.pid) and time.monotonic() - started < 5
