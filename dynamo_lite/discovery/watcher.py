"""InstanceWatcher: the frontend's live view of workers (instance records) and model cards.

It follows everything under /{ns}/ with a PrefixFollower (a snapshot, then a watch from the next
revision), so a frontend that starts after its workers sees them at once and never misses or repeats
a change; on a watch reset the follower re-reads the prefix and reports the difference. A connection failure seen by the
request plane (`mark_failed`) hides an instance at once: it comes back after `failed_cooldown`
seconds only if its key is still in the store (its lease still alive) and, when the watcher has a
`probe`, only once the instance answers it (a hung worker whose lease outlives the cooldown stays out,
one more cooldown per failed probe).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections.abc import Awaitable, Callable

import msgspec

from dynamo_lite.discovery.base import Discovery
from dynamo_lite.discovery.prefix_follower import PrefixFollower
from dynamo_lite.protocol import keys
from dynamo_lite.protocol.messages import InstanceRecord, ModelCard, card_json_decoder, instance_json_decoder

logger = logging.getLogger(__name__)


class InstanceChange(enum.StrEnum):
    """What a listener is told about an instance (a StrEnum: equal to its string)."""

    ADDED = "added"  # registered, or back after its failure cooldown
    REMOVED = "removed"  # deregistered, lease expired, or marked failed


Listener = Callable[[InstanceChange, InstanceRecord], None]
Probe = Callable[[InstanceRecord], Awaitable[bool]]  # does this instance answer now?


class InstanceWatcher:
    def __init__(self, discovery: Discovery, namespace: str, failed_cooldown: float = 10.0,
                 probe: Probe | None = None):
        self._discovery = discovery
        self._probe = probe
        self._probes: set[asyncio.Task] = set()
        self._root = f"/{namespace}/"
        self._instances_prefix = keys.instances_prefix(namespace)
        self._models_prefix = keys.models_prefix(namespace)
        self._failed_cooldown = failed_cooldown
        self._instances: dict[str, InstanceRecord] = {}  # etcd key -> record
        self._cards: dict[str, ModelCard] = {}  # etcd key -> card
        self._failed_until: dict[int, float] = {}  # instance id -> time.monotonic() its exclusion ends
        self._cooldown_timers: dict[int, asyncio.TimerHandle] = {}
        self._listeners: list[Listener] = []
        self._changed = asyncio.Event()
        self._follower = PrefixFollower(discovery, self._root, self._put, self._delete)
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Read the snapshot (errors propagate), then follow changes in a background task."""
        await self._follower.start()

    async def close(self) -> None:
        self._closed = True
        for timer in self._cooldown_timers.values():
            timer.cancel()
        self._cooldown_timers.clear()
        for probe in self._probes:
            probe.cancel()
        await self._follower.close()

    # ------------------------------------------------------------------ queries

    @property
    def discovery(self) -> Discovery:
        """The store it reads (the component's; the embedded event bus registers there too)."""
        return self._discovery

    def instances(self, model: str | None = None, component: str | None = None) -> list[InstanceRecord]:
        """Live instances (present and not marked failed), sorted by id."""
        found = [r for r in self._instances.values()
                 if (model is None or r.model == model) and (component is None or r.component == component)
                 and self._is_live(r.instance_id)]
        return sorted(found, key=lambda r: (r.instance_id, r.component))

    def card(self, model: str) -> ModelCard | None:
        """A card for model: from the lowest-id live instance, else from any instance still registered."""
        cards = sorted((keys.parse_instance_id(k), c) for k, c in self._cards.items() if c.name == model)
        for instance_id, card in cards:
            if self._is_live(instance_id):
                return card
        return cards[0][1] if cards else None

    def models(self) -> list[str]:
        """Every name a client may ask for: the models of live instances and their cards' aliases."""
        names = {r.model for r in self._instances.values() if self._is_live(r.instance_id)}
        for key, card in self._cards.items():
            if card.aliases and card.name in names and self._is_live(keys.parse_instance_id(key)):
                names.update(card.aliases)
        return sorted(names)

    def resolve(self, name: str) -> str | None:
        """The model (InstanceRecord.model, ModelCard.name) a client's name stands for: itself when it is a
        model's name, else the model whose live card lists it as an alias (lowest instance id first),
        else None."""
        if any(c.name == name for c in self._cards.values()):
            return name
        cards = sorted((keys.parse_instance_id(k), c) for k, c in self._cards.items() if name in c.aliases)
        for instance_id, card in cards:
            if self._is_live(instance_id):
                return card.name
        return cards[0][1].name if cards else None

    def add_listener(self, callback: Listener) -> None:
        self._listeners.append(callback)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until predicate() holds, re-checking on each change; False after timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                return predicate()
        return True

    # ------------------------------------------------------------------ failures

    def mark_failed(self, instance_id: int) -> None:
        """Exclude an instance at once; it returns after failed_cooldown if its key is still there."""
        records = self._records_of(instance_id)
        if not records:
            return
        loop = asyncio.get_running_loop()
        was_live = self._is_live(instance_id)
        self._failed_until[instance_id] = time.monotonic() + self._failed_cooldown
        old_timer = self._cooldown_timers.pop(instance_id, None)
        if old_timer is not None:
            old_timer.cancel()
        self._cooldown_timers[instance_id] = loop.call_later(self._failed_cooldown, self._cooldown_over,
                                                              instance_id)
        if was_live:
            logger.warning("instance %x marked failed: excluded for %ss", instance_id, self._failed_cooldown)
            for record in records:
                self._notify(InstanceChange.REMOVED, record)
        self._signal_change()

    def _cooldown_over(self, instance_id: int) -> None:
        self._cooldown_timers.pop(instance_id, None)
        if instance_id not in self._failed_until:
            return
        records = self._records_of(instance_id)
        if self._probe is not None and records and not self._closed:
            self._failed_until[instance_id] = math.inf  # still excluded while the probe runs
            task = asyncio.get_running_loop().create_task(self._probe_then_readmit(records[0]))
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)
            return
        self._readmit(instance_id)

    async def _probe_then_readmit(self, record: InstanceRecord) -> None:
        instance_id = record.instance_id
        try:
            answers = await self._probe(record)
        except Exception:
            logger.exception("probing instance %x failed", instance_id)
            answers = False
        if instance_id not in self._failed_until or instance_id in self._cooldown_timers:
            return  # gone from the store meanwhile, or marked failed again: that decides now
        if answers:
            self._readmit(instance_id)
            return
        logger.warning("instance %x still does not answer: excluded for another %ss", instance_id,
                       self._failed_cooldown)
        self._failed_until[instance_id] = time.monotonic() + self._failed_cooldown
        self._cooldown_timers[instance_id] = asyncio.get_running_loop().call_later(
            self._failed_cooldown, self._cooldown_over, instance_id)

    def _readmit(self, instance_id: int) -> None:
        if self._failed_until.pop(instance_id, None) is None:
            return
        records = self._records_of(instance_id)
        if records:
            logger.info("instance %x is back after its failure cooldown", instance_id)
        for record in records:
            self._notify(InstanceChange.ADDED, record)
        self._signal_change()

    def _is_live(self, instance_id: int) -> bool:
        until = self._failed_until.get(instance_id)
        # The timer normally clears the entry; comparing the time also covers a late timer.
        return until is None or until <= time.monotonic()

    def _records_of(self, instance_id: int) -> list[InstanceRecord]:
        return [r for r in self._instances.values() if r.instance_id == instance_id]

    def _forget_failure_if_gone(self, instance_id: int) -> None:
        if instance_id in self._failed_until and not self._records_of(instance_id):
            del self._failed_until[instance_id]
            timer = self._cooldown_timers.pop(instance_id, None)
            if timer is not None:
                timer.cancel()

    # ------------------------------------------------------------------ store changes

    def _put(self, key: str, value: bytes) -> None:
        self._apply(key, value)

    def _delete(self, key: str) -> None:
        self._apply(key, None)

    def _apply(self, key: str, value: bytes | None) -> None:
        """A key put (value) or deleted (None) under the namespace."""
        if key.startswith(self._instances_prefix):
            self._apply_instance(key, value)
        elif key.startswith(self._models_prefix):
            self._apply_card(key, value)
        else:
            return
        self._signal_change()

    def _apply_instance(self, key: str, value: bytes | None) -> None:
        old = self._instances.get(key)
        new = None
        if value is not None:
            try:
                new = instance_json_decoder.decode(value)
            except msgspec.DecodeError as e:
                logger.warning("skipping undecodable instance record at %s: %s", key, e)
        if new == old:
            return
        if new is None:
            del self._instances[key]
        else:
            self._instances[key] = new
        if old is not None:
            if self._is_live(old.instance_id):
                logger.info("instance %x removed (%s %s at %s)", old.instance_id, old.component, old.model,
                            old.address)
                self._notify(InstanceChange.REMOVED, old)
            if new is None:
                self._forget_failure_if_gone(old.instance_id)
        if new is not None and self._is_live(new.instance_id):
            logger.info("instance %x added (%s %s at %s)", new.instance_id, new.component, new.model,
                        new.address)
            self._notify(InstanceChange.ADDED, new)

    def _apply_card(self, key: str, value: bytes | None) -> None:
        if value is not None:
            try:
                keys.parse_instance_id(key)  # card keys end with the instance id
                self._cards[key] = card_json_decoder.decode(value)
                return
            except (msgspec.DecodeError, ValueError) as e:
                logger.warning("skipping undecodable model card at %s: %s", key, e)
        self._cards.pop(key, None)

    def _notify(self, kind: InstanceChange, record: InstanceRecord) -> None:
        for listener in self._listeners:
            try:
                listener(kind, record)
            except Exception:
                logger.exception("instance listener %r failed on %s of %x", listener, kind,
                                 record.instance_id)

    def _signal_change(self) -> None:
        # Waiters hold the old event; a fresh one is armed for the next change.
        self._changed.set()
        self._changed = asyncio.Event()
