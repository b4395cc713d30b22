"""etcd and NATS configured as an operator secures them, with certificates made here: etcd over TLS with
client certificates (--client-cert-auth), etcd with auth enabled (root user), nats-server with TLS and a
token. Components with the right options connect; without them they get one clear error, quickly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import tempfile
import time
import urllib.request
import uuid

import grpc
import pytest
from aetcd import rpc

from dynamo_lite import planes
from dynamo_lite.protocol.errors import TransportError
from tests.e2e.harness import DEFAULT_MODEL_PATH, ProcGroup, wait_until
from tests.services import ETCD_BINARY, NATS_BINARY, ServiceHandle, _running, free_tcp_port, start_etcd
from tests.tls_material import TlsFiles, make_tls_files

ROOT_PASSWORD = "root-password-for-tests"
NATS_TOKEN = "nats-token-for-tests-0123456789"


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def _https_ready(tls: TlsFiles):
    context = ssl.create_default_context(cafile=str(tls.ca))
    context.load_cert_chain(str(tls.client_cert), str(tls.client_key))

    def ready(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=1, context=context) as r:
                return r.status == 200
        except OSError:
            return False
    return ready


@pytest.fixture(scope="module")
def tls_etcd(tls):
    """etcd serving clients over TLS only, and only those with a certificate signed by the test CA."""
    port, peer_port = free_tcp_port(), free_tcp_port()
    data_dir = tempfile.mkdtemp(prefix="dynamo-lite-etcd-tls-")
    url, peer = f"https://127.0.0.1:{port}", f"http://127.0.0.1:{peer_port}"
    argv = [ETCD_BINARY, "--name", "tls", "--data-dir", os.path.join(data_dir, "data"),
            "--listen-client-urls", url, "--advertise-client-urls", url, "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer, "--initial-cluster", f"tls={peer}",
            "--cert-file", str(tls.server_cert), "--key-file", str(tls.server_key),
            "--trusted-ca-file", str(tls.ca), "--client-cert-auth", "--log-level", "warn"]
    with _running(ServiceHandle("etcd", url, port, data_dir, argv, _https_ready(tls))) as handle:
        yield handle


@pytest.fixture(scope="module")
def auth_etcd():
    """etcd with auth enabled: a root user with a password (what `etcdctl user add root; etcdctl auth
    enable` does, over etcd's gRPC API: etcdctl is not installed here)."""
    with start_etcd() as etcd:
        with grpc.insecure_channel(f"127.0.0.1:{etcd.port}") as channel:
            auth = rpc.AuthStub(channel)
            auth.RoleAdd(rpc.AuthRoleAddRequest(name="root"), timeout=5)
            auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=ROOT_PASSWORD), timeout=5)
            auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout=5)
            auth.AuthEnable(rpc.AuthEnableRequest(), timeout=5)
        yield etcd


@pytest.fixture(scope="module")
def secure_nats(tls, tmp_path_factory):
    """nats-server with TLS and token authorization, from a config file."""
    directory = tmp_path_factory.mktemp("nats")
    port = free_tcp_port()
    config = directory / "nats.conf"
    config.write_text(f"""
host: 127.0.0.1
port: {port}
authorization {{ token: "{NATS_TOKEN}" }}
tls {{ cert_file: "{tls.server_cert}", key_file: "{tls.server_key}", ca_file: "{tls.ca}" }}
""")

    def ready(port: int) -> bool:
        with contextlib.suppress(OSError), socket_to(port) as sock:
            return sock.recv(4) == b"INFO"
        return False

    with _running(ServiceHandle("nats-server", f"tls://127.0.0.1:{port}", port, str(directory),
                                [NATS_BINARY, "-c", str(config)], ready)) as handle:
        yield handle


def socket_to(port: int):
    import socket
    sock = socket.create_connection(("127.0.0.1", port), timeout=1)
    return contextlib.closing(sock)


def credentials(tmp_path, **options) -> planes.PlaneCredentials:
    """What a component gets from these options (flags' field names; *_file values are written here)."""
    files = {}
    for name, value in list(options.items()):
        if name.endswith("_password") or name.endswith("_token"):
            path = tmp_path / f"{name}-{uuid.uuid4().hex[:6]}"
            path.write_text(value + "\n")
            files[name + "_file"] = str(path)
            del options[name]
    return planes.resolve_credentials(planes.PlaneOptions(**options, **files), env={})


async def round_trip(url: str, creds: planes.PlaneCredentials) -> None:
    discovery = await planes.connect_discovery(url, connect_wait=3.0, credentials=creds)
    try:
        key = f"/security-test/{uuid.uuid4().hex}"
        await discovery.put(key, b"v")
        items, _ = await discovery.get_prefix(key)
        assert items == [(key, b"v")]
    finally:
        await discovery.close()


