"""KV-event latency: a batch published by a worker -> applied in the router's index, on each event plane.

For each plane (NATS, then the embedded bus; `--rounds` alternates them), one mocker process with
`--num-workers` simulated workers registers in etcd and relays its KV events; this process runs the
kv router's KvRoutingService on its own bus and records, for every batch it applies,
`time.time() - batch.timestamp` (the worker stamps the batch just before it publishes it; one host,
one clock). Requests with fresh prompts go to the workers over the request plane at `--concurrency`,
so every request stores new blocks (and, once the pool is full, evicts old ones). Prints p50/p99/max
per plane; NATS, the plane used so far, is the baseline.

    .venv/bin/python benchmarks/bench_kv_events.py [--requests 2000] [--concurrency 16] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dynamo_lite import planes  # noqa: E402
from dynamo_lite.discovery.etcd import EtcdDiscovery  # noqa: E402
from dynamo_lite.discovery.watcher import InstanceWatcher  # noqa: E402
from dynamo_lite.protocol.messages import GenerateRequest, SamplingOptions  # noqa: E402
from dynamo_lite.router.kv_router import KvRouter  # noqa: E402
from dynamo_lite.router.kv_routing import KvRoutingService, KvRoutingSettings  # noqa: E402
from dynamo_lite.transport.client import RequestClient  # noqa: E402
from tests.e2e.harness import DEFAULT_MODEL_PATH, ProcGroup, wait_until  # noqa: E402
from tests.services import start_etcd, start_nats  # noqa: E402

MODEL = "bench-kv"
LAGS: list[float] = []  # seconds from publish to applied, of every batch the router applied


def record_lags() -> None:
    """Time every batch KvRouter.apply_batch takes in (what the intake calls per received batch)."""
    apply_batch = KvRouter.apply_batch

    def timed(self, batch):
        result = apply_batch(self, batch)
        LAGS.append(time.time() - batch.timestamp)
        return result

    KvRouter.apply_batch = timed


async def drive(addresses: list[str], requests: int, concurrency: int, prompt_tokens: int) -> None:
    client = RequestClient()
    rng = random.Random(7)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        tokens = [rng.randrange(1, 30000) for _ in range(prompt_tokens)]
        request = GenerateRequest(request_id=uuid.uuid4().hex, token_ids=tokens,
                                  sampling=SamplingOptions(max_tokens=8, ignore_eos=True))
        async with semaphore:
            async for _ in client.stream(addresses[i % len(addresses)], request):
                pass

    try:
        await asyncio.gather(*(one(i) for i in range(requests)))
    finally:
        await client.close()


async def measure(plane: str, bus_url: str, etcd_url: str, args) -> dict:
    namespace = f"bench-{plane}-{uuid.uuid4().hex[:6]}"
    plane_env = ({"NATS_SERVER": bus_url} if plane == "nats"
                 else {"NATS_SERVER": "", "DYN_EVENT_PLANE": "embedded"})
    group = ProcGroup(Path(tempfile.mkdtemp(prefix=f"bench_kv_{plane}_")),
                      {"ETCD_ENDPOINTS": etcd_url, "DYN_LOG": "warning", **plane_env})
    discovery = await EtcdDiscovery.connect(etcd_url)
    watcher = InstanceWatcher(discovery, namespace)
    service = bus = None
    try:
        await watcher.start()
        bus = await planes.connect_event_bus(bus_url, discovery=discovery, namespace=namespace, name="bench")
        service = KvRoutingService(watcher, KvRoutingSettings(namespace=namespace))
        await service.attach_events(bus)
        worker = group.start("mocker", "dynamo_lite.mocker", "--model-path", str(DEFAULT_MODEL_PATH),
                             "--served-model-name", MODEL, "--num-workers", str(args.workers),
                             "--speedup-ratio", "1000", "--namespace", namespace)
        await asyncio.to_thread(wait_until, lambda: len(watcher.instances(MODEL)) == args.workers, 60,
                                "the mocker workers", [worker])
        router = service.router_for(MODEL)
        await asyncio.to_thread(wait_until, lambda: all(router.is_synced(r.instance_id)
                                                        for r in watcher.instances(MODEL)), 30, "the first resync")
        addresses = [r.address for r in watcher.instances(MODEL)]
        await drive(addresses, 50, args.concurrency, args.prompt_tokens)  # warm-up, not counted
        await asyncio.sleep(0.5)
        LAGS.clear()
        started = time.perf_counter()
        await drive(addresses, args.requests, args.concurrency, args.prompt_tokens)
        elapsed = time.perf_counter() - started
        await asyncio.sleep(0.5)  # the last batches in flight
        lags = sorted(LAGS)
        synced = all(router.is_synced(r.instance_id) for r in watcher.instances(MODEL))
        return {"plane": plane, "batches": len(lags), "batches_per_s": len(lags) / elapsed, "synced": synced,
                "p50_ms": 1e3 * statistics.median(lags), "p99_ms": 1e3 * lags[int(0.99 * (len(lags) - 1))],
                "max_ms": 1e3 * lags[-1]}
    finally:
        if service is not None:
            await service.close()
        if bus is not None:
            await bus.close()
        group.stop()
        await watcher.close()
        await discovery.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="simulated workers in the mocker process")
    parser.add_argument("--rounds", type=int, default=1, help="measure each plane this many times, alternating")
    args = parser.parse_args()
    record_lags()
    results = []
    with start_etcd() as etcd, start_nats() as nats:
        for _ in range(args.rounds):
            for plane, url in (("nats", nats.url), ("embedded", "embedded://")):
                results.append(asyncio.run(measure(plane, url, etcd.url, args)))
                r = results[-1]
                print(f"{r['plane']:>9}: {r['batches']} batches ({r['batches_per_s']:.0f}/s), publish -> applied "
                      f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, max {r['max_ms']:.1f} ms"
                      f"{'' if r['synced'] else ' (router NOT in sync at the end)'}", flush=True)
    for plane in ("nats", "embedded"):
        mine = [r for r in results if r["plane"] == plane]
        print(f"{plane:>9} median of rounds: p50 {statistics.median(r['p50_ms'] for r in mine):.2f} ms, "
              f"p99 {statistics.median(r['p99_ms'] for r in mine):.2f} ms")


if __name__ == "__main__":
    main()
