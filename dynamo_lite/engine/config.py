"""WorkerShellConfig: what the worker shell needs, and the flags every worker command shares.

The vLLM worker's and the mocker's configs extend it with their engine's own flags. Fields made with
`option()` are flags with environment twins (runtime.config); the others are set by code: a worker
command derives them from its flags (`derive`), tests set them directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dynamo_lite import planes
from dynamo_lite.protocol import keys
from dynamo_lite.protocol.errors import ConfigError
from dynamo_lite.protocol.messages import WorkerRole
from dynamo_lite.runtime.config import check_ranges, option


@dataclass(frozen=True)
class WorkerShellConfig(planes.PlaneOptions):
    """The worker shell's options; the planes' options (--discovery, --event-plane, ...) come from
    planes.PlaneOptions."""

    namespace: str = option("dynamo", "Namespace of every discovery key and event subject.")
    is_prefill_worker: bool = option(False, "Serve as a prefill worker of disaggregated serving (registers "
                                     "under the prefill component).")
    advertise_host: str = option("127.0.0.1", "Address other hosts reach this worker's request plane at "
                                 "(never localhost across hosts).")
    request_plane_port: int = option(0, "TCP port of the request plane (0 = any free port).",
                                     minimum=0, maximum=65535)
    lease_ttl: float = option(10.0, "Discovery lease TTL in seconds: how long a dead worker stays listed.",
                              exclusive_minimum=0)
    drain_timeout: float = option(30.0, "Seconds in-flight requests may take to finish on shutdown.",
                                  minimum=0)
    metrics_endpoint_port: int = option(0, "Port of this process's HTTP side port: /live, /ready (engines "
                                        "loaded and registered) and /metrics (the engine's own metrics and "
                                        "the worker's). 0 = off.", minimum=0, maximum=65535)
    migration_limit: int = option(0, "How many times the frontend may migrate a request of this model to "
                                  "another worker when this one dies mid-stream (0 = never).", minimum=0)
    # Set by code, not flags.
    component: str = keys.COMPONENT_BACKEND  # where the instance registers (protocol.keys)
    role: WorkerRole = WorkerRole.AGGREGATED
    host: str = "0.0.0.0"  # interface the request-plane server binds
    load_report_interval: float = 0.25  # seconds between load reports on the event plane
    engine_kind: str = "vllm"  # engine name recorded in the model card

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.advertise_host in ("0.0.0.0", "::") or self.advertise_host.startswith("localhost"):
            raise ConfigError("--advertise-host must be an address other processes can connect to, "
                              f"not {self.advertise_host!r}", param="--advertise-host")
        self._resolve_planes()

    def derive(self, **values: Any) -> None:
        """Set fields that follow from flags (from a subclass's __post_init__: the config is frozen)."""
        for name, value in values.items():
            object.__setattr__(self, name, value)


def derived(default: Any) -> Any:
    """A subclass's redeclaration of a shell field that its own flags decide (not an argument)."""
    return dataclasses.field(default=default, init=False)
