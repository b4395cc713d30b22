"""The progress display while engines load: one line per engine, "loading… 12s" until it serves, then
"ready in 38s".

On a terminal the lines are redrawn in place; otherwise (a log file, a pipe) each change is one plain
line, and engines still loading are listed again every `interval` seconds so that a log shows life.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TextIO


class Progress:
    def __init__(self, names: Sequence[str], details: Sequence[str] = (), *, stream: TextIO | None = None,
                 tty: bool | None = None, clock: Callable[[], float] = time.monotonic, interval: float = 30.0,
                 started: float | None = None):
        """`started`: when the engines were started (a `clock()` value; default now)."""
        self.names = list(names)
        self.details = dict(zip(self.names, details))  # e.g. "CPU 0" per engine
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self.interval = interval
        self.started = clock() if started is None else started
        self.ready_at: dict[str, float] = {}
        self._drawn = False
        self._last_plain = self.started

    def _line(self, name: str, now: float) -> str:
        width = max(map(len, self.names))
        where = f" ({self.details[name]})" if name in self.details else ""
        if name in self.ready_at:
            state = f"ready in {self.ready_at[name] - self.started:.0f}s"
        else:
            state = f"loading… {now - self.started:.0f}s"
        return f"  {name:<{width}}{where}  {state}"

    def update(self, ready: Iterable[str]) -> None:
        """Record which engines serve now and redraw (terminal) or print what changed (plain)."""
        now, ready = self.clock(), set(ready)
        newly = [n for n in self.names if n in ready and n not in self.ready_at]
        for name in newly:
            self.ready_at[name] = now
        if self.tty:
            if self._drawn:
                self.stream.write(f"\x1b[{len(self.names)}F")  # back to the first engine's line
            self.stream.write("".join(f"\x1b[2K{self._line(n, now)}\n" for n in self.names))
        elif not self._drawn:
            self.stream.write("".join(f"{self._line(n, now)}\n" for n in self.names))
        else:
            lines = [self._line(n, now) for n in newly]
            if now - self._last_plain >= self.interval:
                lines += [self._line(n, now) for n in self.names if n not in self.ready_at]
                self._last_plain = now
            self.stream.write("".join(f"{line}\n" for line in lines))
        self._drawn = True
        self.stream.flush()

    @property
    def done(self) -> bool:
        return len(self.ready_at) == len(self.names)
