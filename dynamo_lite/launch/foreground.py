"""Run a group of supervised processes in the foreground until one exits or a signal comes.

Shared by `python -m dynamo_lite.launch` and `python -m dynamo_lite.serve`: both start their processes,
then wait, then stop everything newest first, and exit with the same statuses.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable

from dynamo_lite.launch.supervisor import LaunchError, Supervisor


def say(message: str) -> None:
    """A launcher's own line on stderr, time-stamped."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_foreground(sup: Supervisor, start: Callable[[], bool]) -> int:
    """Call `start()` (it starts the processes and waits until they serve; False: nothing left to serve,
    e.g. --once), then watch the processes until one exits or SIGINT/SIGTERM comes, and stop them all.

    Returns 0 when start() returned False, 128 + the signal's number after SIGINT (130) or SIGTERM (143),
    else 1 (a LaunchError, or a process exited); a LaunchError may carry its own `exit_status`. A second
    signal while stopping kills what is left at once.
    """
    def on_signal(signum, frame):
        raise SystemExit(128 + signum)

    def on_signal_while_stopping(signum, frame):
        sup.say("second signal: killing what is left now")
        sup.hurry()

    # SIGINT too: its default (KeyboardInterrupt) could land inside a wait and print a traceback.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    status = 1
    try:
        if not start():
            return 0
        sup.say(f"press Ctrl-C to stop everything (or: kill {os.getpid()})")
        dead = sup.wait_any()
        sup.say(dead.describe_exit())
    except LaunchError as e:
        sup.say(f"error: {e}")
        status = getattr(e, "exit_status", 1)
    except SystemExit as e:
        status = e.code
    finally:
        for sig in previous:
            signal.signal(sig, on_signal_while_stopping)
        try:
            sup.stop_all()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return status
