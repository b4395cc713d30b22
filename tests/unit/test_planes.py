"""dynamo_lite.planes: which implementation a discovery or event-bus URL names (no I/O here)."""

from __future__ import annotations

import pytest

from dynamo_lite import planes
from dynamo_lite.protocol.errors import ConfigError


@pytest.mark.parametrize("url", ["etcd://10.0.0.1:2379", "etcd://a:2379,b:2379", "http://127.0.0.1:2379",
                                 "127.0.0.1:2379", "etcd://a:2379, http://b:2379"])
def test_etcd_urls_with_or_without_a_scheme_are_discovery_urls(url):
    planes.check_discovery_url(url)


@pytest.mark.parametrize("url", ["nats://127.0.0.1:4222", "127.0.0.1:4222", "tls://nats.example:4222",
                                 "nats://a:4222,nats://b:4222"])
def test_nats_urls_with_or_without_a_scheme_are_event_bus_urls(url):
    planes.check_event_bus_url(url)


@pytest.mark.parametrize("url", ["zk://127.0.0.1:2181", "nats://127.0.0.1:4222", ""])
def test_unknown_or_missing_discovery_is_a_config_error_naming_the_flag(url):
    with pytest.raises(ConfigError, match="--etcd-endpoints") as raised:
        planes.check_discovery_url(url)
    assert raised.value.param == "--etcd-endpoints"


async def test_connecting_an_unknown_scheme_fails_before_any_io():
    with pytest.raises(ConfigError, match="--nats-server.*unknown scheme 'kafka://'"):
        await planes.connect_event_bus("kafka://127.0.0.1:9092")
    with pytest.raises(ConfigError, match="--discovery-url"):
        await planes.connect_discovery("redis://127.0.0.1:6379", flag="--discovery-url")


def test_embedded_is_an_event_bus_url():
    planes.check_event_bus_url("embedded://")


async def test_the_embedded_event_bus_without_discovery_is_a_config_error():
    with pytest.raises(ConfigError, match="--nats-server embedded://: the embedded event plane needs"):
        await planes.connect_event_bus("embedded://")
# ---------------------------------------------------------------- choosing the planes (PLANES.md)

ENV = {"XDG_RUNTIME_DIR": "/run/user/1000"}


def test_with_no_endpoints_every_plane_is_embedded_in_the_private_default_dir():
    assert planes.resolve_planes("", "", "", "", "", ENV) == ("file:///run/user/1000/dynamo_lite",
                                                             "embedded://")
    import os
    assert planes.resolve_planes("", "", "", "", "", {})[0] == f"file:///tmp/dynamo_lite-{os.getuid()}"
    assert planes.resolve_planes("", "/srv/d", "", "", "", ENV)[0] == "file:///srv/d"


def test_given_endpoints_select_etcd_and_nats():
    assert planes.resolve_planes("", "", "", "http://e:2379", "nats://n:4222", ENV) == (
        "http://e:2379", "nats://n:4222")
    # One without the other: etcd discovery with the embedded event plane, and the reverse.
    assert planes.resolve_planes("", "", "", "e:2379", "", ENV) == ("e:2379", "embedded://")
    assert planes.resolve_planes("", "", "", "", "n:4222", ENV) == ("file:///run/user/1000/dynamo_lite",
                                                                  "n:4222")


def test_explicit_kinds_beat_the_endpoints_and_default_their_urls():
    assert planes.resolve_planes("embedded", "/d", "embedded", "http://e:2379", "nats://n:4222", ENV) == (
        "file:///d", "embedded://")
    assert planes.resolve_planes("etcd", "", "nats", "", "", ENV) == (planes.DEFAULT_ETCD_ENDPOINTS,
                                                                     planes.DEFAULT_NATS_SERVER)


@pytest.mark.parametrize("args, flag", [
    (("zk", "", "", "", ""), "--discovery"), (("", "", "kafka", "", ""), "--event-plane"),
    (("", "", "", "redis://r:6379", ""), "--etcd-endpoints"),
    (("etcd", "", "", "file:///d", ""), "--etcd-endpoints"),
    (("", "", "", "", "embedded://"), "--nats-server")])
def test_bad_choices_are_config_errors_naming_the_flag(args, flag):
    with pytest.raises(ConfigError) as raised:
        planes.resolve_planes(*args, ENV)
    assert raised.value.param == flag


def test_kinds_of_urls():
    assert planes.discovery_kind("file:///d") == "embedded"
    assert planes.discovery_kind("127.0.0.1:2379") == planes.discovery_kind("etcd://h:1") == "etcd"
    assert planes.event_plane_kind("embedded://") == "embedded"
    assert planes.event_plane_kind("nats://h:4222") == "nats" and planes.event_plane_kind(None) == "none"


@pytest.mark.parametrize("module", ["dynamo_lite.frontend.__main__", "dynamo_lite.mocker.__main__"])
def test_every_component_resolves_its_planes_from_flags_and_env_twins(module, monkeypatch, tmp_path):
    import importlib

    (tmp_path / "config.json").write_text('{"vocab_size": 1000, "max_position_embeddings": 512}')
    monkeypatch.setenv("DYN_MODEL_PATH", str(tmp_path))
    for name in ("ETCD_ENDPOINTS", "NATS_SERVER", "DYN_DISCOVERY", "DYN_EVENT_PLANE", "DYN_DISCOVERY_DIR"):
        monkeypatch.delenv(name, raising=False)
    parse_config = importlib.import_module(module).parse_config
    monkeypatch.setenv("DYN_DISCOVERY_DIR", str(tmp_path / "d"))
    config = parse_config([])
    assert (config.discovery_url, config.event_plane_url) == (f"file://{tmp_path}/d", "embedded://")
    monkeypatch.setenv("ETCD_ENDPOINTS", "http://10.0.0.5:2379")
    monkeypatch.setenv("NATS_SERVER", "nats://10.0.0.5:4222")
    config = parse_config([])
    assert (config.discovery_url, config.event_plane_url) == ("http://10.0.0.5:2379", "nats://10.0.0.5:4222")
    monkeypatch.setenv("DYN_EVENT_PLANE", "embedded")
    config = parse_config(["--discovery", "embedded"])
    assert (config.discovery_url, config.event_plane_url) == (f"file://{tmp_path}/d", "embedded://")


async def test_a_file_url_connects_embedded_discovery(tmp_path):
    from dynamo_lite.discovery.embedded import EmbeddedDiscovery

    discovery = await planes.connect_discovery(f"file://{tmp_path}/d")
    try:
        assert isinstance(discovery, EmbeddedDiscovery) and discovery.directory == tmp_path / "d"
        await discovery.put("/k", b"v")
        assert (await discovery.get_prefix("/"))[0] == [("/k", b"v")]
    finally:
        await discovery.close()


async def test_the_embedded_event_plane_needs_the_components_discovery():
    planes.check_event_bus_url("embedded://")
    with pytest.raises(ConfigError, match="needs the component's discovery"):
        await planes.connect_event_bus("embedded://")
