"""The worker shell shared by every engine: serve the request plane, register in discovery under a
lease, run the engine, hand its KV events and load to the event plane (engine.kv_publisher), and shut
down gracefully (deregister, drain, cancel).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

from dynamo_lite import planes
from dynamo_lite.discovery.base import Discovery, Lease
from dynamo_lite.engine.base import Engine, EngineInfo
from dynamo_lite.engine.config import WorkerShellConfig
from dynamo_lite.engine.kv_publisher import KvEventPublisher
from dynamo_lite.engine.side_port import SidePortServer, render_registries
from dynamo_lite.events.base import EventBus
from dynamo_lite.protocol import keys
from dynamo_lite.protocol.messages import (
    TOKENIZER_FILE_NAMES, EmbedRequest, GenerateRequest, InstanceRecord, ModelCard, Reply, Request,
    TokenizerFiles, TokenizerFilesRequest, WorkerStats, WorkerStatsRequest, json_encoder)
from dynamo_lite.protocol.errors import ConfigError, EngineDiedError, InvalidRequestError
from dynamo_lite.runtime import fingerprint
from dynamo_lite.runtime.lifecycle import drain, freeze_startup_heap, install_shutdown_signals
from dynamo_lite.transport.server import RequestServer

logger = logging.getLogger(__name__)


class WorkerShell:
    """Wraps one Engine into a discoverable worker. `owns_clients`: close discovery and events on
    shutdown (when nobody else shares them)."""

    def __init__(self, engine: Engine, discovery: Discovery, events: EventBus | None,
                 config: WorkerShellConfig, *, owns_clients: bool = False):
        self._engine = engine
        self._discovery = discovery
        self._events = events
        self._config = config
        self._owns_clients = owns_clients
        self._info: EngineInfo | None = None
        self._server: RequestServer | None = None
        self._address = ""
        self._lease: Lease | None = None
        self._record: InstanceRecord | None = None
        self._publisher: KvEventPublisher | None = None
        self._tasks: list[asyncio.Task] = []
        self._active = self._completed = self._aborted = self._generated_tokens = 0
        self._failed = 0  # requests the engine ended with an error
        # Full prompt blocks of generate requests and those the engine found in its prefix cache:
        # their ratio is the hit rate weighted by blocks (side port /metrics, engine.worker_metrics).
        self._prompt_blocks = self._cached_blocks = 0
        self._shutdown_started = False
        self._shutdown_done = asyncio.Event()
        self.engine_failure: str | None = None  # why the engine died (set once; run_workers then exits)
        self.engine_died = asyncio.Event()

    @property
    def instance_id(self) -> int:
        return self._record.instance_id if self._record else 0

    @property
    def record(self) -> InstanceRecord | None:
        return self._record

    @property
    def address(self) -> str:
        return self._address

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def info(self) -> EngineInfo | None:
        return self._info

    @property
    def config(self) -> WorkerShellConfig:
        return self._config

    @property
    def publisher(self) -> KvEventPublisher | None:
        return self._publisher

    @property
    def ready(self) -> bool:
        """Loaded and registered, and not shutting down (the side port's /ready)."""
        return self._record is not None and not self._shutdown_started

    @property
    def counters(self) -> dict[str, int]:
        """Running totals for /metrics: requests by outcome, generated tokens, prompt and cached blocks."""
        return {"completed": self._completed, "aborted": self._aborted, "failed": self._failed,
                "generated_tokens": self._generated_tokens, "prompt_blocks": self._prompt_blocks,
                "cached_blocks": self._cached_blocks}

    @property
    def stats(self) -> WorkerStats:
        return WorkerStats(active_requests=self._active, completed_requests=self._completed,
                           aborted_requests=self._aborted, generated_tokens=self._generated_tokens)

    async def start(self) -> InstanceRecord:
        # The port first: a taken port is then reported at once, not after the engine took its time to load.
        # Nobody sends requests before the address is registered, which needs the engine's info.
        auth = self._config.credentials.request_auth()
        server = RequestServer(self._handle, self._config.host, self._config.request_plane_port, auth=auth)
        try:
            port = await server.start()
        except OSError as e:
            where = f"{self._config.host}:{self._config.request_plane_port}"
            raise ConfigError(f"cannot bind the request plane to {where} ({e.strerror or e}): choose another "
                              "port with --request-plane-port (0 = any free port)",
                              param="--request-plane-port") from e
        self._server = server
        self._address = f"{self._config.advertise_host}:{port}"
        if auth is None and not planes.is_loopback(self._config.advertise_host):
            logger.warning("request plane at %s is unauthenticated: whoever reaches the port can run "
                           "requests here; give every component the same --plane-secret-file "
                           "(docs/security.md)",
                           self._address)
        self._info = await self._engine.start()
        await self._register()
        if self._events is not None:
            publisher = self._publisher = KvEventPublisher(
                self._events, self._config.namespace, self._info.model_name, self._info.data_parallel_size)
            publisher.worker_id = self.instance_id
            await publisher.serve_resync()
            self._tasks.append(asyncio.create_task(publisher.relay(self._engine), name="kv-event-relay"))
            self._tasks.append(asyncio.create_task(
                publisher.report_load(self._engine, self._config.load_report_interval), name="load-report"))
        self._tasks.append(asyncio.create_task(self._keep_registered(), name="lease-monitor"))
        self._tasks.append(asyncio.create_task(self._watch_engine(), name="engine-monitor"))
        assert self._record is not None
        ranks = self._info.data_parallel_size
        logger.info("worker %x serving %s at %s (%s%s)", self.instance_id, self._info.model_name,
                    self._address, self._config.role, f", {ranks} data-parallel ranks" if ranks > 1 else "")
        return self._record

    async def shutdown(self) -> None:
        """Deregister, stop accepting, drain, cancel the rest, stop the engine. Safe to call twice."""
        if self._shutdown_started:
            await self._shutdown_done.wait()
            return
        self._shutdown_started = True
        try:
            for task in self._tasks:
                if task.get_name() == "lease-monitor":
                    task.cancel()
            if self._lease is not None:
                try:
                    await asyncio.wait_for(self._lease.revoke(), timeout=5.0)
                except Exception as e:  # the lease then expires on its own after its ttl
                    logger.warning("could not revoke lease %x: %r", self._lease.id, e)
            if self._server is not None:
                self._server.stop_accepting()
                cancelled = await drain(self._server.stream_tasks(), self._config.drain_timeout)
                if cancelled:
                    logger.warning("cancelled %d request(s) still running after %.1f s", cancelled,
                                   self._config.drain_timeout)
                await self._server.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._publisher is not None:
                await self._publisher.stop_resync()
            await self._engine.shutdown()
            if self._owns_clients:
                if self._events is not None:
                    await self._events.close()
                await self._discovery.close()
            logger.info("worker %x shut down", self.instance_id)
        finally:
            self._shutdown_done.set()

    # ------------------------------------------------------------------ request plane

    def _handle(self, request: Request) -> AsyncIterator[Reply]:
        if isinstance(request, GenerateRequest):
            ranks = self._info.data_parallel_size if self._info is not None else 1
            if request.dp_rank is not None and not 0 <= request.dp_rank < ranks:
                raise InvalidRequestError(f"dp_rank {request.dp_rank} is out of range: this worker has "
                                          f"{ranks} data-parallel rank(s)", param="dp_rank")
            return self._generate(request)
        if isinstance(request, TokenizerFilesRequest):
            return self._tokenizer_files()
        if isinstance(request, WorkerStatsRequest):
            return self._single(self.stats)
        if isinstance(request, EmbedRequest):
            return self._embed(request)
        raise InvalidRequestError(f"unsupported request {type(request).__name__}")

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[Reply]:
        self._active += 1
        finished = False
        # The frontend's request id (from the client's X-Request-Id when it sent one): what the engine
        # gets too, so one id follows a request through every log.
        logger.debug("request %s: %d prompt tokens, max_tokens %d", request.request_id,
                     len(request.token_ids), request.sampling.max_tokens)
        frames = self._engine.generate(request)
        try:
            async for frame in frames:
                self._generated_tokens += len(frame.token_ids)
                if frame.prompt_tokens is not None and self._info is not None:
                    block_size = self._info.kv_block_size or 1
                    self._prompt_blocks += frame.prompt_tokens // block_size
                    self._cached_blocks += (frame.cached_tokens or 0) // block_size
                if frame.last:
                    finished = True
                    # Let the engine's generator end on its own: closing it at its last yield would
                    # look like an abort to an engine that aborts on GeneratorExit.
                    await anext(frames, None)
                    yield frame
                    return
                yield frame
        except (asyncio.CancelledError, GeneratorExit):
            if not finished:
                self._aborted += 1
                logger.debug("request %s aborted", request.request_id)
            raise
        except Exception:
            self._failed += 1
            raise
        finally:
            self._active -= 1
            if finished:
                self._completed += 1
            aclose = getattr(frames, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _embed(self, request: EmbedRequest) -> AsyncIterator[Reply]:
        logger.debug("request %s: embed %d prompts", request.request_id, len(request.prompts))
        self._active += 1
        try:
            yield await self._engine.embed(request)
            self._completed += 1
        finally:
            self._active -= 1

    async def _tokenizer_files(self) -> AsyncIterator[Reply]:
        assert self._info is not None
        folder = Path(self._info.model_path)

        def read_all() -> dict[str, bytes]:
            return {name: (folder / name).read_bytes() for name in TOKENIZER_FILE_NAMES
                    if (folder / name).is_file()}

        yield TokenizerFiles(files=await asyncio.to_thread(read_all))

    @staticmethod
    async def _single(reply: Reply) -> AsyncIterator[Reply]:
        yield reply

    # ------------------------------------------------------------------ discovery

    async def _register(self) -> int:
        """Register under a new lease; returns the instance id (the lease id)."""
        info, config = self._info, self._config
        assert info is not None
        lease = await self._discovery.grant_lease(config.lease_ttl)
        digest = await asyncio.to_thread(fingerprint.model_digest, info.model_path)
        record = InstanceRecord(instance_id=lease.id, component=config.component, address=self._address,
                                model=info.model_name, host=config.advertise_host, pid=os.getpid(),
                                role=config.role, hostname=socket.gethostname(),
                                versions=fingerprint.component_versions(),
                                model_digest=digest, data_parallel_size=info.data_parallel_size)
        card = ModelCard(name=info.model_name, path=info.model_path, context_length=info.context_length,
                         kv_block_size=info.kv_block_size, total_kv_blocks=info.total_kv_blocks,
                         migration_limit=config.migration_limit, engine=config.engine_kind,
                         aliases=list(info.model_aliases), runner=info.runner)
        # The card goes first, so whoever sees the instance can already read its card.
        await self._discovery.put(keys.model_card_key(config.namespace, info.model_name, lease.id),
                                  json_encoder.encode(card), lease)
        await self._discovery.put(keys.instance_key(config.namespace, config.component, lease.id),
                                  json_encoder.encode(record), lease)
        self._lease, self._record = lease, record
        return lease.id

    async def _keep_registered(self) -> None:
        """Re-register under a new lease if the store lost ours (e.g. etcd restarted meanwhile)."""
        interval = min(1.0, self._config.lease_ttl / 4)
        while True:
            await asyncio.sleep(interval)
            if self._lease is None or not self._lease.lost:
                continue
            old_id = self._lease.id
            try:
                if self._publisher is not None:
                    await self._publisher.reregister(self._register)
                else:
                    await self._register()
            except Exception as e:
                logger.warning("lease %x lost and re-registration failed (retrying): %r", old_id, e)
                continue
            logger.warning("lease %x was lost: re-registered as instance %x", old_id, self.instance_id)

    async def _watch_engine(self, interval: float = 1.0) -> None:
        """Notice an engine that died (Engine.failure): nothing can serve here any more."""
        while self.engine_failure is None:
            await asyncio.sleep(interval)
            failure = self._engine.failure()
            if failure is not None:
                logger.error("worker %x: the engine died (%s): deregistering and exiting so that a "
                             "supervisor restarts it", self.instance_id, failure)
                self.engine_failure = failure
                self.engine_died.set()

    def relayed_blocks(self) -> set[int]:
        """Content hashes of the blocks this worker has announced on the event plane (what a resync sends)."""
        return self._publisher.relayed_blocks() if self._publisher is not None else set()


async def run_workers(engines: list[Engine], configs: list[WorkerShellConfig], discovery: Discovery,
                      events: EventBus | None, *, shutdown: asyncio.Event | None = None) -> None:
    """Serve every engine on the planes given until `shutdown` is set (default: until SIGTERM/SIGINT).

    Without an event bus, workers serve without KV events and load reports, and routers fall back to
    approximate routing. The caller keeps ownership of `discovery` and `events`.
    """
    if len(engines) != len(configs):
        raise ValueError("run_workers needs one WorkerShellConfig per engine")
    if shutdown is None:
        shutdown = asyncio.Event()
        install_shutdown_signals(shutdown)
    shells = [WorkerShell(engine, discovery, events, config) for engine, config in zip(engines, configs)]
    # The side port first: /live answers while the engines load, and a taken port fails at once.
    side_port = await start_side_port(shells, configs[0])
    starting = asyncio.ensure_future(asyncio.gather(*(shell.start() for shell in shells)))
    stopping = asyncio.ensure_future(shutdown.wait())
    dying = [asyncio.ensure_future(shell.engine_died.wait()) for shell in shells]
    try:
        await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            logger.info("shutdown requested while starting")
        else:
            starting.result()  # raises if an engine failed to start
            freeze_startup_heap()
            await asyncio.wait((stopping, *dying), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (starting, stopping, *dying):
            task.cancel()
        await asyncio.gather(starting, stopping, *dying, return_exceptions=True)
        await asyncio.gather(*(shell.shutdown() for shell in shells), return_exceptions=True)
        if side_port is not None:
            await side_port.close()
    failures = [shell.engine_failure for shell in shells if shell.engine_failure is not None]
    if failures:
        raise EngineDiedError(f"engine died: {failures[0]}")


async def start_side_port(shells: list[WorkerShell], config: WorkerShellConfig) -> SidePortServer | None:
    """The process's /live, /ready and /metrics on --metrics-endpoint-port (None when it is 0)."""
    if not config.metrics_endpoint_port:
        return None
    from prometheus_client import REGISTRY, CollectorRegistry

    from dynamo_lite.engine.worker_metrics import WorkerMetricsCollector

    shell_registry = CollectorRegistry(auto_describe=True)
    shell_registry.register(WorkerMetricsCollector(shells))
    # Every engine of a process shares prometheus_client's process-wide registry (vLLM's, or the default
    # one with the process metrics); list it once.
    engine_registry = shells[0].engine.prometheus_registry() or REGISTRY
    server = SidePortServer(config.host, config.metrics_endpoint_port,
                            ready=lambda: all(shell.ready for shell in shells),
                            metrics=lambda: render_registries([engine_registry, shell_registry]))
    await server.start()
    return server


async def serve_workers(engines: list[Engine], configs: list[WorkerShellConfig], *, discovery_url: str,
                        event_bus_url: str | None, event_bus_connect_timeout: float = 5.0,
                        client_name: str | None = None) -> None:
    """What a worker command runs: connect the planes the URLs name (dynamo_lite.planes), then
    run_workers on them until SIGTERM/SIGINT, sharing one discovery and one event-bus connection.

    The event bus is optional: without it (empty url, or unreachable within
    event_bus_connect_timeout) workers serve without KV events and load reports.
    """
    shutdown = asyncio.Event()
    install_shutdown_signals(shutdown)  # before connecting: a signal while waiting for etcd still counts
    first = configs[0]
    async with planes.announce_planes(first.role, first.namespace, discovery_url, event_bus_url):
        await _serve_on_planes(engines, configs, discovery_url, event_bus_url, event_bus_connect_timeout,
                               client_name, shutdown)


async def _serve_on_planes(engines: list[Engine], configs: list[WorkerShellConfig], discovery_url: str,
                           event_bus_url: str | None, event_bus_connect_timeout: float,
                           client_name: str | None, shutdown: asyncio.Event) -> None:
    discovery = await planes.connect_discovery(discovery_url, credentials=configs[0].credentials)
    events: EventBus | None = None
    try:
        if event_bus_url:
            try:
                events = await asyncio.wait_for(
                    planes.connect_event_bus(event_bus_url, name=client_name,
                                             connect_timeout=event_bus_connect_timeout, discovery=discovery,
                                             namespace=configs[0].namespace,
                                             advertise_host=configs[0].advertise_host,
                                             credentials=configs[0].credentials),
                    event_bus_connect_timeout)
            except ConfigError:
                raise
            except Exception as e:
                logger.warning("event bus at %s unreachable (%r): serving without KV events or load reports",
                               event_bus_url, e)
        await run_workers(engines, configs, discovery, events, shutdown=shutdown)
    finally:
        if events is not None:
            await events.close()
        await discovery.close()
