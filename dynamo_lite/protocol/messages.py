"""Messages between processes: msgspec Structs, encoded as msgpack on the request plane and the
event plane, and as JSON in etcd.

Request plane: the client sends exactly one `Request` (a tagged union); the worker answers with a
stream of `Reply` frames, the final one with `last=True`. A stream that ends without a last frame
is a worker failure. Closing the connection cancels the request on the worker.
"""

from __future__ import annotations

import enum

import msgspec


class WorkerRole(enum.StrEnum):
    """What a worker does in the pipeline (InstanceRecord.role). A StrEnum: equal to its wire string."""

    AGGREGATED = "aggregated"  # prefill and decode of its own requests
    DECODE = "decode"  # decode of requests prefilled elsewhere (disaggregated serving)
    PREFILL = "prefill"  # prefill only, handing its KV cache to a decode worker


class FinishReason(enum.StrEnum):
    """Why a generation ended (GenerateFrame.finish_reason on the last frame); the OpenAI values plus
    "abort" (cancelled) and "error" (the engine failed it: the frontend retries or migrates)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


# --------------------------------------------------------------------------- discovery (etcd)


class InstanceRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One serving endpoint, stored under the worker's lease at instance_key()."""

    instance_id: int
    component: str  # protocol.keys.COMPONENT_BACKEND or COMPONENT_PREFILL
    address: str  # "host:port" of the request-plane TCP server, reachable from other hosts
    model: str  # served model name
    host: str  # the host name / address the worker advertises
    pid: int
    role: WorkerRole = WorkerRole.AGGREGATED
    # For `python -m dynamo_lite.doctor` (runtime/fingerprint.py): which machine, which package versions
    # ({"dynamo_lite": ..., "vllm": ..., "nixl": ...}) and which model files (a digest); every host of one
    # deployment must agree on them. Empty from older workers.
    hostname: str = ""
    versions: dict[str, str] = {}
    model_digest: str = ""
    # Data-parallel ranks behind this one address (vLLM's --data-parallel-size, the mocker's): each rank has
    # its own KV cache and events, and a router may name the rank a request runs on (GenerateRequest.dp_rank).
    data_parallel_size: int = 1


class ModelCard(msgspec.Struct, frozen=True, kw_only=True):
    """What a frontend needs to serve a model: stored per instance under model_card_key()."""

    name: str  # served model name (what clients put in "model")
    path: str  # model folder on the worker (the frontend reads the tokenizer from it if it can)
    context_length: int
    kv_block_size: int
    total_kv_blocks: int = 0
    migration_limit: int = 0
    engine: str = "vllm"  # "vllm" | "mocker"
    # More names clients may use for this model (vLLM's `--served-model-name a b`: "b" here). Routing,
    # events and metrics use `name`; a frontend answers with the name the client asked for.
    aliases: list[str] = []
    # "generate" (chat/completions) or "pooling" (an embedding model, vLLM's `--runner pooling`): the
    # frontend answers the other kind's endpoints with a 400.
    runner: str = "generate"


# --------------------------------------------------------------------------- request plane


class StructuredOutput(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A constraint for vLLM's structured-output engine (vLLM's StructuredOutputsParams): exactly one
    of json (a JSON Schema, as JSON text), regex, choice, grammar (EBNF/Lark), json_object or
    structural_tag is set. The frontend builds it from response_format, tool_choice or vLLM's own
    structured-output fields."""

    json: str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None


class SamplingOptions(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Engine-side sampling. Stop strings are not here: the frontend applies them on text."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: list[int] = []
    n: int = 1  # choices sampled from one prefill (vLLM's parallel sampling; frames carry the index)
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None  # vLLM tokenizes them with the model's tokenizer
    logprobs: int | None = None  # top-k alternatives per generated token (0: the sampled token's only)
    prompt_logprobs: int | None = None  # the same for the prompt tokens (completions' echo)
    structured_output: StructuredOutput | None = None


class GenerateRequest(msgspec.Struct, frozen=True, kw_only=True, tag="generate"):
    request_id: str
    token_ids: list[int]
    sampling: SamplingOptions
    # Disaggregation: {"do_remote_decode": True} on a prefill request; the prefill's returned params
    # on the decode request. Passed through to vLLM's KVTransferParams untouched.
    kv_transfer_params: dict | None = None
    # Migration: how many of token_ids' last tokens an earlier attempt generated. A structured output's
    # grammar has produced them already, so the engine advances it past them (vllm/structured_resume.py).
    resumed_tokens: int = 0
    # The data-parallel rank to run on (0..InstanceRecord.data_parallel_size-1), as the KV router chose it;
    # None lets the engine balance its ranks itself.
    dp_rank: int | None = None


# The files a frontend needs to tokenize and render chat; a worker sends whichever of these exist.
TOKENIZER_FILE_NAMES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                        "chat_template.jinja", "chat_template.json", "special_tokens_map.json")


class TokenizerFilesRequest(msgspec.Struct, frozen=True, tag="tokenizer_files"):
    """Ask a worker for its tokenizer files (frontend cannot read the model folder)."""


class WorkerStatsRequest(msgspec.Struct, frozen=True, tag="worker_stats"):
    """Ask a worker for its request counters (operators and tests)."""


class EmbedRequest(msgspec.Struct, frozen=True, kw_only=True, tag="embed"):
    """Embed each prompt (token ids) with a pooling model: one EmbedReply answers all of them."""

    request_id: str
    prompts: list[list[int]]
    dimensions: int | None = None  # Matryoshka truncation (vLLM's PoolingParams.dimensions)
    normalize: bool | None = None  # None: the model's pooler default


Request = GenerateRequest | TokenizerFilesRequest | WorkerStatsRequest | EmbedRequest


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """One position's log-probabilities: the chosen token's, its rank in the vocabulary (1 = most
    likely), and the engine's entries for the position as (token_id, logprob) pairs, most likely first:
    the top k asked for, and the chosen token when it is not among them (then k + 1 entries)."""

    token_id: int
    logprob: float
    rank: int | None = None
    top: list[tuple[int, float]] = []


class GenerateFrame(msgspec.Struct, kw_only=True, omit_defaults=True, tag="gen"):
    """A piece of a generation stream. token_ids are the new tokens since the previous frame, of choice
    `index` (0..n-1); with n > 1 the choices' frames interleave and each choice ends with its own
    finish_reason, the stream's final frame having last=True."""

    token_ids: list[int] = []
    index: int = 0
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when sampling.logprobs is set
    # On the first frame when sampling.prompt_logprobs is set: one per prompt token (None for the first).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: FinishReason | None = None  # set on the last frame
    prompt_tokens: int | None = None  # on the first frame
    cached_tokens: int | None = None  # prompt tokens served from the prefix cache (first frame)
    kv_transfer_params: dict | None = None  # prefill result for the decode worker (last frame)
    # Decode with remote prefill, first frame: KV bytes the engine pulled for this request and the time
    # the transfer took, when the engine can attribute them to it (None: not measured).
    kv_transfer_bytes: int | None = None
    kv_transfer_seconds: float | None = None
    # First frame, when the engine measures them: seconds the request waited in the engine's queue before
    # it was first scheduled, and from then to its first token (prefill). The frontend's stage metrics.
    queue_seconds: float | None = None
    prefill_seconds: float | None = None
    last: bool = False


