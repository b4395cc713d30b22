"""The frontend's configuration: one frozen dataclass, each field a flag with an environment twin."""

from __future__ import annotations

from dataclasses import dataclass

from dynamo_lite.frontend.chat_output import REASONING_PARSERS, TOOL_PARSERS
from dynamo_lite.planes import PlaneOptions
from dynamo_lite.protocol.errors import ConfigError
from dynamo_lite.runtime.config import check_ranges, option

ROUTER_MODES = ["round-robin", "random", "kv"]


@dataclass(frozen=True)
class FrontendConfig(PlaneOptions):
    """The frontend's options; the planes' (--discovery, --event-plane, ...) come from PlaneOptions."""

    http_host: str = option("0.0.0.0", "Address the HTTP server binds to.")
    http_port: int = option(8000, "Port of the OpenAI-compatible HTTP server.")
    router_mode: str = option("round-robin", "How a worker is picked for each request.", choices=ROUTER_MODES)
    namespace: str = option("dynamo", "Discovery namespace the workers register under.")
    request_timeout: float = option(0.0, "Seconds to wait for each token frame from a worker before the "
                                         "worker counts as failed (0 = wait forever; heartbeats do not count: this "
                                         "also bounds a long prefill).", minimum=0)
    heartbeat_timeout: float = option(5.0, "Seconds a worker may send nothing at all, neither tokens nor the "
                                           "heartbeat it sends every second while a request waits or "
                                           "prefills, before it counts as hung: the request is retried or "
                                           "migrated and the worker excluded until it answers again "
                                           "(0 = never).", minimum=0)
    tokenizer_timeout: float = option(30.0, "Seconds to wait for a worker to send its tokenizer files.")
    connect_timeout: float = option(5.0, "Seconds to wait for a TCP connection to a worker.")
    failed_cooldown: float = option(10.0, "Seconds a worker that failed (connection refused, hung) stays "
                                          "excluded; then it is routed to again once it answers a probe.",
                                    minimum=0)
    kv_overlap_score_weight: float = option(1.0, "kv router: weight of the prompt blocks a worker would have "
                                                 "to compute, against its active blocks (0 = load only).",
                                            minimum=0)
    router_interference_weight: float = option(0.0, "kv router: extra cost per new prompt block for each "
                                                    "request still prefilling on a worker (0 = off; "
                                                    "docs/routing.md).", minimum=0)
    router_temperature: float = option(0.0, "kv router: 0 picks the lowest cost; > 0 samples workers from a "
                                            "softmax over normalized costs.", minimum=0)
    kv_cache_block_size: int = option(0, "kv router: tokens per KV block (0 = from the model card).",
                                     minimum=0)
    kv_events: bool = option(True, "kv router: follow the workers' KV events on the event plane "
                                   "(--no-kv-events: approximate mode, the router remembers the prefixes it "
                                   "routed).")
    router_ttl: float = option(120.0, "kv router, approximate mode: seconds a routed prefix counts as cached.",
                              exclusive_minimum=0)
    disaggregation: bool = option(True, "Disaggregated serving when prefill workers are registered: prefill on a "
                                        "prefill worker, decode on a backend worker (--no-disaggregation: every "
                                        "request is served aggregated on a backend worker).")
    disagg_min_prefill_tokens: int = option(256, "Disaggregated serving: prompts whose uncached part (prompt "
                                                 "tokens minus what the router predicts the decode worker has "
                                                 "cached) is shorter than this prefill on the decode worker.",
                                            minimum=0)
    max_prefill_queue: int = option(4, "Disaggregated serving: in-flight prefills per prefill worker above which "
                                       "the pool counts as busy and requests prefill on the decode worker "
                                       "(0 = no limit).", minimum=0)
    enforce_disagg: bool = option(False, "Disaggregated serving only: with no prefill worker registered, answer "
                                         "503 instead of serving aggregated.")
    # Admission control (frontend/admission.py): every limit 0 = off (the default).
    max_concurrency: int = option(0, "Requests per model this frontend serves at once; more wait in the admission "
                                     "queue (0 = no limit).", minimum=0)
    busy_kv_usage: float = option(0.0, "A worker whose last load report shows this KV cache usage fraction "
                                       "(0-1) or more is busy; requests wait while every worker of their model "
                                       "is busy (0 = off; needs --router-mode kv with KV events).",
                                  minimum=0, maximum=1)
    busy_waiting_requests: int = option(0, "A worker whose last load report shows this many requests waiting in "
                                           "its engine or more is busy (0 = off; needs --router-mode kv with KV "
                                           "events).", minimum=0)
    queue_timeout: float = option(30.0, "Seconds a request may wait in the admission queue before it is refused "
                                        "with 503 and Retry-After (0 = refuse at once).", minimum=0)
    max_queued_requests: int = option(1024, "Requests per model that may wait in the admission queue; more are "
                                            "refused with 503 at once.", minimum=0)
    # What one HTTP request may cost (frontend/http_limits.py): 0 = no limit.
    max_body_bytes: int = option(32 * 1024 * 1024, "Largest request body accepted; larger ones are answered 413 "
                                                   "(0 = no limit).", minimum=0)
    max_header_bytes: int = option(64 * 1024, "Largest total size of a request's headers (names and values); "
                                              "larger ones are answered 431 (0 = no limit).", minimum=0)
    header_read_timeout: float = option(20.0, "Seconds a client may take to send a request's line and headers, "
                                              "from the connection's start (or the request's first byte on a "
                                              "kept-alive connection); a slower one is answered 408 and closed "
                                              "(0 = wait forever).", minimum=0)
    body_read_timeout: float = option(60.0, "Seconds a client may take to send its whole request body; a slower "
                                            "one is answered 408 (0 = wait forever).", minimum=0)
    # Operations (as vLLM's server has them): API keys, CORS.
    api_key: tuple[str, ...] = option((), "API keys: requests under /v1 must send one as 'Authorization: Bearer "
                                          "KEY', else 401 (none = no check; /health, /live, /metrics, "
                                          "/tokenize, /detokenize and /version stay open, as in vLLM).",
                                      secret=True)
    tls_cert_file: str = option("", "TLS: the server certificate (PEM, the chain after it) the frontend serves "
                                "HTTPS with, together with --tls-key-file (none = plain HTTP).")
    tls_key_file: str = option("", "TLS: the private key (PEM) of --tls-cert-file.")
    allowed_origins: tuple[str, ...] = option((), "CORS: origins allowed cross-origin access ('*' for any; "
                                                  "none = no cross-origin access).")
    allowed_methods: tuple[str, ...] = option(("*",), "CORS: methods allowed cross-origin.")
    allowed_headers: tuple[str, ...] = option(("*",), "CORS: request headers allowed cross-origin.")
    allow_credentials: bool = option(False, "CORS: allow cookies and Authorization headers cross-origin.")
    # Chat answers beyond text.
    tool_call_parser: str = option("", "How tool calls are read from a model's text for tool_choice 'auto': "
                                       f"{', '.join(TOOL_PARSERS)} (openai: gpt-oss harmony; none: 'auto' answers 400; 'required' and "
                                       "named functions need no parser).")
    reasoning_parser: str = option("", "How a model's reasoning is split from its answer into the 'reasoning' "
                                       f"field: {', '.join(REASONING_PARSERS)} (none: reasoning stays in "
                                       "the content).")
    log_level: str = option("info", "Log level (debug, info, warning, error).", env="DYN_LOG",
                            choices=["debug", "info", "warning", "error", "critical"])

    def __post_init__(self) -> None:
        check_ranges(self)
        # Picks etcd / NATS or the embedded planes; the kv router's events then always have a plane
        # (the embedded one when no NATS server is given).
        self._resolve_planes()
        if self.tool_call_parser and self.tool_call_parser not in TOOL_PARSERS:
            raise ConfigError(f"unknown --tool-call-parser '{self.tool_call_parser}': choose one of "
                              f"{', '.join(TOOL_PARSERS)}", param="--tool-call-parser")
        if self.reasoning_parser and self.reasoning_parser not in REASONING_PARSERS:
            raise ConfigError(f"unknown --reasoning-parser '{self.reasoning_parser}': choose one of "
                              f"{', '.join(REASONING_PARSERS)}", param="--reasoning-parser")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            given, missing = ("--tls-cert-file", "--tls-key-file") if self.tls_cert_file else \
                ("--tls-key-file", "--tls-cert-file")
            raise ConfigError(f"{given} needs {missing} too (HTTPS takes both)", param=missing)
        if self.enforce_disagg and not self.disaggregation:
            raise ConfigError("--enforce-disagg contradicts --no-disaggregation", param="--enforce-disagg")
