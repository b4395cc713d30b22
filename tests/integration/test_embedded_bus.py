"""EmbeddedEventBus beyond the EventBus contract (test_event_bus.py): its discovery record, reconnects to
peers that restart or drop the connection, across processes over etcd, and a slow peer that must not
block the publisher."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import textwrap
import uuid

import pytest

from dynamo_lite.discovery.memory import MemoryDiscovery
from dynamo_lite.events.embedded import EmbeddedEventBus
from dynamo_lite.protocol import keys
from dynamo_lite.protocol.messages import msgpack_encoder
from dynamo_lite.protocol.peer_messages import PeerHello, endpoint_json_decoder
from dynamo_lite.transport.framing import encode_frame
from tests.integration.test_event_bus import receive

WAIT = 10.0


@contextlib.asynccontextmanager
async def buses(count: int, discovery=None, namespace: str | None = None, **options):
    discovery = discovery or MemoryDiscovery()
    namespace = namespace or f"ns{uuid.uuid4().hex[:6]}"
    started = []
    try:
        for _ in range(count):
            started.append(await EmbeddedEventBus.connect(discovery, namespace=namespace, **options))
        yield started
    finally:
        for bus in started:
            await bus.close()
        await discovery.close()


async def received_within(subscription, timeout: float) -> list[bytes]:
    """The one message that arrives within timeout, or []."""
    with contextlib.suppress(TimeoutError):
        return await receive(subscription, 1, timeout)
    return []


async def wait_until(predicate, what: str, timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_a_bus_records_its_address_under_a_lease_and_removes_it_on_close():
    discovery = MemoryDiscovery()
    async with buses(1, discovery, namespace="ns1") as (bus,):
        items, _ = await discovery.get_prefix(keys.event_endpoints_prefix("ns1"))
        assert [key for key, _ in items] == [keys.event_endpoint_key("ns1", bus.bus_id)]
        endpoint = endpoint_json_decoder.decode(items[0][1])
        assert (endpoint.bus_id, endpoint.host) == (bus.bus_id, "127.0.0.1") and endpoint.port > 0
        assert discovery._data[items[0][0]][1] != 0  # attached to a lease
        await bus.close()
        assert (await discovery.get_prefix(keys.event_endpoints_prefix("ns1")))[0] == []


async def test_buses_of_other_namespaces_do_not_meet():
    discovery = MemoryDiscovery()
    async with buses(1, discovery, namespace="a") as (a,), buses(1, discovery, namespace="b") as (b,):
        sub = await a.subscribe("x")
        await b.publish("x", b"other namespace")
        assert await received_within(sub, 0.5) == []
        assert not a._links and not b._links


async def test_a_restarted_publisher_is_linked_again():
    discovery = MemoryDiscovery()
    async with buses(1, discovery, namespace="ns") as (consumer,):
        sub = await consumer.subscribe("kv")
        for life in range(3):  # each life is a new bus (a new process), as after a worker restart
            publisher = await EmbeddedEventBus.connect(discovery, namespace="ns")
            await publisher.serve("resync", lambda data, life=life: asyncio.sleep(0, b"life %d" % life))
            await publisher.publish("kv", b"life %d" % life)
            assert await receive(sub, 1, timeout=5) == [b"life %d" % life]
            assert await consumer.request("resync", b"?", timeout=5) == b"life %d" % life
            await publisher.close()
            await wait_until(lambda: not consumer._links, "the consumer to forget the closed publisher")


async def test_a_dropped_connection_is_redialled_and_the_subscriptions_sent_again():
    async with buses(2) as (publisher, consumer):
        sub = await consumer.subscribe("kv")
        await publisher.publish("kv", b"before")
        assert await receive(sub, 1, timeout=5) == [b"before"]
        for writer in list(publisher._subscribers):  # as a network blip would: the peers stay in discovery
            writer.transport.abort()
        await wait_until(lambda: not consumer._links[publisher.bus_id].welcomed, "the consumer to see it")

        async def flows_again() -> None:
            while True:
                await publisher.publish("kv", b"after")
                if await received_within(sub, 0.2) == [b"after"]:
                    return

        await asyncio.wait_for(flows_again(), WAIT)


async def test_a_responder_that_fails_answers_at_once_with_a_timeout_error():
    async with buses(2) as (server, client):
        async def broken(data: bytes) -> bytes:
            raise RuntimeError("no blocks")

        await server.serve("resync", broken)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError, match="failed"):
            await client.request("resync", b"?", timeout=5)
        assert loop.time() - started < 4  # it did not wait out its timeout


async def test_the_first_of_two_answers_wins():
    async with buses(3) as (fast, slow, client):
        await fast.serve("s", lambda data: asyncio.sleep(0, b"fast"))
        await slow.serve("s", lambda data: asyncio.sleep(2, b"slow"))
        await wait_until(lambda: sum(link.serves.matches("s") for link in client._links.values()) == 2,
                         "both responders announced")
        assert await client.request("s", b"?", timeout=5) == b"fast"


async def test_a_request_waits_for_a_responder_that_appears_within_its_timeout():
    discovery = MemoryDiscovery()
    async with buses(1, discovery, namespace="ns") as (client,):
        asking = asyncio.ensure_future(client.request("resync.7", b"?", timeout=5))
        await asyncio.sleep(0.2)  # nobody serves it yet
        server = await EmbeddedEventBus.connect(discovery, namespace="ns")
        try:
            await server.serve("resync.7", lambda data: asyncio.sleep(0, b"here"))
            assert await asyncio.wait_for(asking, WAIT) == b"here"
        finally:
            await server.close()


async def test_a_peer_that_does_not_read_costs_bounded_memory_and_never_blocks_the_publisher():
    limit = 256 * 1024
    async with buses(2, max_queued_bytes=limit) as (publisher, consumer):
        sub = await consumer.subscribe("kv")
        endpoint = next(iter(consumer._links.values())).endpoint
        # A peer that subscribes and then never reads its socket (a stalled process).
        _, stalled = await asyncio.open_connection(endpoint.host, endpoint.port)
        stalled.write(encode_frame(PeerHello(bus_id=7, namespace=publisher.namespace, subscriptions=["kv"])))
        await wait_until(lambda: len(publisher._subscribers) == 2, "the stalled peer to subscribe")
        payload = b"x" * 1024
        count = 5000  # 5 MiB: far more than the stalled peer's socket buffers and queue take

        async def publish_all() -> None:
            for i in range(count):
                await publisher.publish("kv", msgpack_encoder.encode([i, payload]))
                if i % 20 == 0:
                    await asyncio.sleep(0)  # a worker publishes between engine steps, not in one burst

        received = asyncio.ensure_future(receive(sub, count, timeout=30))
        await asyncio.wait_for(publish_all(), WAIT)
        got = await received
        assert [msgpack_encoder.encode([i, payload]) for i in range(count)] == got  # all, in order
        slow = next(s for s in publisher._subscribers.values() if s.bus_id == 7)
        assert slow.dropped > 0 and slow._queued_bytes <= limit
        stalled.transport.abort()


PEER_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from dynamo_lite.discovery.etcd import EtcdDiscovery
    from dynamo_lite.events.embedded import EmbeddedEventBus

    async def main(endpoints, namespace, life):
        discovery = await EtcdDiscovery.connect(endpoints)
        bus = await EmbeddedEventBus.connect(discovery, namespace=namespace, name="peer", lease_ttl=2)
        await bus.serve("echo", lambda data: asyncio.sleep(0, life.encode() + b":" + data))
        print(bus.bus_id, flush=True)
        seq = 0
        while True:
            seq += 1
            await bus.publish("kv", b"%s %d" % (life.encode(), seq))
            await asyncio.sleep(0.01)

    asyncio.run(main(*sys.argv[1:]))
""")


