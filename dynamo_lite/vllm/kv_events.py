"""vLLM's KV cache events -> the project's content-hashed KV events.

vLLM's scheduler publishes a KVEventBatch per step on a ZMQ PUB socket (vllm/distributed/kv_events.py):
multipart [topic, seq (8-byte big-endian), msgpack(KVEventBatch)]. We subscribe in this process and
translate each batch:

- BlockStored: vLLM's block hashes are its own (sha256 with a per-process seed, optionally with LoRA
  or multimodal extra keys), useless to a router in another process. We recompute chained
  protocol.hashing content hashes from the event's token_ids, starting from the parent's content
  hash, and remember engine hash -> content hash.
- BlockRemoved: engine hashes -> content hashes via that map; unknown hashes are dropped (a block we
  never announced needs no removal).
- AllBlocksCleared passes through.

A stored run whose parent we do not know is dropped, not treated as a root: its content hash chains
over a prefix we never saw, so hashing it as a root would announce a prefix the worker does not hold
(a false cache hit, which costs the router more than a miss). It cannot happen while we see every
batch from the engine's start (vLLM stores a parent before its children, and re-announces reused
blocks), only after lost messages; a later full store of the prefix repairs it.

Lost messages: ZMQ PUB drops batches a slow subscriber cannot take, and the per-batch sequence number
shows the gap. We then ask the publisher's replay socket (a ROUTER holding its last buffer_steps
batches, vllm's KVEventsConfig.replay_endpoint) for the missing ones and translate them before the
batch that showed the gap, so neither our block set nor the routers' view misses them.

Data parallelism (--data-parallel-size N): every rank's engine core has its own publisher, on the
configured endpoint with the rank added to its port (vLLM's offset_endpoint_port), its own sequence
numbers, and it stamps its batches with data_parallel_rank. One SUB socket takes all N publishers (it
binds, or connects to, every rank's endpoint); gaps are found per rank and each batch is yielded with its
rank. Replay stays off then (vLLM refuses ipc endpoints per rank), so a lost batch stays lost (logged).
Each rank has its own translator: engine hashes are per-process, so per rank.

The map never needs invalidation: an engine hash always denotes the same token prefix, so an entry is
a cached value of a pure function. It is an LRU bounded at a few times the KV cache size, so it holds
every block that can be cached at once.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from dynamo_lite.protocol import hashing
from dynamo_lite.protocol.messages import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent
from dynamo_lite.vllm.compat import replay_frame

logger = logging.getLogger(__name__)

DEFAULT_TOPIC = "kv-events"
POLL_INTERVAL_MS = 250
# How long a replay of lost batches may take; vLLM's publisher thread answers between its events, within
# ~0.1 s when idle.
REPLAY_TIMEOUT_MS = 2000
END_SEQ = -1  # vLLM's replay socket ends its answer with this sequence number
# vLLM's device tier; other media (CPU offload, storage) are other tiers the router does not index.
ROUTED_MEDIA = (None, "GPU")


@functools.cache
def _vllm_event_types() -> tuple[type, type, type]:
    """vLLM's BlockStored, BlockRemoved, AllBlocksCleared (imported on first use: vLLM is heavy)."""
    from vllm.distributed import kv_events

    return kv_events.BlockStored, kv_events.BlockRemoved, kv_events.AllBlocksCleared


def _routed_tier(event: Any) -> bool:
    """The device KV cache of the model's only (full-attention) cache group: what routers index."""
    return getattr(event, "medium", None) in ROUTED_MEDIA and getattr(event, "group_idx", None) in (None, 0)


