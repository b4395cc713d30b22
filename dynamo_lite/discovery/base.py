"""The Discovery interface: a small key-value view with leases and watches (etcd's model).

Invariants every implementation keeps:
- A key put with a lease disappears when the lease is revoked or expires (ttl seconds without a
  keep-alive). Lease ids are positive ints and unique for the store's lifetime; a worker's
  instance id is its lease id.
- `get_prefix` returns a consistent snapshot and the revision it was read at; `watch_prefix(prefix,
  start_revision)` yields every change after that revision, in order, exactly once, so
  snapshot + watch never misses or repeats an event.
- A lost connection is retried inside the implementation; a watch that cannot resume from its
  revision (compacted, store restarted) yields a `WatchEvent(kind=WatchEventKind.RESET)`, after which the
  consumer must re-read with get_prefix and watch again.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass


class WatchEventKind(enum.StrEnum):
    PUT = "put"  # a key was written (value holds the new value)
    DELETE = "delete"  # a key was deleted or its lease ended
    RESET = "reset"  # the watch cannot resume: re-read with get_prefix and watch again


@dataclass(frozen=True)
class WatchEvent:
    kind: WatchEventKind
    key: str
    value: bytes = b""
    revision: int = 0


class Lease(abc.ABC):
    """A granted lease kept alive in the background until revoked."""

    id: int
    ttl: float

    @abc.abstractmethod
    async def revoke(self) -> None:
        """Revoke now: every key attached disappears. Safe to call twice."""

    @property
    @abc.abstractmethod
    def lost(self) -> bool:
        """True once the store reported the lease gone (expired while unreachable)."""


class Discovery(abc.ABC):
    @abc.abstractmethod
    async def grant_lease(self, ttl: float) -> Lease:
        """Grant a lease and keep it alive (refresh at about ttl/3) until revoked or closed."""

    @abc.abstractmethod
    async def put(self, key: str, value: bytes, lease: Lease | None = None) -> None: ...

    @abc.abstractmethod
    async def delete(self, key: str) -> None: ...

    @abc.abstractmethod
    async def get_prefix(self, prefix: str) -> tuple[list[tuple[str, bytes]], int]:
        """All (key, value) under prefix, sorted by key, and the store revision of the read."""

    @abc.abstractmethod
    def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Changes under prefix with revision >= start_revision, until the iterator is closed."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop keep-alives and watches and close connections. Safe to call twice."""