class TokenizerFiles(msgspec.Struct, kw_only=True, tag="tokenizer_files"):
    files: dict[str, bytes]  # file name -> contents (tokenizer.json, tokenizer_config.json, ...)
    last: bool = True


class WorkerStats(msgspec.Struct, kw_only=True, tag="worker_stats"):
    active_requests: int  # generate streams currently running
    completed_requests: int  # streams that ended with a last frame
    aborted_requests: int  # streams cancelled because the client closed the connection
    generated_tokens: int
    last: bool = True


class ErrorFrame(msgspec.Struct, kw_only=True, tag="error"):
    """The worker could not serve the request. Always last."""

    message: str
    status: int = 500  # HTTP-like status: 4xx means the request itself is at fault
    last: bool = True


class EmbedReply(msgspec.Struct, kw_only=True, tag="embed"):
    embeddings: list[list[float]]  # one per EmbedRequest.prompts entry, in order
    prompt_tokens: int
    last: bool = True


class Heartbeat(msgspec.Struct, tag="hb"):
    """"Still working on it": sent by a worker's request plane about every second while a stream has
    nothing else to send (the request waits or prefills). The client reads it as proof of life and never
    passes it on; a stream silent for longer than the frontend's --heartbeat-timeout is a hung worker."""

    last: bool = False


Reply = GenerateFrame | TokenizerFiles | WorkerStats | ErrorFrame | EmbedReply | Heartbeat

# --------------------------------------------------------------------------- event plane (NATS)


class BlockStored(msgspec.Struct, frozen=True, kw_only=True, tag="stored"):
    """Blocks added to a worker's prefix cache, in chain order.

    Field names follow vLLM's KV events. block_hashes are content hashes (protocol.hashing) computed
    by the worker from token_ids, not the engine's internal hashes, so routers never depend on them.
    """

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int


class BlockRemoved(msgspec.Struct, frozen=True, kw_only=True, tag="removed"):
    block_hashes: list[int]  # content hashes, as in BlockStored


class AllBlocksCleared(msgspec.Struct, frozen=True, tag="cleared"):
    pass


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KvEventBatch(msgspec.Struct, frozen=True, kw_only=True):
    """One relayed batch. seq increases by one per batch per worker, so routers detect gaps."""

    worker_id: int
    seq: int
    events: list[KvEvent]
    timestamp: float = 0.0  # time.time() at the engine, for event-lag metrics
    # The data-parallel rank whose cache the events describe: each rank of a worker is its own stream,
    # numbered by its own seq and resynced on its own subject (keys.resync_subject).
    dp_rank: int = 0


class KvResyncRequest(msgspec.Struct, frozen=True):
    """Request-reply on resync_subject(): the answer is a KvEventBatch holding a clear followed by
    one BlockStored per cached chain (hashes and parents; token_ids left empty), with the worker's
    current seq."""


class LoadReport(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: int
    active_blocks: int
    total_blocks: int
    running_requests: int
    waiting_requests: int
    timestamp: float = 0.0
    dp_rank: int = 0  # the data-parallel rank this load is of (KvEventBatch.dp_rank)


# Shared encoders/decoders: building them once is much cheaper than per message.
msgpack_encoder = msgspec.msgpack.Encoder()
request_decoder = msgspec.msgpack.Decoder(Request)
reply_decoder = msgspec.msgpack.Decoder(Reply)
kv_batch_decoder = msgspec.msgpack.Decoder(KvEventBatch)
load_decoder = msgspec.msgpack.Decoder(LoadReport)
json_encoder = msgspec.json.Encoder()
instance_json_decoder = msgspec.json.Decoder(InstanceRecord)
card_json_decoder = msgspec.json.Decoder(ModelCard)
