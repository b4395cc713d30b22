"""The frontend's configuration: one frozen dataclass, each field a flag with an environment twin."""

from __future__ import annotations

from dataclasses import dataclass

from dynamo_lite.runtime.config import option

ROUTER_MODES = ["round-robin", "random", "kv"]


@dataclass(frozen=True)
class FrontendConfig:
    http_host: str = option("0.0.0.0", "Address the HTTP server binds to.")
    http_port: int = option(8000, "Port of the OpenAI-compatible HTTP server.")
    router_mode: str = option("round-robin", "How a worker is picked for each request.", choices=ROUTER_MODES)
    namespace: str = option("dynamo", "Discovery namespace the workers register under.")
    etcd_endpoints: str = option("http://127.0.0.1:2379", "etcd endpoints (comma-separated).",
                                 env="ETCD_ENDPOINTS")
    nats_server: str = option("nats://127.0.0.1:4222", "NATS server URL (KV events for the kv router).",
                              env="NATS_SERVER")
    request_timeout: float = option(0.0, "Seconds to wait for each frame from a worker before the worker "
                                         "counts as failed (0 = wait forever).")
    tokenizer_timeout: float = option(30.0, "Seconds to wait for a worker to send its tokenizer files.")
    connect_timeout: float = option(5.0, "Seconds to wait for a TCP connection to a worker.")
    failed_cooldown: float = option(10.0, "Seconds a worker whose connection failed stays excluded.")
    log_level: str = option("info", "Log level (debug, info, warning, error).", env="DYN_LOG",
                            choices=["debug", "info", "warning", "error", "critical"])
