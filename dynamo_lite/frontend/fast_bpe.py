"""A faster encode for byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen, ...).

`tokenizers.Tokenizer.encode` spends most of its time in bookkeeping (offsets, alignments) that
the frontend never reads: ~2 µs per token, the largest single cost of a request. The pieces its
pre-tokenizer splits text into are encoded independently of each other, so the same split done
with the `regex` module plus a cache of piece -> ids gives the same ids several times faster (real
text repeats its words). The Rust tokenizer still encodes every piece the first time it is seen.

Only used when the tokenizer's structure makes this exact (no normalizer, a plain ByteLevel
pre-tokenizer with the GPT-2 pattern, BPE without dropout, added tokens without strip rules), and
only after a self-check against the real encode on probe texts at load.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

# tokenizers' ByteLevel pre-tokenizer pattern (GPT-2).
BYTE_LEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The same split for ASCII-only text, for the standard library's `re` (about 3x faster than `regex` with
# Unicode properties). For ASCII, \p{L} is [A-Za-z], \p{N} is [0-9] and Unicode White_Space is
# [\t\n\v\f\r ] (not `re`'s \s, which also takes \x1c-\x1f), so the two patterns split alike.
_ASCII_SPACE = r"\t\n\x0b\x0c\r "
ASCII_BYTE_LEVEL_PATTERN = (rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_ASCII_SPACE}A-Za-z0-9]+"""
                            rf"""|[{_ASCII_SPACE}]+(?![^{_ASCII_SPACE}])|[{_ASCII_SPACE}]+""")
MAX_CACHED_PIECE = 64  # longer pieces (base64 blobs, long digit runs) are rare: encode them directly
MAX_CACHE_ENTRIES = 200_000  # ~30 MB at most; cleared when full

PROBE_TEXTS = (
    "Hello world! What's the capital of France? I'll say: it's Paris.",
    "  leading spaces,\ttabs\t\tand\n\nnewlines \n trailing   ",
    "Numbers 12345 3.14159 -42 1e10 0x1F, dates 2024-01-31 and 10:30pm",
    "Unicode: héllo wörld ñandú 日本語の文章 中文 한국어 emoji 🙂👍🏽 ∑∫√ — “quotes” «guillemets»",
    "code: def f(x):\n    return x**2  # comment\n\tif a != b: print(\"{}\".format(a))",
    "CONTRACTIONS: They're here, we've seen, I'd go, you'll see, he's, can't, won't 'quoted'",
    "   ",
    "\u00a0non\u2009breaking\u3000spaces\u200b and \r\n windows line ends \x0b\x0c",
)


def _structure_allows_fast_path(config: dict[str, Any]) -> str | None:
    """None if the fast path is exact for this tokenizer.json, else the reason it is not."""
    if config.get("normalizer") is not None:
        return "has a normalizer"
    pre = config.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        return "pre-tokenizer is not a plain ByteLevel"
    model = config.get("model") or {}
    if model.get("type") != "BPE" or model.get("dropout") not in (None, 0, 0.0):
        return "model is not BPE without dropout"
    for token in config.get("added_tokens") or []:
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            return f"added token {token.get('content')!r} has strip rules"
    return None


class FastByteLevelEncoder:
    def __init__(self, tokenizer: Tokenizer, added_tokens: dict[str, int]):
        import regex  # only needed (and only a dependency) for the fast path

        self._tokenizer = tokenizer
        self._pieces = regex.compile(BYTE_LEVEL_PATTERN)
        self._ascii_pieces = re.compile(ASCII_BYTE_LEVEL_PATTERN)
        # Added tokens are matched first, leftmost-longest, as tokenizers' AddedVocabulary does.
        by_length = sorted(added_tokens, key=len, reverse=True)
        self._added = regex.compile("(" + "|".join(regex.escape(t) for t in by_length) + ")") if by_length else None
        self._added_ids = added_tokens
        self._cache: dict[str, list[int]] = {}
        self._prefix: list[int] = []
        self._suffix: list[int] = []

    @classmethod
    def build(cls, tokenizer: Tokenizer, tokenizer_json: str) -> FastByteLevelEncoder | None:
        """The fast encoder if it is exact for this tokenizer (checked on probes), else None."""
        try:
            config = json.loads(tokenizer_json)
            reason = _structure_allows_fast_path(config)
            if reason is None:
                added = {t["content"]: t["id"] for t in config.get("added_tokens") or []}
                encoder = cls(tokenizer, added)
                encoder._learn_special_affixes()
                reason = encoder._self_check(list(added))
        except ImportError:
            reason = "the regex module is not installed"
        except Exception as e:  # anything unexpected in the file: the exact (slower) path is fine
            reason = f"{type(e).__name__}: {e}"
        if reason is not None:
            logger.info("fast tokenizer path disabled: %s", reason)
            return None
        return encoder

    def _learn_special_affixes(self) -> None:
        """What the post-processor adds with add_special_tokens=True (BOS/EOS around the text)."""
        plain = self._tokenizer.encode("a", add_special_tokens=False).ids
        full = self._tokenizer.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                self._prefix, self._suffix = full[:start], full[start + len(plain):]
                return
        raise ValueError("cannot locate the text inside the post-processed encoding")

    def _self_check(self, added: list[str]) -> str | None:
        texts = list(PROBE_TEXTS) + [f"{a}user\n{PROBE_TEXTS[0]}{a} x{a}" for a in added[:8]]
        for text in texts:
            for special in (False, True):
                expected = self._tokenizer.encode(text, add_special_tokens=special).ids
                if self.encode(text, special) != expected:
                    return f"self-check mismatch on {text[:40]!r}"
        self._cache.clear()
        return None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = list(self._prefix) if add_special_tokens else []
        parts = self._added.split(text) if self._added is not None else [text]
        cache = self._cache
        for index, part in enumerate(parts):
            if index % 2:  # odd parts are the added tokens the split captured
                ids.append(self._added_ids[part])
                continue
            pieces = self._ascii_pieces if part.isascii() else self._pieces
            for piece in pieces.findall(part):
                piece_ids = cache.get(piece)
                if piece_ids is None:
                    piece_ids = self._tokenizer.encode(piece, add_special_tokens=False).ids
                    if len(piece) <= MAX_CACHED_PIECE:
                        if len(cache) >= MAX_CACHE_ENTRIES:
                            cache.clear()
                        cache[piece] = piece_ids
                ids.extend(piece_ids)
        if add_special_tokens:
            ids.extend(self._suffix)
        return ids
