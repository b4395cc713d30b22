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
