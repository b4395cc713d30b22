"""Chaos under steady streaming load (tests/e2e/chaos.py): one stack, one fault at a time.

Goals asserted: no stream is lost to a killed or a stopped (hung) worker, nor to an etcd or NATS
restart; a frontend restart loses only the streams in flight on it; every worker serves again without a
restart by hand. Short faults keep the module near a minute; benchmarks/bench_chaos.py runs long ones.
"""

from __future__ import annotations

import pytest

from tests.e2e.chaos import TABLE_HEADER, ChaosStack, Load, run_scenario

# Longer than the frontend's default --heartbeat-timeout (5 s) plus a stream's own ~1 s: the stopped
# worker's streams must be failed over while it is still stopped, not wait for SIGCONT. A short
# --failed-cooldown lets it back in soon after.
STOP_SECONDS = 10.0
SETTLE = 1.5
RECOVERY_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def chaos(tmp_path_factory):
    stack = ChaosStack(tmp_path_factory.mktemp("chaos"), frontend_args=("--failed-cooldown", "2"))
    stack.start()
    load = Load(stack.base_url, concurrency=6, max_tokens=40)
    try:
        load.start()
        yield stack, load
    finally:
        load.stop()
        stack.close()


@pytest.mark.parametrize("scenario", ["worker SIGKILL", "worker SIGSTOP", "etcd restart", "NATS restart"])
def test_no_stream_is_lost(chaos, scenario):
    stack, load = chaos
    fault = {"worker SIGKILL": stack.kill_worker,
             "worker SIGSTOP": lambda: stack.stop_worker(STOP_SECONDS),
             "etcd restart": lambda: stack.restart_etcd(1.0),
             "NATS restart": lambda: stack.restart_nats(1.0)}[scenario]
    migrations = stack.migrations()
    report, _ = run_scenario(stack, load, scenario, fault, settle=SETTLE, recovery_timeout=RECOVERY_TIMEOUT)
    print(f"\n{TABLE_HEADER}\n{report.row()}")
    assert report.started >= 10, report  # the load ran across the fault
    if "worker" in scenario:  # the fault hit streams mid-way, and they moved
        assert stack.migrations() > migrations
    if scenario == "worker SIGSTOP":  # detected while still stopped: no stream waited for SIGCONT
        assert report.longest_s < STOP_SECONDS - 1.0, report
    assert report.failed == 0 and report.whole == report.started, report.errors


def test_a_frontend_restart_loses_only_its_own_streams(chaos):
    stack, load = chaos
    report, in_flight = run_scenario(stack, load, "frontend restart", lambda: stack.restart_frontend(load),
                                     settle=SETTLE, recovery_timeout=RECOVERY_TIMEOUT,
                                     recovery_from_start=True)
    print(f"\n{TABLE_HEADER}\n{report.row()}")
    assert report.started > in_flight, report  # streams ran on the new frontend too
    assert report.failed <= in_flight, report.errors
    assert report.whole == report.started - report.failed
