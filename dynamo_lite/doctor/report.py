"""The doctor's findings: one Check per thing looked at, printed as a readable report; the exit code is 1
when any check failed (warnings do not fail: a single-host setup without InfiniBand is fine)."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class Status(enum.StrEnum):
    OK = "ok"
    INFO = "info"  # nothing to check here (no GPU, embedded planes): said, not judged
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    area: str  # "discovery", "gpu", "versions", ...
    status: Status
    message: str
    hint: str = ""  # what to do about a warning or failure


def ok(area: str, message: str) -> Check:
    return Check(area, Status.OK, message)


def info(area: str, message: str) -> Check:
    return Check(area, Status.INFO, message)


def warn(area: str, message: str, hint: str = "") -> Check:
    return Check(area, Status.WARN, message, hint)


def fail(area: str, message: str, hint: str = "") -> Check:
    return Check(area, Status.FAIL, message, hint)


_LABEL = {Status.OK: " OK ", Status.INFO: "INFO", Status.WARN: "WARN", Status.FAIL: "FAIL"}


def render(checks: Iterable[Check], title: str) -> str:
    checks = list(checks)
    width = max((len(c.area) for c in checks), default=0)
    lines = [title]
    for c in checks:
        lines.append(f"  [{_LABEL[c.status]}] {c.area:<{width}}  {c.message}")
        if c.hint:
            lines.append(f"  {'':6} {'':<{width}}  -> {c.hint}")
    failed = sum(c.status is Status.FAIL for c in checks)
    warned = sum(c.status is Status.WARN for c in checks)
    lines.append(f"{failed} failed, {warned} warning{'s' if warned != 1 else ''}, "
                 f"{sum(c.status is Status.OK for c in checks)} ok")
    return "\n".join(lines)


def exit_code(checks: Iterable[Check]) -> int:
    return 1 if any(c.status is Status.FAIL for c in checks) else 0
