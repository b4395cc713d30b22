"""Start processes, wait for them with a bound, stop them by pid: the one supervisor the launch
scripts, scripts/run.sh, scripts/pd_smoke.py and the tests share.

Every process runs in its own session with its output in a log file. Its own session means a Ctrl-C
in the terminal reaches only the launcher, which then stops the processes in order, and a final
SIGKILL of the process group also reaches the children a process leaves behind (a vLLM worker's
engine core). A supervisor made with die_with_parent (serve and the launch module) also has the kernel
send its children SIGTERM when the launcher itself dies, even by SIGKILL, so nothing is orphaned.
A wait that fails, because its bound passed or because a watched process died, raises
`LaunchError` with the process's name, pid, exit status and the tail of its log.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dynamo_lite.protocol.errors import DynamoLiteError

LOG_TAIL_LINES = 25
POLL_INTERVAL = 0.2
# Long enough for a worker to deregister and stop an idle engine; the launch scripts use STOP_TIMEOUT (45 s)
# so that in-flight requests can drain too.
DEFAULT_STOP_TIMEOUT = 20.0


class LaunchError(DynamoLiteError):
    """A process did not start, died, or did not get ready in time (the message says which)."""


def _quiet(message: str) -> None:
    pass


class Process:
    """One started process: its name, pid, log file, and how to stop it."""

    def __init__(self, name: str, argv: Sequence[str], popen: subprocess.Popen, log_path: Path):
        self.name = name
        self.argv = list(argv)
        self.popen = popen
        self.log_path = log_path

    def __repr__(self) -> str:
        return f"Process({self.name!r}, pid={self.pid})"

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def describe_exit(self) -> str:
        """'NAME (pid N) exited with status S; last lines of LOG:' and the indented tail."""
        tail = "\n".join(f"    {line}" for line in self.log_tail().splitlines())
        return f"{self.name} (pid {self.pid}) exited with status {self.returncode}; " \
               f"last lines of {self.log_path}:\n{tail}"

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT, *, say: Callable[[str], None] = _quiet,
             hurry: Callable[[], bool] = lambda: False) -> None:
        """SIGTERM, wait up to `timeout` s (less if `hurry()` turns true), then SIGKILL the whole
        process group so children left behind go too. Returns once the process is reaped."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.alive() and time.monotonic() < deadline and not hurry():
                time.sleep(0.1)
            if self.alive():
                say(f"{self.name} (pid {self.pid}) still running after "
                    f"{'a second signal' if hurry() else f'{timeout:g}s'}: KILL")
        self._kill_group()

    def kill(self) -> None:
        """SIGKILL this process alone (it gets no chance to clean up, e.g. to deregister)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
            self.popen.wait(10)

    def _kill_group(self) -> None:
        # The group id is the pid we started (own session), so this reaches only our own processes.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)


PR_SET_PDEATHSIG = 1  # prctl(2)


def _terminate_with_parent() -> Callable[[], None]:
    """A preexec_fn: the child gets SIGTERM (and drains as on Ctrl-C) when the thread that started it
    dies. Built in the parent, so the child between fork and exec only makes two system calls."""
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def set_death_signal() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return set_death_signal


def start_process(name: str, argv: Sequence[str], log_path: Path, *, env: Mapping[str, str] | None = None,
                  cwd: str | Path | None = None, cpus: Iterable[int] | None = None,
                  die_with_parent: bool = False) -> Process:
    """Start `argv` in its own session, stdout and stderr appended to `log_path`, stdin closed.
    `env` replaces the environment when given; `cpus` pins the process (and what it starts later).
    `die_with_parent` (Linux): SIGTERM it when the calling thread dies; only for a caller that starts
    processes from its main thread and lives as long as they should."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    preexec = _terminate_with_parent() if die_with_parent and sys.platform == "linux" else None
    with open(log_path, "ab") as log:
        try:
            popen = subprocess.Popen(list(argv), cwd=cwd, env=None if env is None else dict(env),
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=preexec)
        except OSError as e:
            raise LaunchError(f"cannot start {name} ({argv[0]}): {e}") from e
    proc = Process(name, argv, popen, log_path)
    if cpus is not None:
        try:
            # Popen returns once the program is exec'd, before it starts threads of its own.
            os.sched_setaffinity(proc.pid, set(cpus))
        except OSError as e:
            proc.stop(0)
            raise LaunchError(f"cannot pin {name} to CPUs {sorted(set(cpus))}: {e}") from e
    return proc


