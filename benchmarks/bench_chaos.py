"""Chaos under steady streaming load, long faults: the table in benchmarks/README.md.

    .venv/bin/python benchmarks/bench_chaos.py [--stop-seconds 30] [--downtime 5] [--cut-seconds 7 15] \
        [--concurrency 8] [--max-tokens 60]

One stack (tests/e2e/chaos.py: its own etcd and nats-server, a kv-mode frontend with default flags, 3
mocker workers, migration limit 3, one of them on a host of its own: a network namespace, when run as
root with `ip netns`); one fault at a time: a worker SIGKILLed (and started again, as a supervisor
would), a worker SIGSTOPped for --stop-seconds, etcd and NATS down for --downtime seconds, the frontend
SIGKILLed and started again, the worker host's network cut for each of --cut-seconds (shorter and longer
than the 10 s lease). Prints, per fault, the streams started, completed whole (finish_reason "length"
after exactly max_tokens tokens), failed, and the seconds until every worker serves again (from the end
of the fault; for the frontend from the kill).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.chaos import TABLE_HEADER, ChaosStack, Load, netns_unavailable, run_scenario  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stop-seconds", type=float, default=30.0)
    parser.add_argument("--downtime", type=float, default=5.0, help="seconds etcd and NATS stay down")
    parser.add_argument("--cut-seconds", type=float, nargs="*", default=[7.0, 15.0],
                        help="seconds the worker host's network stays cut, one fault each (none: skip)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=60)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds of load before and after a fault")
    args = parser.parse_args()

    no_netns = netns_unavailable() if args.cut_seconds else "not asked for"
    if no_netns:
        print(f"no network cut: {no_netns}", flush=True)
    stack = ChaosStack(Path(tempfile.mkdtemp(prefix="bench-chaos-")), remote_worker=no_netns is None)
    stack.start()
    load = Load(stack.base_url, concurrency=args.concurrency, max_tokens=args.max_tokens)
    reports = []
    began = time.monotonic()
    try:
        load.start()
        scenarios = [
            ("worker SIGKILL", stack.kill_worker, False),
            (f"worker SIGSTOP {args.stop_seconds:g} s", lambda: stack.stop_worker(args.stop_seconds), False),
            (f"etcd down {args.downtime:g} s", lambda: stack.restart_etcd(args.downtime), False),
            (f"NATS down {args.downtime:g} s", lambda: stack.restart_nats(args.downtime), False),
            ("frontend SIGKILL + restart", lambda: stack.restart_frontend(load), True),
        ]
        if stack.host is not None:
            scenarios += [(f"network cut {cut:g} s", lambda cut=cut: stack.cut_network(cut), False)
                          for cut in args.cut_seconds]
        for name, fault, from_start in scenarios:
            remote_ids = stack.remote_instance_ids() if stack.host is not None else set()
            report, outcome = run_scenario(stack, load, name, fault, settle=args.settle, recovery_timeout=120,
                                           recovery_from_start=from_start)
            if from_start:
                report.name += f" ({outcome} in flight)"
            if name.startswith("network cut"):
                same = stack.remote_instance_ids() == remote_ids
                report.name += " (lease kept, re-admitted)" if same else " (lease expired, re-registered)"
            reports.append(report)
            print(report.row(), flush=True)
            for error in report.errors:
                print(f"    {error}")
    finally:
        load.stop()
        stack.close()
    print(f"\n{TABLE_HEADER}")
    for report in reports:
        print(report.row())
    print(f"\n{sum(r.started for r in reports)} streams in {time.monotonic() - began:.0f} s; "
          f"concurrency {args.concurrency}, max_tokens {args.max_tokens}")


if __name__ == "__main__":
    main()
