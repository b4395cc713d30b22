"""InstanceWatcher over MemoryDiscovery: what a frontend sees as workers come, go and fail."""

from __future__ import annotations

import asyncio

from dynamo_lite.discovery.base import Discovery, Lease
from dynamo_lite.discovery.memory import MemoryDiscovery
from dynamo_lite.discovery.watcher import InstanceWatcher
from dynamo_lite.protocol import keys
from dynamo_lite.protocol.messages import InstanceRecord, ModelCard, json_encoder

NS = "test"


async def register(discovery: Discovery, model: str = "m", component: str = keys.COMPONENT_BACKEND,
                   port: int = 9000, namespace: str = NS, ttl: float = 10) -> tuple[Lease, InstanceRecord]:
    """What a worker does: one lease, an instance record and a model card under it."""
    lease = await discovery.grant_lease(ttl)
    record = InstanceRecord(instance_id=lease.id, component=component, address=f"127.0.0.1:{port}",
                            model=model, host="127.0.0.1", pid=1)
    card = ModelCard(name=model, path="/models/x", context_length=2048, kv_block_size=16)
    await discovery.put(keys.instance_key(namespace, component, lease.id), json_encoder.encode(record), lease)
    await discovery.put(keys.model_card_key(namespace, model, lease.id), json_encoder.encode(card), lease)
    return lease, record


async def started(discovery: Discovery, **kwargs) -> tuple[InstanceWatcher, list[tuple[str, int]]]:
    watcher = InstanceWatcher(discovery, NS, **kwargs)
    seen: list[tuple[str, int]] = []
    watcher.add_listener(lambda kind, record: seen.append((kind, record.instance_id)))
    await watcher.start()
    return watcher, seen


async def test_sees_workers_registered_before_it_started():
    d = MemoryDiscovery()
    _, first = await register(d, port=1)
    _, second = await register(d, model="org/other-model", port=2)
    watcher, _ = await started(d)
    try:
        assert watcher.instances() == sorted([first, second], key=lambda r: r.instance_id)
        assert watcher.instances(model="m") == [first]
        assert watcher.models() == ["m", "org/other-model"]
        assert watcher.card("org/other-model").context_length == 2048
        assert watcher.card("missing") is None
    finally:
        await watcher.close()


async def test_follows_registration_and_lease_end_with_listener_calls():
    d = MemoryDiscovery()
    watcher, seen = await started(d)
    try:
        lease, record = await register(d)
        assert await watcher.wait_for(lambda: watcher.instances(model="m") == [record], timeout=1)
        prefill_lease, prefill = await register(d, component=keys.COMPONENT_PREFILL, port=2)
        assert await watcher.wait_for(lambda: len(watcher.instances()) == 2, timeout=1)
        assert watcher.instances(component=keys.COMPONENT_PREFILL) == [prefill]

        d.expire_lease(lease.id)  # worker died
        assert await watcher.wait_for(lambda: watcher.instances(component=keys.COMPONENT_BACKEND) == [],
                                      timeout=1)
        await prefill_lease.revoke()  # worker shut down
        assert await watcher.wait_for(lambda: watcher.models() == [], timeout=1)
        assert watcher.card("m") is None
        assert seen == [("added", record.instance_id), ("added", prefill.instance_id),
                        ("removed", record.instance_id), ("removed", prefill.instance_id)]
    finally:
        await watcher.close()


async def test_wait_for_times_out_when_nothing_matches():
    watcher, _ = await started(MemoryDiscovery())
    try:
        assert not await watcher.wait_for(lambda: bool(watcher.instances()), timeout=0.1)
    finally:
        await watcher.close()


async def test_mark_failed_excludes_at_once_and_returns_after_cooldown():
    d = MemoryDiscovery()
    _, record = await register(d)
    watcher, seen = await started(d, failed_cooldown=0.2)
    try:
        watcher.mark_failed(record.instance_id)
        assert watcher.instances() == [] and watcher.models() == []
        assert watcher.card("m") is not None  # the model is known, just not servable right now
        watcher.mark_failed(record.instance_id)  # a second failure does not notify twice
        assert seen == [("added", record.instance_id), ("removed", record.instance_id)]
        assert await watcher.wait_for(lambda: watcher.instances() == [record], timeout=1)
        assert seen[-1] == ("added", record.instance_id)
    finally:
        await watcher.close()


