"""Session-wide fixtures: one real etcd and one real nats-server for every integration test.

Tests that stop or restart a service start their own with tests.services.start_etcd()/start_nats()
so they never disturb these shared ones.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.services import start_etcd, start_nats


@pytest.fixture(scope="session")
def etcd_endpoint() -> Iterator[str]:
    """"http://127.0.0.1:PORT" of an etcd started for this test session."""
    with start_etcd() as etcd:
        yield etcd.url


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """"nats://127.0.0.1:PORT" of a nats-server (JetStream on) started for this test session."""
    with start_nats() as nats:
        yield nats.url
