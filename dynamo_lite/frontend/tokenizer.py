"""A model's tokenizer and chat template, loaded from its files without transformers.

`tokenizers.Tokenizer` does the encoding; the chat template is rendered with jinja2 the way
transformers' `apply_chat_template` does it (same sandbox, same helpers, special tokens as
variables), so prompts are byte-identical to what the model was trained on. Files come from the
model folder when the frontend can read it, else from a worker (TokenizerFilesRequest).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from dynamo_lite.frontend.fast_bpe import FastByteLevelEncoder
from dynamo_lite.frontend.logprobs import TokenStrings
from dynamo_lite.protocol.errors import ConfigError, InvalidRequestError
from dynamo_lite.protocol.messages import TOKENIZER_FILE_NAMES

logger = logging.getLogger(__name__)

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # transformers overrides jinja's tojson, which would HTML-escape '<', '>' and '&'.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile like transformers' _compile_jinja_template (without its {% generation %} tracker)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _token_text(value: Any) -> str | None:
    """Special tokens in tokenizer_config.json are strings or AddedToken dicts."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _select_template(value: Any) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of {name, template} (take 'default')."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


class ModelTokenizer:
    """Encoder, chat template and special tokens of one model. Immutable after construction."""

    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any], chat_template: str | None,
                 generation_config: dict[str, Any] | None = None,
                 fast_encoder: FastByteLevelEncoder | None = None):
        self.tokenizer = tokenizer
        self._fast_encoder = fast_encoder
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_tokens: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            text = _token_text(config.get(name))
            if text is not None:
                self.special_tokens[name] = text
        self.chat_template_source = chat_template
        self._template = compile_chat_template(chat_template) if chat_template else None
        eos_text = self.special_tokens.get("eos_token")
        # The tokenizer's own EOS: vLLM reports a stop on it with stop_reason null, on other ids with the id.
        self.eos_token_id = tokenizer.token_to_id(eos_text) if eos_text is not None else None
        self.eos_token_ids = self._find_eos_ids(generation_config or {})

    def _find_eos_ids(self, generation_config: dict[str, Any]) -> list[int]:
        """EOS ids from generation_config.json (may be a list), plus the tokenizer's eos_token."""
        ids = _as_id_list(generation_config.get("eos_token_id"))
        if self.eos_token_id is not None and self.eos_token_id not in ids:
            ids.append(self.eos_token_id)
        return ids

    @functools.cached_property
    def token_strings(self) -> TokenStrings:
        """Token strings for logprobs (built on first use: most requests never ask for them)."""
        return TokenStrings(self.tokenizer)

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._fast_encoder is not None:
            return self._fast_encoder.encode(text, add_special_tokens)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_without_gil(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The same ids as `encode`, computed with the GIL released, so a thread running it leaves the
        event loop free: the fast path (tiktoken releases it), else Rust's `encode_batch` (`encode` does
        not release it)."""
        if self._fast_encoder is not None:
            return self._fast_encoder.encode(text, add_special_tokens)
        return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, extra: dict[str, Any] | None = None) -> str:
        """The chat prompt as text, as transformers' apply_chat_template(tokenize=False) renders it."""
        if self._template is None:
            raise InvalidRequestError("this model has no chat template: use /v1/completions", param="messages")
        variables = dict(self.special_tokens)
        if extra:
            variables.update(extra)
        try:
            return self._template.render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as e:
            # raise_exception() in a template means the conversation breaks the model's rules.
            raise InvalidRequestError(f"chat template error: {e}", param="messages") from e
        except Exception as e:  # e.g. a template adding a string to a field the client left out
            raise InvalidRequestError(f"the chat template cannot render these messages: "
                                      f"{type(e).__name__}: {e}", param="messages") from e

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, extra: dict[str, Any] | None = None) -> list[int]:
        # The template already holds BOS etc.; transformers encodes it with add_special_tokens=False.
        text = self.render_chat(messages, add_generation_prompt, tools, extra)
        return self.encode(text, add_special_tokens=False)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> ModelTokenizer:
        """Build from file contents (name -> bytes), as read from a folder or sent by a worker."""
        if "tokenizer.json" not in files:
            raise ConfigError("model has no tokenizer.json (only fast tokenizers are supported)")
        try:
            tokenizer_json = files["tokenizer.json"].decode("utf-8")
            tokenizer = Tokenizer.from_str(tokenizer_json)
            config = _load_json(files, "tokenizer_config.json")
            generation_config = _load_json(files, "generation_config.json")
            for name, value in _load_json(files, "special_tokens_map.json").items():
                config.setdefault(name, value)
        except Exception as e:  # tokenizers raises a plain Exception on a bad tokenizer.json
            raise ConfigError(f"cannot load tokenizer files: {e}") from e
        template = None
        if "chat_template.jinja" in files:
            template = files["chat_template.jinja"].decode("utf-8")
        elif "chat_template.json" in files:
            template = _select_template(_load_json(files, "chat_template.json").get("chat_template"))
        if template is None:
            template = _select_template(config.get("chat_template"))
        fast_encoder = FastByteLevelEncoder.build(tokenizer, tokenizer_json)
        return cls(tokenizer, config, template, generation_config, fast_encoder)

    @classmethod
    def from_folder(cls, path: str | Path) -> ModelTokenizer:
        return cls.from_files(read_tokenizer_files(path))


def _load_json(files: dict[str, bytes], name: str) -> dict[str, Any]:
    if name not in files:
        return {}
    value = json.loads(files[name])
    return value if isinstance(value, dict) else {}


def read_tokenizer_files(path: str | Path) -> dict[str, bytes]:
    """The tokenizer files present in a model folder."""
    folder = Path(path).expanduser()
    return {name: (folder / name).read_bytes() for name in TOKENIZER_FILE_NAMES if (folder / name).is_file()}


def folder_has_tokenizer(path: str | Path) -> bool:
    """True when this process can read the folder's tokenizer.json (else a worker sends the files)."""
    file = Path(path).expanduser() / "tokenizer.json"
    try:
        return file.is_file() and os.access(file, os.R_OK)
    except OSError:
        return False
