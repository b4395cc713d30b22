"""The mocker's configuration (flags after NVIDIA Dynamo's mocker) and what it reads from the model folder.

It extends the worker shell's config (engine.config): every option is a flag with an environment twin
(runtime.config), and the role follows from --is-prefill-worker / --is-decode-worker. Values that
depend on the model folder (served name, context length, vocabulary) are resolved by `load_model_facts`, so building the
config never touches the disk.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from dynamo_lite.engine.config import WorkerShellConfig, derived
from dynamo_lite.protocol import keys
from dynamo_lite.protocol.errors import ConfigError
from dynamo_lite.mocker.timing import TIMING_MODELS
from dynamo_lite.protocol.messages import WorkerRole
from dynamo_lite.runtime.config import option
from dynamo_lite.runtime.models import DEFAULT_MODEL_PATH, refuse_hub_id

DEFAULT_CONTEXT_LENGTH = 8192
# Without a tokenizer we cannot know which ids are special; real tokenizers keep them low
# (SmolLM2: 0..16, Llama 2: 0..2), so draw above this one.
FIRST_ORDINARY_TOKEN_WITHOUT_TOKENIZER = 100


@dataclass(frozen=True)
class MockerConfig(WorkerShellConfig):
    """The worker shell's flags plus the simulated engine's."""

    model_path: str = option(DEFAULT_MODEL_PATH, "Model folder holding config.json (tokenizer files are "
                             "served to the frontend if present; no weights are read)")
    served_model_name: str = option("", "Model name clients use (default: the --model-path value as given)")
    num_workers: int = option(1, "Simulated workers in this process, each registered as its own instance",
                              minimum=1)
    data_parallel_size: int = option(1, "Data-parallel ranks per simulated worker: one instance whose ranks "
                                     "each have their own KV cache and events (vLLM's --data-parallel-size)",
                                     minimum=1)
    block_size: int = option(16, "Tokens per KV block", minimum=1)
    num_gpu_blocks_override: int = option(16384, "KV blocks per simulated worker (per rank with "
                                          "--data-parallel-size)", minimum=1)
    max_num_seqs: int = option(256, "Most requests running at once per worker", minimum=1)
    max_num_batched_tokens: int = option(8192, "Most tokens computed per step (prefill is chunked to fit)",
                                         minimum=1)
    speedup_ratio: float = option(1.0, "Divide every simulated step time by this (100000: as fast as "
                                  "possible)", exclusive_minimum=0)
    timing: str = option("native", "Step-time model: native (attention over cached context costs) or dynamo "
                         "(NVIDIA Dynamo's mocker's default polynomials; see mocker/timing.py)",
                         choices=TIMING_MODELS)
    enable_prefix_caching: bool = option(True, "Reuse cached KV blocks across requests and publish KV events")
    context_length: int = option(0, "Longest prompt + output in tokens (0: max_position_embeddings from "
                                 f"config.json, else {DEFAULT_CONTEXT_LENGTH})", minimum=0)
    is_decode_worker: bool = option(False, "Register with role 'decode' (disaggregated serving)")
    component: str = derived(keys.COMPONENT_BACKEND)
    role: WorkerRole = derived(WorkerRole.AGGREGATED)
    engine_kind: str = derived("mocker")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.is_prefill_worker and self.is_decode_worker:
            raise ConfigError("--is-prefill-worker and --is-decode-worker are mutually exclusive",
                              param="--is-prefill-worker")
        if self.request_plane_port and self.num_workers > 1:
            raise ConfigError(f"--request-plane-port {self.request_plane_port} can serve one worker, not "
                              f"--num-workers {self.num_workers} (0 = a free port for each)",
                              param="--request-plane-port")
        if self.context_length:
            check_pool_fits_context(self, self.context_length)
        if self.is_prefill_worker:
            self.derive(component=keys.COMPONENT_PREFILL, role=WorkerRole.PREFILL)
        elif self.is_decode_worker:
            self.derive(role=WorkerRole.DECODE)


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
    refuse_hub_id(config.model_path, "--model-path")
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
    # The name a vLLM worker would serve too: what was given, unless --served-model-name says otherwise.
    return ModelFacts(path=path, served_model_name=config.served_model_name or config.model_path,
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
