"""etcd keys and NATS subjects. One place, so every process agrees on the layout.

etcd (all attached to the worker's lease):
    /{ns}/instances/{component}/{id:x}   -> InstanceRecord (msgspec JSON)
    /{ns}/models/{model}/{id:x}          -> ModelCard (msgspec JSON)
    /{ns}/event_endpoints/{bus id:x}     -> EventEndpoint (msgspec JSON; the embedded event bus's address,
                                            attached to that bus's own lease)
NATS:
    {ns}.kv_events.{model}               -> KvEventBatch
    {ns}.load.{model}                    -> LoadReport
    {ns}.resync.{id:x}                   -> request-reply: KvResyncRequest -> KvEventBatch (all blocks)
    {ns}.resync.{id:x}.{rank}            -> the same for data-parallel rank > 0 of the worker
"""

from __future__ import annotations

import re

COMPONENT_BACKEND = "backend"  # aggregated / decode workers
COMPONENT_PREFILL = "prefill"  # prefill workers (disaggregated serving)


def _subject_token(text: str) -> str:
    """NATS subject tokens cannot contain '.', '*', '>' or whitespace; model names can."""
    return re.sub(r"[.*>\s]", "_", text)


def instances_prefix(namespace: str) -> str:
    return f"/{namespace}/instances/"


def instance_key(namespace: str, component: str, instance_id: int) -> str:
    return f"/{namespace}/instances/{component}/{instance_id:x}"


def models_prefix(namespace: str) -> str:
    return f"/{namespace}/models/"


def model_card_key(namespace: str, model: str, instance_id: int) -> str:
    # Model names may contain '/', which is fine inside an etcd key: the instance id is always last.
    return f"/{namespace}/models/{model}/{instance_id:x}"


def event_endpoints_prefix(namespace: str) -> str:
    return f"/{namespace}/event_endpoints/"


def event_endpoint_key(namespace: str, bus_id: int) -> str:
    return f"/{namespace}/event_endpoints/{bus_id:x}"


def parse_instance_id(key: str) -> int:
    """The instance id (or event bus id) is the last path segment, in hex."""
    return int(key.rsplit("/", 1)[1], 16)


def kv_events_subject(namespace: str, model: str) -> str:
    return f"{namespace}.kv_events.{_subject_token(model)}"


def load_subject(namespace: str, model: str) -> str:
    return f"{namespace}.load.{_subject_token(model)}"


def resync_subject(namespace: str, instance_id: int, dp_rank: int = 0) -> str:
    # Rank 0 keeps the plain subject, so a worker without data parallelism answers as it always did.
    return f"{namespace}.resync.{instance_id:x}" + (f".{dp_rank}" if dp_rank else "")
