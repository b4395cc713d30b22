"""Chaos under steady streaming load, long faults: the table in benchmarks/README.md.

    .venv/bin/python benchmarks/bench_chaos.py [--stop-seconds 30] [--downtime 5] [--concurrency 8] \
        [--max-tokens 60]

One stack (tests/e2e/chaos.py: its own etcd and nats-server, a kv-mode frontend with default flags, 3
mocker workers, migration limit 3); one fault at a time: a worker SIGKILLed (and started again, as a
supervisor would), a worker SIGSTOPped for --stop-seconds, etcd and NATS down for --downtime seconds,
the frontend SIGKILLed and started again. Prints, per fault, the streams started, completed whole
(finish_reason "length" after exactly max_tokens tokens), failed, and the seconds until every worker
serves again (from the end of the fault; for the frontend from the kill).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.chaos import TABLE_HEADER, ChaosStack, Load, run_scenario  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stop-seconds", type=float, default=30.0)
    parser.add_argument("--downtime", type=float, default=5.0, help="seconds etcd and NATS stay down")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=60)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds of load before and after a fault")
    args = parser.parse_args()

    stack = ChaosStack(Path(tempfile.mkdtemp(prefix="bench-chaos-")))
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
        for name, fault, from_start in scenarios:
            report, outcome = run_scenario(stack, load, name, fault, settle=args.settle, recovery_timeout=120,
                                           recovery_from_start=from_start)
            if from_start:
                report.name += f" ({outcome} in flight)"
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
