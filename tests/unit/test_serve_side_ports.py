"""serve gives each worker process its own side port: the --metrics-endpoint-port (or
DYN_METRICS_ENDPOINT_PORT) given is the first engine's, the next engines get +1 each (serve/side_ports.py)."""

from __future__ import annotations

import os
import sys

import pytest

from dynamo_lite.launch.settings import LaunchSettings
from dynamo_lite.launch.stack import ENGINES, Stack
from dynamo_lite.serve.args import parse_args
from dynamo_lite.serve.placement import Placement
from dynamo_lite.serve.side_ports import ENV
from dynamo_lite.serve.start import EngineSpec, start_workers


class RecordingSupervisor:
    """What Stack.start_worker asks to start, started nowhere."""

    def __init__(self, env: dict[str, str]):
        self.env, self.argvs = env, {}

    def say(self, _: str) -> None:
        pass

    def start(self, name, argv, *, env=None, cpus=None):
        self.argvs[name] = list(argv)


def ports_passed(argv: list[str]) -> dict[str, list[str]]:
    """The side ports each engine's command line gets, from serve's arguments through the Stack."""
    args = parse_args(argv)
    environ = dict(os.environ)
    supervisor = RecordingSupervisor(environ)
    stack = Stack(LaunchSettings.from_env(environ, sys.executable), supervisor, ENGINES["mocker"])
    start_workers(stack, args, [EngineSpec(name, role, Placement(cpus=(i,)))
                                for i, (name, role) in enumerate(args.engine_names())])
    out = {}
    for name, command in supervisor.argvs.items():
        flags = [i for i, a in enumerate(command) if a == "--metrics-endpoint-port"]
        out[name] = [command[i + 1] for i in flags]
    return out


def test_each_worker_gets_the_next_port_after_the_flag_given(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert ports_passed(["--workers", "3", "--metrics-endpoint-port", "9100"]) == {
        "worker0": ["9100"], "worker1": ["9101"], "worker2": ["9102"]}
    assert ports_passed(["--workers", "2", "--", "--metrics-endpoint-port=9100"]) == {
        "worker0": ["9100"], "worker1": ["9101"]}


def test_the_environment_twin_counts_and_the_flag_wins_over_it(monkeypatch):
    monkeypatch.setenv(ENV, "9090")
    assert ports_passed(["--prefill-workers", "1", "--decode-workers", "2"]) == {
        "prefill0": ["9090"], "decode0": ["9091"], "decode1": ["9092"]}
    assert ports_passed(["--workers", "2", "--metrics-endpoint-port", "7000"]) == {
        "worker0": ["7000"], "worker1": ["7001"]}
    # 0 turns the side port off for every worker, also over the environment they inherit.
    assert ports_passed(["--workers", "2", "--metrics-endpoint-port", "0"]) == {
        "worker0": ["0"], "worker1": ["0"]}


def test_no_side_port_given_passes_nothing(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert ports_passed(["--workers", "2"]) == {"worker0": [], "worker1": []}
    assert parse_args(["--workers", "2", "--max-model-len", "64"]).worker_args == ("--max-model-len", "64")


@pytest.mark.parametrize("argv, env, message", [
    (["--metrics-endpoint-port", "x"], None, "--metrics-endpoint-port must be a TCP port, not 'x'"),
    (["--metrics-endpoint-port", "70000"], None, "must be a TCP port (0-65535, 0 = off), not 70000"),
    ([], "nine", f"{ENV} must be a TCP port, not 'nine'"),
    (["--workers", "2", "--metrics-endpoint-port", "65535"], None,
     "--metrics-endpoint-port 65535: 2 workers need ports 65535-65536, past 65535"),
    (["--metrics-endpoint-port"], None, "--metrics-endpoint-port needs a port"),
])
def test_a_bad_side_port_exits_2_with_a_message(argv, env, message, monkeypatch, capsys):
    if env is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, env)
    with pytest.raises(SystemExit) as exited:
        parse_args(["--engine", "mocker", *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