class KvEventTranslator:
    """Pure translation of vLLM event batches (no I/O): see the module docstring."""

    def __init__(self, capacity: int = 1 << 16):
        self._capacity = capacity
        self._content_of: OrderedDict[Any, int] = OrderedDict()  # engine hash -> content hash
        self.dropped_orphans = 0

    def resize(self, total_blocks: int) -> None:
        self._capacity = max(self._capacity, 4 * total_blocks)

    def translate(self, events: list[Any]) -> list[KvEvent]:
        """vLLM's events (vllm.distributed.kv_events) -> ours; events of other kinds are skipped."""
        VllmStored, VllmRemoved, VllmCleared = _vllm_event_types()
        out: list[KvEvent] = []
        for event in events:
            translated: KvEvent | None = None
            if isinstance(event, VllmStored):
                translated = self._stored(event)
            elif isinstance(event, VllmRemoved):
                translated = self._removed(event)
            elif isinstance(event, VllmCleared):
                translated = AllBlocksCleared()
            if translated is not None:
                out.append(translated)
        return out

    def _stored(self, event: Any) -> BlockStored | None:
        if not _routed_tier(event):
            return None
        # LoRA, multimodal inputs and cache salts change what a block holds beyond its token ids; a
        # token-only content hash would claim a match it cannot serve.
        if event.lora_name or event.lora_id or any(event.extra_keys or ()):
            return None
        size, count = event.block_size, len(event.block_hashes)
        if count == 0 or size <= 0 or len(event.token_ids) != count * size:
            logger.warning("dropping malformed BlockStored: %d hashes, %d tokens, block size %d",
                           count, len(event.token_ids), size)
            return None
        parent: int | None = None
        if event.parent_block_hash is not None:
            parent = self._lookup(event.parent_block_hash)
            if parent is None:
                self.dropped_orphans += 1
                logger.warning("dropping %d stored block(s) whose parent block was never announced", count)
                return None
        content = hashing.block_hashes(event.token_ids, size, parent)
        for engine_hash, content_hash in zip(event.block_hashes, content):
            self._remember(engine_hash, content_hash)
        return BlockStored(block_hashes=content, parent_block_hash=parent, token_ids=list(event.token_ids),
                           block_size=size)

    def _removed(self, event: Any) -> BlockRemoved | None:
        if not _routed_tier(event):
            return None
        content = [h for h in map(self._content_of.get, event.block_hashes) if h is not None]
        return BlockRemoved(block_hashes=content) if content else None

    def _lookup(self, engine_hash: Any) -> int | None:
        content = self._content_of.get(engine_hash)
        if content is not None:
            self._content_of.move_to_end(engine_hash)
        return content

    def _remember(self, engine_hash: Any, content_hash: int) -> None:
        self._content_of[engine_hash] = content_hash
        self._content_of.move_to_end(engine_hash)
        while len(self._content_of) > self._capacity:
            self._content_of.popitem(last=False)


def _is_bind_endpoint(endpoint: str) -> bool:
    """Mirror of ZmqEventPublisher._is_bind_endpoint: vLLM binds these and connects to the rest."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def _bind_consecutive_ports(sock: zmq.asyncio.Socket, count: int, attempts: int = 20) -> str:
    """Bind `sock` on `count` consecutive free loopback ports (vLLM's rank r publisher connects to the
    base port + r); returns the base endpoint. A port taken by someone else makes it try another base."""
    for _ in range(attempts):
        sock.bind("tcp://127.0.0.1:0")
        base = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        port = int(base.rsplit(":", 1)[1])
        bound = [base]
        try:
            for rank in range(1, count):
                sock.bind(f"tcp://127.0.0.1:{port + rank}")
                bound.append(f"tcp://127.0.0.1:{port + rank}")
            return base
        except zmq.ZMQError:
            for endpoint in bound:
                sock.unbind(endpoint)
    raise OSError(f"found no {count} consecutive free ports for the KV event subscriber")


def _reachable(bind_endpoint: str) -> str:
    """Where to connect to reach a socket bound at a wildcard address: this host's loopback."""
    return bind_endpoint.replace("*", "127.0.0.1").replace("[::]", "[::1]")


