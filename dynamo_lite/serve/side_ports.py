"""Side ports of serve's workers (--metrics-endpoint-port, or DYN_METRICS_ENDPOINT_PORT).

Every worker process binds its own side port, and serve starts several on one host: passing them all the
same port would stop the second at start. serve takes the port given as the first one and gives each
engine, in start order (prefill before decode), the next: worker0 BASE, worker1 BASE+1, ... Each worker is
passed its port as a flag, which wins over the environment twin it inherits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

FLAG = "--metrics-endpoint-port"
ENV = "DYN_METRICS_ENDPOINT_PORT"
MAX_PORT = 65535


def pop_side_port(worker_args: Sequence[str], env: Mapping[str, str]) -> tuple[int | None, list[str]]:
    """(the base side port, the worker arguments without its flag). The last flag given wins, then the
    environment; None when neither is given (the workers are passed nothing). ValueError for a value that
    is not a port."""
    rest: list[str] = []
    given: str | None = None
    args = list(worker_args)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == FLAG:
            if i + 1 >= len(args):
                raise ValueError(f"{FLAG} needs a port")
            given, i = args[i + 1], i + 2
            continue
        if arg.startswith(FLAG + "="):
            given = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    source = FLAG
    if given is None and env.get(ENV, "").strip():
        given, source = env[ENV].strip(), ENV
    if given is None:
        return None, rest
    try:
        port = int(given)
    except ValueError:
        raise ValueError(f"{source} must be a TCP port, not {given!r}") from None
    if not 0 <= port <= MAX_PORT:
        raise ValueError(f"{source} must be a TCP port (0-{MAX_PORT}, 0 = off), not {port}")
    return port, rest


def check_room(base: int, engines: int) -> None:
    """ValueError when the engines' ports base .. base+engines-1 do not all fit below 65536."""
    if base and base + engines - 1 > MAX_PORT:
        raise ValueError(f"{FLAG} {base}: {engines} workers need ports {base}-{base + engines - 1}, "
                         f"past {MAX_PORT}")


def side_port_args(base: int | None, index: int) -> list[str]:
    """The flag for the index-th engine (in start order): none when no port was given, 0 (off) for all
    when 0 was given."""
    if base is None:
        return []
    return [FLAG, str(base + index if base else 0)]
