"""Per-model state of the frontend: model card (from discovery) and tokenizer (loaded once).

The tokenizer comes from the card's model folder when this host can read it, else from one of the
model's workers (TokenizerFilesRequest). Loads are shared: concurrent first requests for a model
wait on one load instead of each starting their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass

from dynamo_lite.discovery.watcher import InstanceWatcher
from dynamo_lite.frontend.tokenizer import ModelTokenizer, folder_has_tokenizer, read_tokenizer_files
from dynamo_lite.protocol import keys
from dynamo_lite.protocol.errors import (ConfigError, DynamoLiteError, ModelNotFoundError,
                                         NoWorkerAvailableError, WorkerFailedError)
from dynamo_lite.protocol.messages import ErrorFrame, ModelCard, TokenizerFiles, TokenizerFilesRequest
from dynamo_lite.transport.client import RequestClient

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    name: str  # the model's name: what routing, events and metrics key on
    card: ModelCard
    tokenizer: ModelTokenizer
    # The name the client asked for: `name` or one of the card's aliases. Responses carry it in "model",
    # as vLLM's server answers with the --served-model-name the request used.
    requested_name: str = ""

    def __post_init__(self) -> None:
        if not self.requested_name:
            object.__setattr__(self, "requested_name", self.name)


class ModelRegistry:
    def __init__(self, watcher: InstanceWatcher, client: RequestClient, tokenizer_timeout: float = 30.0):
        self._watcher = watcher
        self._client = client
        self._tokenizer_timeout = tokenizer_timeout
        self._models: dict[str, ServedModel] = {}
        self._loading: dict[str, asyncio.Future[ModelTokenizer]] = {}

    async def get(self, requested: str) -> ServedModel:
        """The card and tokenizer of the model `requested` names (its name or an alias). Raises
        ModelNotFoundError if no live worker serves it."""
        name = self._watcher.resolve(requested)
        card = self._watcher.card(name) if name is not None else None
        if card is None:
            raise ModelNotFoundError(requested)
        served = await self._get(name, card)
        return served if requested == name else dataclasses.replace(served, requested_name=requested)

    async def _get(self, name: str, card: ModelCard) -> ServedModel:
        served = self._models.get(name)
        if served is not None and served.card == card:
            return served
        tokenizer = served.tokenizer if served is not None and served.card.path == card.path else None
        if tokenizer is None:
            tokenizer = await self._load_shared(name, card)
        served = ServedModel(name=name, card=card, tokenizer=tokenizer)
        self._models[name] = served
        return served

    async def _load_shared(self, name: str, card: ModelCard) -> ModelTokenizer:
        future = self._loading.get(name)
        if future is None:
            future = asyncio.ensure_future(self._load(name, card))
            self._loading[name] = future
            future.add_done_callback(lambda _: self._loading.pop(name, None))
        # shield: a client that disconnects must not cancel a load other requests wait on.
        return await asyncio.shield(future)

    async def _load(self, name: str, card: ModelCard) -> ModelTokenizer:
        if folder_has_tokenizer(card.path):
            logger.info("loading tokenizer of %s from %s", name, card.path)
            files = await asyncio.to_thread(read_tokenizer_files, card.path)
        else:
            logger.info("model folder %s not readable here: fetching the tokenizer of %s from a worker",
                        card.path, name)
            files = await self._fetch_files(name)
        try:
            return await asyncio.to_thread(ModelTokenizer.from_files, files)
        except ConfigError as e:
            raise NoWorkerAvailableError(f"cannot load the tokenizer of model {name}: {e.message}") from e

    async def _fetch_files(self, name: str) -> dict[str, bytes]:
        instances = self._watcher.instances(name, keys.COMPONENT_BACKEND) or self._watcher.instances(name)
        if not instances:
            raise NoWorkerAvailableError(f"no worker is serving model {name}")
        failure: DynamoLiteError | None = None
        for record in instances:
            try:
                reply = await self._client.call(record.address, TokenizerFilesRequest(), self._tokenizer_timeout)
            except (WorkerFailedError, asyncio.TimeoutError, OSError) as e:
                logger.warning("worker %x did not send tokenizer files: %s", record.instance_id, e)
                failure = e if isinstance(e, DynamoLiteError) else WorkerFailedError(str(e))
                continue
            if isinstance(reply, TokenizerFiles):
                return reply.files
            if isinstance(reply, ErrorFrame):
                failure = WorkerFailedError(f"worker {record.instance_id:x}: {reply.message}")
            else:
                failure = WorkerFailedError(f"worker {record.instance_id:x} answered {type(reply).__name__}")
        raise NoWorkerAvailableError(f"cannot fetch the tokenizer of model {name}: "
                                     f"{failure.message if failure else 'no answer'}")

    def cached(self, name: str) -> ServedModel | None:
        return self._models.get(name)