async def test_across_processes_over_etcd_a_killed_and_restarted_peer_is_followed(etcd_endpoint):
    from dynamo_lite.discovery.etcd import EtcdDiscovery

    namespace = f"x{uuid.uuid4().hex[:6]}"
    discovery = await EtcdDiscovery.connect(etcd_endpoint)
    consumer = await EmbeddedEventBus.connect(discovery, namespace=namespace)
    sub = await consumer.subscribe("kv")
    procs = []
    try:
        for life in ("one", "two"):
            proc = await asyncio.create_subprocess_exec(sys.executable, "-c", PEER_SCRIPT, etcd_endpoint,
                                                        namespace, life, stdout=asyncio.subprocess.PIPE)
            procs.append(proc)
            await asyncio.wait_for(proc.stdout.readline(), 30)
            first = await asyncio.wait_for(anext(aiter(sub)), WAIT)
            while not first.startswith(life.encode()):  # what the killed one sent before it died
                first = await asyncio.wait_for(anext(aiter(sub)), WAIT)
            seqs = [int(first.split()[1])] + [int(m.split()[1]) for m in await receive(sub, 20, timeout=WAIT)]
            assert seqs == list(range(seqs[0], seqs[0] + 21))  # in order, none lost while linked
            assert await consumer.request("echo", b"hi", timeout=5) == life.encode() + b":hi"
            proc.kill()  # no clean close: the lease stays until its ttl, the connection breaks at once
            await proc.wait()
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await consumer.close()
        await discovery.close()


async def test_planes_connect_embedded_by_url_scheme():
    from dynamo_lite import planes

    discovery = MemoryDiscovery()
    bus = await planes.connect_event_bus("embedded://", discovery=discovery, namespace="p",
                                         name="planes-test")
    try:
        assert isinstance(bus, EmbeddedEventBus) and bus.namespace == "p"
        items, _ = await discovery.get_prefix(keys.event_endpoints_prefix("p"))
        assert endpoint_json_decoder.decode(items[0][1]).name == "planes-test"
    finally:
        await bus.close()
        await discovery.close()


async def test_a_subscription_nobody_reads_keeps_at_most_max_pending_messages():
    async with buses(2, max_pending=100) as (publisher, consumer):
        sub = await consumer.subscribe("load")
        for i in range(500):
            await publisher.publish("load", b"%d" % i)
        await wait_until(lambda: sub._queue.qsize() == 100, "the queue to fill")
        await asyncio.sleep(0.1)
        assert sub._queue.qsize() == 100  # the rest were dropped, not queued
        assert await receive(sub, 100, timeout=5) == [b"%d" % i for i in range(100)]  # the oldest kept