class KvEventSubscriber:
    """Receives vLLM's KV event batches over ZMQ and yields translated event lists.

    `configure(engine_args)` must run before the engine is built: by default it binds a SUB socket on
    a free loopback port and points vLLM's publisher at it (a publisher given a concrete address
    connects), so there is no race for the port. A user-given --kv-events-config is respected: we
    connect to a publisher that binds, or bind the address a connecting publisher is told to use.
    """

    def __init__(self) -> None:
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._topic = DEFAULT_TOPIC
        self._closed = False
        self._consuming = False
        self._last_seq: dict[int, int] = {}  # per data-parallel rank
        self._decoder: msgspec.msgpack.Decoder | None = None
        self._replay_endpoint: str | None = None
        self._replay_socket: zmq.asyncio.Socket | None = None
        self.data_parallel_size = 1
        self.translators = [KvEventTranslator()]  # one per data-parallel rank
        self.lost_batches = 0  # batches neither received nor replayed

    @property
    def translator(self) -> KvEventTranslator:
        """Rank 0's translator (the only one without data parallelism)."""
        return self.translators[0]

    def resize(self, total_blocks: int) -> None:
        for translator in self.translators:
            translator.resize(total_blocks)

    def configure(self, engine_args: Any) -> bool:
        """Set up the socket and engine_args.kv_events_config. False when events are disabled by the user."""
        from vllm.config.kv_events import KVEventsConfig
        from vllm.distributed.kv_events import KVEventBatch

        user = engine_args.kv_events_config
        if isinstance(user, dict):
            user = KVEventsConfig(**user)
        if user is not None and not user.enable_kv_cache_events:
            logger.warning("KV events disabled by --kv-events-config: routers will not see this cache")
            return False
        if engine_args.enable_prefix_caching is False:
            logger.warning("prefix caching is off (--no-enable-prefix-caching): no KV events to relay")
            return False
        self._decoder = msgspec.msgpack.Decoder(KVEventBatch)
        ranks = self.data_parallel_size = max(1, getattr(engine_args, "data_parallel_size", 1) or 1)
        self.translators = [KvEventTranslator() for _ in range(ranks)]
        self._context = zmq.asyncio.Context()
        sock = self._context.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.LINGER, 0)
        if user is None:
            sock.setsockopt(zmq.SUBSCRIBE, DEFAULT_TOPIC.encode())
            endpoint = _bind_consecutive_ports(sock, ranks)
            # The publisher binds its replay socket. A name of our own in Linux's abstract socket
            # namespace cannot be taken by another process the way a free TCP port could between our
            # choice and its bind, and leaves no file behind when the engine is killed.
            # (vLLM suffixes an endpoint per data-parallel rank and refuses ipc ones then: replay stays off.)
            if ranks == 1:
                self._replay_endpoint = f"ipc://@dynamo-lite-kv-replay-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            engine_args.kv_events_config = KVEventsConfig(
                enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint,
                replay_endpoint=self._replay_endpoint, topic=DEFAULT_TOPIC)
        else:
            self._topic = user.topic
            sock.setsockopt(zmq.SUBSCRIBE, user.topic.encode())
            from vllm.distributed.kv_events import ZmqEventPublisher

            endpoint = user.endpoint
            for rank in range(ranks):  # each rank's publisher is on the endpoint offset by its rank
                rank_endpoint = ZmqEventPublisher.offset_endpoint_port(user.endpoint, rank)
                if _is_bind_endpoint(user.endpoint):
                    sock.connect(_reachable(rank_endpoint))
                else:
                    sock.bind(rank_endpoint)
            if user.replay_endpoint and ranks == 1:
                self._replay_endpoint = _reachable(user.replay_endpoint)
            engine_args.kv_events_config = dataclasses.replace(user)
        self._socket = sock
        logger.info("subscribed to vLLM KV events at %s (topic %r, replay %s)", endpoint, self._topic,
                    self._replay_endpoint or "off: set replay_endpoint in --kv-events-config")
        return True

    async def events(self) -> AsyncIterator[list[KvEvent]]:
        """Translated, non-empty event lists in engine order, until close() (all ranks' together)."""
        async for _rank, events in self.rank_events():
            yield events

    async def rank_events(self) -> AsyncIterator[tuple[int, list[KvEvent]]]:
        """(data-parallel rank, translated non-empty event list), each rank's in engine order, until
        close()."""
        sock, decoder = self._socket, self._decoder
        if sock is None or decoder is None:
            return
        self._consuming = True
        try:
            while not self._closed:
                if not await sock.poll(POLL_INTERVAL_MS, zmq.POLLIN):
                    continue
                frames = await sock.recv_multipart()
                if len(frames) != 3:
                    logger.warning("dropping KV event message of %d frames (want topic, seq, payload)",
                                   len(frames))
                    continue
                seq = int.from_bytes(frames[1], "big", signed=True)
                batch = self._decode(seq, frames[2], decoder)
                rank = (batch.data_parallel_rank or 0) if batch is not None else 0
                if not 0 <= rank < self.data_parallel_size:
                    logger.warning("dropping KV event batch %d of data-parallel rank %d (the engine has %d)",
                                   seq, rank, self.data_parallel_size)
                    continue
                last = self._last_seq.get(rank)
                if last is not None and seq > last + 1:
                    for missed_seq, payload in await self._replay(last + 1, seq):
                        missed = self._decode(missed_seq, payload, decoder)
                        if missed is not None and (events := self.translators[rank].translate(missed.events)):
                            yield rank, events
                elif last is not None and seq <= last:
                    logger.warning("KV event batch %d after %d: the publisher restarted its numbering",
                                   seq, last)
                self._last_seq[rank] = seq
                if batch is not None and (events := self.translators[rank].translate(batch.events)):
                    yield rank, events
        finally:
            self._consuming = False
            if self._closed:
                self._close_socket()

    @staticmethod
    def _decode(seq: int, payload: bytes, decoder: msgspec.msgpack.Decoder) -> Any:
        """vLLM's KVEventBatch, or None (logged) when the payload does not decode."""
        try:
            return decoder.decode(payload)
        except msgspec.DecodeError as e:
            logger.warning("dropping undecodable KV event batch %d: %s", seq, e)
            return None

    async def _replay(self, first: int, end: int) -> list[tuple[int, bytes]]:
        """Batches first..end-1 from the publisher's replay buffer, in order; what it no longer holds is
        counted as lost and logged (the routers' view of this worker then misses those changes)."""
        replayed: list[tuple[int, bytes]] = []
        if self._replay_endpoint is not None and self._context is not None:
            try:
                replayed = await self.fetch_replay(first, end)
            except TimeoutError:
                logger.warning("vLLM's KV event replay at %s did not answer within %d ms",
                               self._replay_endpoint, REPLAY_TIMEOUT_MS)
                self._close_replay_socket()  # a late answer must not be read as the next one
        lost = (end - first) - len(replayed)
        if lost:
            self.lost_batches += lost
            logger.warning("KV event gap: %d of batches %d..%d lost (dropped by the publisher%s); routers "
                           "may misjudge this worker's cache until those blocks change again", lost, first,
                           end - 1, "" if self._replay_endpoint else ", and replay is off")
        else:
            logger.info("KV event gap: batches %d..%d replayed", first, end - 1)
        return replayed

    async def fetch_replay(self, first: int, end: int) -> list[tuple[int, bytes]]:
        """(seq, payload) of the batches first..end-1 the publisher's replay buffer still holds, in order.
        TimeoutError when it does not answer within REPLAY_TIMEOUT_MS."""
        if self._replay_socket is None:
            self._replay_socket = self._context.socket(zmq.DEALER)
            self._replay_socket.setsockopt(zmq.LINGER, 0)
            self._replay_socket.connect(self._replay_endpoint)
        replay = self._replay_socket
        await replay.send_multipart([b"", first.to_bytes(8, "big")])
        wanted: list[tuple[int, bytes]] = []
        while True:
            if not await replay.poll(REPLAY_TIMEOUT_MS, zmq.POLLIN):
                raise TimeoutError
            reply = replay_frame(await replay.recv_multipart())
            if reply is None:
                continue
            seq, payload = reply
            if seq == END_SEQ:
                return wanted
            if first <= seq < end:
                wanted.append((seq, payload))

    def _close_replay_socket(self) -> None:
        if self._replay_socket is not None:
            self._replay_socket.close(linger=0)
            self._replay_socket = None

    def close(self) -> None:
        """Stop; the socket closes now, or when a running events() generator notices."""
        self._closed = True
        if not self._consuming:
            self._close_socket()

    def _close_socket(self) -> None:
        self._close_replay_socket()
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if self._context is not None:
            self._context.term()
            self._context = None

