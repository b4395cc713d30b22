"""etcd with auth enabled (user + password), restarted under a connected client: etcd's simple auth tokens
live in its memory, so every token it gave out is invalid after a restart. A component must get a new one
by itself: its reads and writes work again, its lease is kept alive (not lost), and its watch resumes;
a running frontend and worker carry on (the frontend sees a worker started after the restart, the old
worker keeps its instance id)."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx

from dynamo_lite import planes
from dynamo_lite.discovery.base import WatchEventKind
from tests.e2e.harness import DEFAULT_MODEL_PATH, ProcGroup, healthy_instances, wait_until
from tests.integration.test_plane_security import ROOT_PASSWORD, auth_etcd, credentials
from tests.services import free_tcp_port

__all__ = ["auth_etcd"]  # the module-scoped fixture, shared

WAIT = 20.0  # bound on each wait for the client to recover


async def test_a_client_reauthenticates_after_etcd_restarts(auth_etcd, tmp_path):
    creds = credentials(tmp_path, etcd_user="root", etcd_password=ROOT_PASSWORD)
    discovery = await planes.connect_discovery(auth_etcd.url, connect_wait=3.0, credentials=creds)
    prefix = f"/auth-restart/{uuid.uuid4().hex}/"
    events: asyncio.Queue = asyncio.Queue()

    async def watch(revision: int) -> None:
        async for event in discovery.watch_prefix(prefix, revision):
            await events.put(event)

    try:
        lease = await discovery.grant_lease(3.0)
        await discovery.put(prefix + "mine", b"v1", lease)
        _, revision = await discovery.get_prefix(prefix)
        watching = asyncio.create_task(watch(revision + 1))
        await asyncio.sleep(0.5)  # the watch is set up
        auth_etcd.restart(0.5)  # every token is now invalid

        async def retry_put() -> None:
            while True:
                try:
                    await discovery.put(prefix + "after", b"v2")
                    return
                except Exception:  # noqa: BLE001 - until the deadline: the client must recover by itself
                    await asyncio.sleep(0.2)

        await asyncio.wait_for(retry_put(), WAIT)
        items, _ = await discovery.get_prefix(prefix)
        assert dict(items) == {prefix + "mine": b"v1", prefix + "after": b"v2"}
        # The watch resumed after the restart: it saw the new key.
        event = await asyncio.wait_for(events.get(), WAIT)
        assert (event.kind, event.key) == (WatchEventKind.PUT, prefix + "after"), event
        # The lease (3 s) was kept alive across the restart: after twice its ttl the key is still there.
        await asyncio.sleep(6.0)
        assert not lease.lost
        items, _ = await discovery.get_prefix(prefix + "mine")
        assert items == [(prefix + "mine", b"v1")]
        watching.cancel()
    finally:
        await discovery.close()


def test_a_running_frontend_and_worker_carry_on_after_etcd_with_auth_restarts(auth_etcd, tmp_path):
    password = tmp_path / "etcd.password"
    password.write_text(ROOT_PASSWORD + "\n")
    env = {"PYTHONUNBUFFERED": "1", "ETCD_ENDPOINTS": auth_etcd.url, "ETCD_USER": "root",
           "ETCD_PASSWORD_FILE": str(password), "NATS_SERVER": "", "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    group = ProcGroup(tmp_path / "procs", env)
    namespace, port = f"auth-{uuid.uuid4().hex[:6]}", free_tcp_port()
    url = f"http://127.0.0.1:{port}"
    worker_args = ["--model-path", str(DEFAULT_MODEL_PATH), "--served-model-name", "mock-model",
                   "--namespace", namespace, "--lease-ttl", "3"]

    def instance_ids() -> set[int]:
        try:
            return {i["instance_id"] for i in healthy_instances(url, "mock-model")}
        except httpx.HTTPError:
            return set()

    try:
        frontend = group.start("frontend", "dynamo_lite.frontend", "--http-host", "127.0.0.1", "--http-port",
                               str(port), "--namespace", namespace)
        first = group.start("mocker-1", "dynamo_lite.mocker", *worker_args)
        wait_until(lambda: len(instance_ids()) == 1, 30, "the first worker on /health", [frontend, first])
        (before,) = instance_ids()
        auth_etcd.restart(0.5)
        second = group.start("mocker-2", "dynamo_lite.mocker", *worker_args)
        # The frontend's watch resumed (with a new token): it sees the worker registered after the restart.
        wait_until(lambda: len(instance_ids()) == 2, WAIT, "the second worker on /health",
                   [frontend, first, second])
        time.sleep(6.0)  # twice the first worker's lease: kept alive with a new token, not re-registered
        assert before in instance_ids(), (before, instance_ids())
        assert "authenticated again as user root" in first.log_tail() + frontend.log_tail()
        answer = httpx.post(f"{url}/v1/completions", timeout=30,
                            json={"model": "mock-model", "prompt": "Hello", "max_tokens": 4})
        assert answer.status_code == 200, answer.text
    finally:
        group.stop()