def wait_until(check: Callable[[], Any], timeout: float, what: str, watch: Iterable[Process] = (),
               interval: float = POLL_INTERVAL) -> Any:
    """Poll `check` until it returns something truthy, and return that. Raise LaunchError if `timeout`
    seconds pass first or a process in `watch` exits meanwhile (an error in `check` counts as not yet:
    what it polls may not be up)."""
    watch = list(watch)
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        for proc in watch:
            if not proc.alive():
                raise LaunchError(f"while waiting for {what}: {proc.describe_exit()}")
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - the thing polled may not answer yet
            last_error = e
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    tails = "".join(f"\n--- last lines of {p.log_path} ({p.name}, pid {p.pid}) ---\n{p.log_tail()}" for p in watch)
    last = f" (last error: {last_error})" if last_error else ""
    raise LaunchError(f"timed out after {timeout:g}s waiting for {what}{last}{tails}")


# --- readiness checks ------------------------------------------------------------------------------------

def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_get(url: str, timeout: float = 2.0, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    """(status, body) of a GET (an https:// one verified with `context`); status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, urllib.error.URLError):
        return 0, b""


def http_ok(url: str, timeout: float = 2.0, context: ssl.SSLContext | None = None) -> bool:
    """True if a GET of `url` answers 2xx."""
    return 200 <= http_get(url, timeout, context)[0] < 300


# --- a group of processes ----------------------------------------------------------------------------------

class Supervisor:
    """The processes of one run: started in order, stopped newest first (workers deregister while
    etcd is still up), never left behind. Use it as a context manager, or call stop_all()."""

    def __init__(self, run_dir: Path, *, stop_timeout: float, env: Mapping[str, str] | None = None,
                 say: Callable[[str], None] = _quiet, die_with_parent: bool = False):
        self.run_dir = Path(run_dir)
        self.die_with_parent = die_with_parent  # see start_process
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stop_timeout = stop_timeout
        self.env = dict(os.environ if env is None else env)
        self.say = say
        self.procs: list[Process] = []
        self._hurry = False

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    def start(self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: str | Path | None = None, cpus: Iterable[int] | None = None) -> Process:
        """Start `argv` with the supervisor's environment plus `env`, logging to RUN_DIR/NAME.log."""
        proc = start_process(name, argv, self.run_dir / f"{name}.log", env={**self.env, **(env or {})},
                             cwd=cwd, cpus=cpus, die_with_parent=self.die_with_parent)
        self.procs.append(proc)
        with open(self.run_dir / "pids", "a") as pids:
            pids.write(f"{proc.pid} {name}\n")
        self.say(f"started {name} (pid {proc.pid}, log {proc.log_path})")
        return proc

    def wait_until(self, check: Callable[[], Any], timeout: float, what: str,
                   watch: Iterable[Process] | None = None) -> Any:
        """`wait_until` watching the given processes (all of this supervisor's when None)."""
        return wait_until(check, timeout, what, self.procs if watch is None else watch)

    def wait_any(self, interval: float = 0.5) -> Process:
        """Block until one of the processes exits; return it."""
        while True:
            for proc in self.procs:
                if not proc.alive():
                    return proc
            time.sleep(interval)

    def hurry(self) -> None:
        """Cut the remaining graceful waits of a stop_all() short (a second Ctrl-C)."""
        self._hurry = True

    def stop_all(self) -> None:
        """Stop every process, newest first: SIGTERM, then SIGKILL of its group after stop_timeout."""
        procs, self.procs = self.procs, []
        if not procs:
            return
        self.say(f"stopping {len(procs)} process(es)")
        for proc in reversed(procs):
            try:
                proc.stop(self.stop_timeout, say=self.say, hurry=lambda: self._hurry)
            except BaseException:
                # Interrupted mid-stop: the rest must still go, at once.
                for rest in procs:
                    rest._kill_group()
                raise
        self.say(f"stopped; logs are in {self.run_dir}")
