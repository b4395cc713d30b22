"""KV indexer speed: block events applied per second and find_matches latency for 256-block prompts.

Workload (deterministic): each of N workers stores 64 sequences of 256 blocks that share prefixes of
4 common roots, and continue with blocks of their own. --workload prefixes (default): a root is 256
blocks and a sequence starts with a random-length prefix of one (0-256 blocks), so every worker
matches a query's root part to its own depth (many distinct overlaps); --workload roots: a sequence
starts with a whole root of 16-128 blocks (all workers match the root, one matches the rest). Events
are BlockStored of --event-blocks blocks (default 256: a sequence per event), interleaved across
workers. Queries are stored sequences picked at random.

    python benchmarks/bench_indexer.py            # 8, 64, 256 workers
    python benchmarks/bench_indexer.py --quick    # small run
    python benchmarks/bench_indexer.py --dynamo /tmp/dynvenv/bin/python
        # the same stream through Dynamo's Rust RadixTree, installed in its own venv with
        # python3 -m venv /tmp/dynvenv && /tmp/dynvenv/bin/pip install ai-dynamo-runtime==1.6.1
    --clock cpu measures process CPU time instead of elapsed time: steadier on a busy machine.

Columns: "index" = KvIndexer.apply_event on decoded events; "intake" = msgpack bytes ->
KvRouter.apply_batch (decode + seq check + apply), the analogue of Dynamo's apply_event(bytes).
Dynamo gets JSON bytes (its API) encoded before timing; its find_matches time excludes reading .scores.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time

SEQUENCES_PER_WORKER = 64
SEQUENCE_BLOCKS = 256
ROOTS = 4


def build_workload(workers: int, sequences: int, seed: int, kind: str = "prefixes"):
    """Sequences per worker. Block hashes are random 63-bit ints: opaque and unique, like chained hashes."""
    rng = random.Random(seed)
    if kind == "prefixes":
        roots = [[rng.getrandbits(63) for _ in range(SEQUENCE_BLOCKS)] for _ in range(ROOTS)]
    else:
        roots = [[rng.getrandbits(63) for _ in range(rng.randint(16, 128))] for _ in range(ROOTS)]
    per_worker = []
    for _ in range(workers):
        seqs = []
        for _ in range(sequences):
            root = roots[rng.randrange(ROOTS)]
            shared = rng.randint(0, SEQUENCE_BLOCKS) if kind == "prefixes" else len(root)
            seqs.append(root[:shared] + [rng.getrandbits(63) for _ in range(SEQUENCE_BLOCKS - shared)])
        per_worker.append(seqs)
    return per_worker


def event_rounds(per_worker, event_blocks: int):
    """Yields rounds: a list of (worker_id, parent, hashes) — one event per worker per round."""
    workers = len(per_worker)
    for seq_index in range(len(per_worker[0])):
        for start in range(0, SEQUENCE_BLOCKS, event_blocks):
            round_events = []
            for worker in range(workers):
                seq = per_worker[worker][seq_index]
                parent = seq[start - 1] if start else None
                round_events.append((worker + 1, parent, seq[start:start + event_blocks]))
            yield round_events


def queries(per_worker, count: int, seed: int):
    rng = random.Random(seed + 1)
    return [rng.choice(rng.choice(per_worker)) for _ in range(count)]


def percentiles(samples_ns):
    ordered = sorted(samples_ns)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000  # noqa: E731
    return pick(0.50), pick(0.99)


def clocks(name: str):
    """(seconds clock, nanoseconds clock). "cpu" counts this process's CPU time (all its threads), which
    other load on the machine barely disturbs; "wall" is elapsed time."""
    if name == "cpu":
        return time.process_time, time.process_time_ns
    return time.perf_counter, time.perf_counter_ns


def timed_queries(find, prompts, clock):
    for prompt in prompts[:20]:  # warm-up
        find(prompt)
    samples = []
    for prompt in prompts:
        start = clock()
        find(prompt)
        samples.append(clock() - start)
    return percentiles(samples)


# --------------------------------------------------------------------------- engines


def run_dynamo_lite(workers: int, args) -> dict:
    from dynamo_lite.protocol.messages import BlockStored, KvEventBatch, kv_batch_decoder, msgpack_encoder
    from dynamo_lite.router.indexer import KvIndexer
    from dynamo_lite.router.kv_router import FIRST_SEQ, KvRouter

    clock, clock_ns = clocks(args.clock)
    per_worker = build_workload(workers, args.sequences, args.seed, args.workload)
    index = KvIndexer(block_size=16)
    blocks = 0
    applied_s = 0.0
    for round_events in event_rounds(per_worker, args.event_blocks):
        events = [(w, BlockStored(block_hashes=h, parent_block_hash=p, token_ids=[], block_size=16))
                  for w, p, h in round_events]
        blocks += sum(len(e.block_hashes) for _, e in events)
        start = clock()
        for worker_id, event in events:
            index.apply_event(worker_id, event)
        applied_s += clock() - start
    assert index.dropped_events == 0
    p50, p99 = timed_queries(index.find_matches, queries(per_worker, args.queries, args.seed), clock_ns)
    result = {"workers": workers, "blocks": blocks, "unique": index.block_count(),
              "events_per_s": blocks / applied_s, "p50_us": p50, "p99_us": p99}
    del index
    gc.collect()

    if not args.skip_intake:
        router = KvRouter(16)
        seqs = {}
        intake_s = 0.0
        for round_events in event_rounds(per_worker, args.event_blocks):
            frames = []
            for w, p, h in round_events:
                seq = seqs.get(w, FIRST_SEQ - 1) + 1  # numbered as a worker shell numbers its batches
                seqs[w] = seq
                event = BlockStored(block_hashes=h, parent_block_hash=p, token_ids=[], block_size=16)
                frames.append(msgpack_encoder.encode(KvEventBatch(worker_id=w, seq=seq, events=[event])))
            start = clock()
            for frame in frames:
                router.apply_batch(kv_batch_decoder.decode(frame))
            intake_s += clock() - start
        # Every batch must have been applied, not buffered as if the router had joined mid-stream.
        assert router.indexer.block_count() == result["unique"], "intake run did not apply every event"
        result["intake_per_s"] = blocks / intake_s
    return result


def run_dynamo(workers: int, args) -> dict:
    from dynamo._core import RadixTree  # only in the ai-dynamo-runtime venv

    clock, clock_ns = clocks(args.clock)
    per_worker = build_workload(workers, args.sequences, args.seed, args.workload)
    tree = RadixTree()
    blocks = 0
    applied_s = 0.0
    event_id = 0
    for round_events in event_rounds(per_worker, args.event_blocks):
        frames = []
        for w, p, h in round_events:
            event_id += 1
            data = {"stored": {"parent_hash": p, "blocks": [{"block_hash": x, "tokens_hash": x} for x in h]}}
            frames.append((w, json.dumps({"event_id": event_id, "data": data, "dp_rank": 0}).encode()))
            blocks += len(h)
        start = clock()
        for worker_id, frame in frames:
            tree.apply_event(worker_id, frame)
        applied_s += clock() - start
    p50, p99 = timed_queries(tree.find_matches, queries(per_worker, args.queries, args.seed), clock_ns)
    return {"workers": workers, "blocks": blocks, "events_per_s": blocks / applied_s,
            "p50_us": p50, "p99_us": p99}


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="8 and 64 workers, 16 sequences each, 200 queries")
    parser.add_argument("--workers", type=int, nargs="+", default=None)
    parser.add_argument("--sequences", type=int, default=SEQUENCES_PER_WORKER)
    parser.add_argument("--workload", choices=["prefixes", "roots"], default="prefixes")
    parser.add_argument("--event-blocks", type=int, default=SEQUENCE_BLOCKS)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed time; cpu: process CPU time (steadier on a busy machine)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="runs per engine, alternating; the best figure of each column is kept "
                             "(default 3, quick 1)")
    parser.add_argument("--skip-intake", action="store_true", help="skip the msgpack -> KvRouter column")
    parser.add_argument("--dynamo", metavar="PYTHON", default=os.environ.get("DYNAMO_PYTHON"),
                        help="python of a venv with ai-dynamo-runtime: also run Dynamo's RadixTree")
    parser.add_argument("--engine", choices=["dynamo_lite", "dynamo"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.workers = args.workers or [8, 64]
        args.sequences, args.queries = 16, 200
        args.repeat = args.repeat or 1
    args.workers = args.workers or [8, 64, 256]
    args.repeat = args.repeat or 3

    if args.engine:  # child process: one engine, one worker count, JSON on stdout
        run = run_dynamo if args.engine == "dynamo" else run_dynamo_lite
        print(json.dumps(run(args.workers[0], args)))
        return

    print(f"{args.workload}: {args.sequences} sequences x {SEQUENCE_BLOCKS} blocks per worker, "
          f"{ROOTS} roots, "
          f"{args.event_blocks} blocks per event, {args.queries} queries of {SEQUENCE_BLOCKS} blocks, "
          f"{args.clock} clock, best of {args.repeat}")
    header = (f"{'workers':>7} {'blocks':>9} | {'index M blk/s':>13} {'intake M blk/s':>14} {'p50 us':>7} "
              f"{'p99 us':>7}")
    if args.dynamo:
        header += f" | {'dynamo M blk/s':>14} {'p50 us':>7} {'p99 us':>7}"
    print(header)
    for workers in args.workers:
        # Each run in a fresh process so one run's heap does not slow the next; runs alternate between
        # engines and the best figure of each column is kept, which filters out other load on the box.
        ours, theirs = [], []
        for _ in range(args.repeat):
            ours.append(child(sys.executable, "dynamo_lite", workers, args))
            if args.dynamo:
                theirs.append(child(args.dynamo, "dynamo", workers, args))
        best = best_of(ours)
        line = (f"{workers:>7} {best['blocks']:>9} | {best['events_per_s'] / 1e6:>13.2f} "
                f"{best.get('intake_per_s', 0) / 1e6:>14.2f} {best['p50_us']:>7.1f} {best['p99_us']:>7.1f}")
        if args.dynamo:
            best = best_of(theirs)
            line += f" | {best['events_per_s'] / 1e6:>14.2f} {best['p50_us']:>7.1f} {best['p99_us']:>7.1f}"
        print(line, flush=True)


def best_of(runs: list[dict]) -> dict:
    best = dict(runs[0])
    for key in ("events_per_s", "intake_per_s"):
        if key in best:
            best[key] = max(run[key] for run in runs)
    for key in ("p50_us", "p99_us"):
        best[key] = min(run[key] for run in runs)
    return best


def child(python: str, engine: str, workers: int, args) -> dict:
    command = [python, os.path.abspath(__file__), "--engine", engine, "--workers", str(workers),
               "--sequences", str(args.sequences), "--event-blocks", str(args.event_blocks),
               "--queries", str(args.queries), "--seed", str(args.seed), "--clock", args.clock,
               "--workload", args.workload]
    if args.skip_intake:
        command.append("--skip-intake")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, RUST_LOG="error")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{engine} run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