async def test_etcd_over_tls_with_a_client_certificate(tls_etcd, tls, tmp_path):
    creds = credentials(tmp_path, etcd_ca_file=str(tls.ca), etcd_cert_file=str(tls.client_cert),
                        etcd_key_file=str(tls.client_key))
    await round_trip(tls_etcd.url, creds)


async def test_etcd_over_tls_without_a_client_certificate_or_in_plain_is_a_clear_error(tls_etcd, tls,
                                                                                      tmp_path):
    started = time.monotonic()
    with pytest.raises(TransportError, match="etcd-cert-file"):
        await round_trip(tls_etcd.url, credentials(tmp_path, etcd_ca_file=str(tls.ca)))
    with pytest.raises(TransportError, match="https:// endpoints and --etcd-ca-file"):
        await round_trip(f"http://127.0.0.1:{tls_etcd.port}", credentials(tmp_path))
    assert time.monotonic() - started < 15  # bounded by connect_wait, no hang


async def test_etcd_with_auth_enabled_takes_a_user_and_refuses_a_client_without_one(auth_etcd, tmp_path):
    await round_trip(auth_etcd.url, credentials(tmp_path, etcd_user="root", etcd_password=ROOT_PASSWORD))
    started = time.monotonic()
    with pytest.raises(TransportError, match="refused this client.*--etcd-user"):
        await round_trip(auth_etcd.url, credentials(tmp_path))
    with pytest.raises(TransportError, match="refused this client.*authentication failed"):
        await round_trip(auth_etcd.url, credentials(tmp_path, etcd_user="root", etcd_password="wrong-one"))
    assert time.monotonic() - started < 2  # refused at once, not retried for connect_wait


async def test_nats_with_tls_and_a_token(secure_nats, tls, tmp_path):
    creds = credentials(tmp_path, nats_token=NATS_TOKEN, nats_ca_file=str(tls.ca))
    bus = await planes.connect_event_bus(secure_nats.url, credentials=creds, connect_timeout=3)
    try:
        subscription = await bus.subscribe("security.test")
        await bus.publish("security.test", b"hi")
        async with asyncio.timeout(5):
            assert await anext(aiter(subscription)) == b"hi"
    finally:
        await bus.close()
    with pytest.raises(TransportError, match="refused this client's credentials"):
        await planes.connect_event_bus(secure_nats.url, connect_timeout=3,
                                       credentials=credentials(tmp_path, nats_ca_file=str(tls.ca)))
    with pytest.raises(TransportError, match="refused this client's credentials"):
        await planes.connect_event_bus(secure_nats.url, connect_timeout=3, credentials=credentials(
            tmp_path, nats_token="not-the-token", nats_ca_file=str(tls.ca)))


def test_a_mocker_serves_on_secured_planes_and_exits_clearly_without_credentials(tls_etcd, auth_etcd,
                                                                                 secure_nats, tls, tmp_path):
    token_file = tmp_path / "nats.token"
    token_file.write_text(NATS_TOKEN)
    env = {"PYTHONUNBUFFERED": "1", "ETCD_ENDPOINTS": tls_etcd.url, "NATS_SERVER": secure_nats.url,
           "ETCD_CA_FILE": str(tls.ca), "NATS_CA_FILE": str(tls.ca), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    group = ProcGroup(tmp_path / "procs", env)
    args = ["--model-path", str(DEFAULT_MODEL_PATH), "--served-model-name", "mock-model",
            "--namespace", f"sec-{uuid.uuid4().hex[:6]}"]
    try:
        good = group.start("mocker", "dynamo_lite.mocker", *args, "--etcd-cert-file", str(tls.client_cert),
                           "--etcd-key-file", str(tls.client_key), "--nats-token-file", str(token_file))
        wait_until(lambda: "serving mock-model" in good.log_tail(), 30, "the mocker to serve", [good])
        assert "without KV events" not in good.log_tail()  # NATS took the token
        bare = group.start("bare", "dynamo_lite.mocker", *args, extra_env={"ETCD_ENDPOINTS": auth_etcd.url,
                                                                          "ETCD_CA_FILE": ""})
        wait_until(lambda: not bare.alive(), 20, "the mocker without an etcd user to exit")
        assert bare.returncode == 1
        tail = bare.log_tail()
        assert "cannot serve: etcd at" in tail and "refused this client" in tail, tail
        assert "--etcd-user" in tail, tail
        assert "Traceback" not in tail, tail
    finally:
        group.stop()
