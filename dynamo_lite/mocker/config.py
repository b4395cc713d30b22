"""The mocker's configuration (flags after NVIDIA Dynamo's mocker) and what it reads from the model folder.

Every field is a flag with an environment twin (runtime.config). Values that depend on the model
folder (served name, context length, vocabulary) are resolved by `load_model_facts`, so building the
config never touches the disk.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from dynamo_lite.protocol.errors import ConfigError
from dynamo_lite.runtime.config import option

DEFAULT_MODEL_PATH = os.path.join("~", ".cache", "dynamo_lite", "models", "SmolLM2-135M-Instruct")
DEFAULT_CONTEXT_LENGTH = 8192
# Without a tokenizer we cannot know which ids are special; real tokenizers keep them low
# (SmolLM2: 0..16, Llama 2: 0..2), so draw above this one.
FIRST_ORDINARY_TOKEN_WITHOUT_TOKENIZER = 100


@dataclass(frozen=True)
class MockerConfig:
    model_path: str = option(DEFAULT_MODEL_PATH, "Model folder holding config.json (tokenizer files are "
                             "served to the frontend if present; no weights are read)")
    served_model_name: str = option("", "Model name clients use (default: the model folder's name)")
    num_workers: int = option(1, "Simulated workers in this process, each registered as its own instance")
    block_size: int = option(16, "Tokens per KV block")
    num_gpu_blocks_override: int = option(16384, "KV blocks per simulated worker")
    max_num_seqs: int = option(256, "Most requests running at once per worker")
    max_num_batched_tokens: int = option(8192, "Most tokens computed per step (prefill is chunked to fit)")
    speedup_ratio: float = option(1.0, "Divide every simulated step time by this (100000: as fast as "
                                  "possible)")
    enable_prefix_caching: bool = option(True, "Reuse cached KV blocks across requests and publish KV events",
                                         negatable=True)
    context_length: int = option(0, "Longest prompt + output in tokens (0: max_position_embeddings from "
                                 f"config.json, else {DEFAULT_CONTEXT_LENGTH})")
    is_prefill_worker: bool = option(False, "Register as a prefill worker (disaggregated serving)")
    is_decode_worker: bool = option(False, "Register with role 'decode' (disaggregated serving)")
    namespace: str = option("dynamo", "Namespace of etcd keys and NATS subjects")
    migration_limit: int = option(0, "How many times the frontend may migrate a request off a failed worker")
    advertise_host: str = option("127.0.0.1", "Address other hosts use to reach this worker")
    lease_ttl: float = option(10.0, "etcd lease TTL in seconds: how long a dead worker stays listed")
    drain_timeout: float = option(30.0, "Seconds in-flight requests may take to finish on shutdown")
    etcd_endpoints: str = option("http://127.0.0.1:2379", "etcd endpoints, comma-separated",
                                 env="ETCD_ENDPOINTS")
    nats_server: str = option("nats://127.0.0.1:4222", "NATS server URL", env="NATS_SERVER")

    def __post_init__(self) -> None:
        positive = {"--num-workers": self.num_workers, "--block-size": self.block_size,
                    "--num-gpu-blocks-override": self.num_gpu_blocks_override,
                    "--max-num-seqs": self.max_num_seqs,
                    "--max-num-batched-tokens": self.max_num_batched_tokens}
        for flag, value in positive.items():
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1 (got {value})", param=flag)
        if not self.speedup_ratio > 0:
            raise ConfigError(f"--speedup-ratio must be > 0 (got {self.speedup_ratio})",
                              param="--speedup-ratio")
        for flag, seconds in {"--lease-ttl": self.lease_ttl, "--drain-timeout": self.drain_timeout}.items():
            if not seconds > 0:
                raise ConfigError(f"{flag} must be > 0 (got {seconds})", param=flag)
        if self.context_length < 0:
            raise ConfigError(f"--context-length must be >= 0 (got {self.context_length})",
                              param="--context-length")
        if self.migration_limit < 0:
            raise ConfigError(f"--migration-limit must be >= 0 (got {self.migration_limit})",
                              param="--migration-limit")
        if self.is_prefill_worker and self.is_decode_worker:
            raise ConfigError("--is-prefill-worker and --is-decode-worker are mutually exclusive",
                              param="--is-prefill-worker")
        if self.context_length:
            check_pool_fits_context(self, self.context_length)

    @property
    def role(self) -> str:
        if self.is_prefill_worker:
            return "prefill"
        return "decode" if self.is_decode_worker else "aggregated"


def check_pool_fits_context(config: MockerConfig, context_length: int) -> None:
    """A request as long as the context must fit in the pool, or it would wait (or preempt itself) forever."""
    capacity = config.num_gpu_blocks_override * config.block_size
    if capacity < context_length:
        raise ConfigError(
            f"--num-gpu-blocks-override {config.num_gpu_blocks_override} x --block-size {config.block_size} "
            f"= {capacity} tokens cannot hold one request of --context-length {context_length}",
            param="--num-gpu-blocks-override")


@dataclass(frozen=True)
class ModelFacts:
    """What the mocker takes from the model folder."""

    path: str  # absolute folder path
    served_model_name: str
    context_length: int
    vocab_size: int
    # Token ids are drawn from [first_token_id, end_token_id): ordinary tokens only, never a special
    # token (so never EOS) and never an id the tokenizer cannot decode.
    first_token_id: int
    end_token_id: int
    special_token_ids: frozenset[int] = field(default_factory=frozenset)


def load_model_facts(config: MockerConfig) -> ModelFacts:
    """Read config.json (required) and tokenizer.json (optional) from --model-path."""
    path = os.path.abspath(os.path.expanduser(config.model_path))
    config_file = os.path.join(path, "config.json")
    try:
        with open(config_file, encoding="utf-8") as f:
            model_config = json.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"--model-path {path}: no config.json there", param="--model-path") from e
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model-path {path}: cannot read config.json: {e}", param="--model-path") from e
    # Multimodal configs keep the language model's fields under text_config.
    text_config = model_config.get("text_config") or {}
    vocab_size = model_config.get("vocab_size") or text_config.get("vocab_size")
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ConfigError(f"--model-path {path}: config.json has no usable vocab_size", param="--model-path")
    context_length = config.context_length or int(
        model_config.get("max_position_embeddings") or text_config.get("max_position_embeddings")
        or DEFAULT_CONTEXT_LENGTH)
    check_pool_fits_context(config, context_length)
    special, tokenizer_size = _read_tokenizer(path)
    first, end = ordinary_token_range(vocab_size, special, tokenizer_size)
    return ModelFacts(path=path, served_model_name=config.served_model_name or os.path.basename(path),
                      context_length=context_length, vocab_size=vocab_size, first_token_id=first,
                      end_token_id=end, special_token_ids=frozenset(special))


def _read_tokenizer(path: str) -> tuple[set[int], int | None]:
    """Special token ids and the size of the tokenizer's base vocabulary, if tokenizer.json is there."""
    try:
        with open(os.path.join(path, "tokenizer.json"), encoding="utf-8") as f:
            tokenizer = json.load(f)
    except (OSError, ValueError):
        return set(), None
    special = {int(t["id"]) for t in tokenizer.get("added_tokens", []) if "id" in t}
    vocab = (tokenizer.get("model") or {}).get("vocab")
    return special, (len(vocab) if isinstance(vocab, (dict, list)) and vocab else None)


def ordinary_token_range(vocab_size: int, special: set[int], tokenizer_size: int | None) -> tuple[int, int]:
    """The widest id range with no special token: above the low specials, below the high ones.

    config.json's vocab_size is often padded past the tokenizer (ids there decode to nothing), so the
    range also stops at the tokenizer's base vocabulary size when known.
    """
    end = min(vocab_size, tokenizer_size) if tokenizer_size else vocab_size
    if not special and tokenizer_size is None:
        first = min(FIRST_ORDINARY_TOKEN_WITHOUT_TOKENIZER, end // 2)
        return first, end
    low = [i for i in special if i < end // 2]
    high = [i for i in special if end // 2 <= i < end]
    first = max(low) + 1 if low else 0
    if high:
        end = min(high)
    if end - first < 1:
        raise ConfigError("the tokenizer leaves no ordinary token ids to generate", param="--model-path")
    return first, end