async def test_failed_instance_comes_back_only_once_it_answers_the_probe():
    d = MemoryDiscovery()
    _, record = await register(d)
    answers = [False, False, True]
    probed: list[int] = []

    async def probe(probed_record: InstanceRecord) -> bool:
        probed.append(probed_record.instance_id)
        return answers[len(probed) - 1]

    watcher, seen = await started(d, failed_cooldown=0.1, probe=probe)
    try:
        watcher.mark_failed(record.instance_id)
        for _ in range(200):  # probes change nothing the watcher signals: poll
            if len(probed) >= 2:
                break
            await asyncio.sleep(0.01)
        assert len(probed) >= 2
        if len(probed) == 2:
            assert watcher.instances() == []  # two failed probes: still excluded
        assert await watcher.wait_for(lambda: watcher.instances() == [record], timeout=2)
        assert probed == [record.instance_id] * 3
        assert seen == [("added", record.instance_id), ("removed", record.instance_id),
                        ("added", record.instance_id)]
    finally:
        await watcher.close()


async def test_an_instance_stays_excluded_while_its_probe_runs():
    d = MemoryDiscovery()
    _, record = await register(d)
    probing, release = asyncio.Event(), asyncio.Event()

    async def probe(_: InstanceRecord) -> bool:
        probing.set()
        await release.wait()
        return True

    watcher, _ = await started(d, failed_cooldown=0.05, probe=probe)
    try:
        watcher.mark_failed(record.instance_id)
        await asyncio.wait_for(probing.wait(), 2)
        await asyncio.sleep(0.1)  # the cooldown is long over, the answer not in yet
        assert watcher.instances() == []
        release.set()
        assert await watcher.wait_for(lambda: watcher.instances() == [record], timeout=2)
    finally:
        await watcher.close()


async def test_failed_instance_whose_lease_ended_does_not_come_back():
    d = MemoryDiscovery()
    lease, record = await register(d)
    watcher, seen = await started(d, failed_cooldown=0.1)
    try:
        watcher.mark_failed(record.instance_id)
        d.expire_lease(lease.id)
        await asyncio.sleep(0.3)
        assert watcher.instances() == []
        assert seen == [("added", record.instance_id), ("removed", record.instance_id)]
    finally:
        await watcher.close()


async def test_undecodable_values_are_skipped():
    d = MemoryDiscovery()
    lease = await d.grant_lease(10)
    await d.put(keys.instance_key(NS, keys.COMPONENT_BACKEND, lease.id), b"not json", lease)
    await d.put(keys.model_card_key(NS, "m", lease.id), b'{"name": 1}', lease)
    watcher, _ = await started(d)
    try:
        _, record = await register(d, port=2)
        assert await watcher.wait_for(lambda: watcher.instances() == [record], timeout=1)
        await d.put(keys.instance_key(NS, keys.COMPONENT_BACKEND, 99), b"{broken", None)
        _, later = await register(d, port=3)
        assert await watcher.wait_for(lambda: len(watcher.instances()) == 2, timeout=1)
        assert watcher.instances() == [record, later]
    finally:
        await watcher.close()


async def test_reset_relists_and_reports_the_difference():
    d = MemoryDiscovery()
    gone_lease, gone = await register(d, port=1)
    watcher, seen = await started(d)
    try:
        # Changes the watcher cannot see from its watch: it only learns them by re-reading.
        d.compact()
        d.break_watches()
        d.expire_lease(gone_lease.id)
        _, new = await register(d, port=2)
        assert await watcher.wait_for(lambda: watcher.instances() == [new], timeout=2)
        assert seen == [("added", gone.instance_id), ("removed", gone.instance_id),
                        ("added", new.instance_id)]
        # And it keeps following changes after the reset.
        _, third = await register(d, port=3)
        assert await watcher.wait_for(lambda: watcher.instances() == [new, third], timeout=1)
    finally:
        await watcher.close()


async def test_a_failing_listener_does_not_stop_the_others():
    d = MemoryDiscovery()
    watcher = InstanceWatcher(d, NS)
    seen = []

    def broken(kind, record):
        raise RuntimeError("listener bug")

    watcher.add_listener(broken)
    watcher.add_listener(lambda kind, record: seen.append(kind))
    await watcher.start()
    try:
        await register(d)
        assert await watcher.wait_for(lambda: seen == ["added"], timeout=1)
    finally:
        await watcher.close()


async def test_listeners_get_instance_change_members_and_records_decode_roles_as_enums():
    from dynamo_lite.discovery.watcher import InstanceChange
    from dynamo_lite.protocol.messages import WorkerRole

    d = MemoryDiscovery()
    watcher, seen = await started(d)
    try:
        lease, record = await register(d, port=3)
        assert await watcher.wait_for(lambda: bool(seen), timeout=2.0)
        [decoded] = watcher.instances()  # read back from the store's JSON
        assert type(decoded.role) is WorkerRole and decoded.role == "aggregated"  # equal to the wire string
        await lease.revoke()
        assert await watcher.wait_for(lambda: len(seen) == 2, timeout=2.0)
        assert seen == [(InstanceChange.ADDED, record.instance_id),
                        (InstanceChange.REMOVED, record.instance_id)]
        assert all(type(kind) is InstanceChange for kind, _ in seen)
    finally:
        await watcher.close()
