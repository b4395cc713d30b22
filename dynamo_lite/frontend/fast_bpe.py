"""A faster encode for byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen, ...), run by tiktoken.

`tokenizers.Tokenizer.encode` spends most of its time in bookkeeping (offsets, alignments) that the
frontend never reads (~1.3 µs per token) and holds the GIL while it does. tiktoken runs the same
byte-level BPE in Rust at ~0.2 µs per token and releases the GIL, so the frontend can tokenize long
prompts in threads while its event loop goes on serving other requests.

tiktoken is built from tokenizer.json the way its own GPT-2 encoding is built from GPT-2's merge list:
single bytes first, then each merge's product ranked by the merge's position. tiktoken merges the
adjacent pair whose concatenation has the lowest rank, which is BPE's rule (merge the pair with the
earliest merge) when every token comes from exactly one merge. It returns ranks, mapped back to the
model's ids here. Added tokens are split off first, leftmost-longest, as tokenizers' AddedVocabulary
does.

Only used when this is exact: no normalizer, a plain ByteLevel pre-tokenizer (the GPT-2 pattern), BPE
without dropout, every token made by one merge, added tokens without strip rules; and only after a
self-check against the real encode on probe texts at load. Text with a character whose bytes the
vocabulary lacks (tokenizers drops such bytes, tiktoken cannot) goes to the real encoder.
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


def _gpt2_byte_decoder() -> dict[str, int]:
    """ByteLevel's printable stand-in character -> the byte it stands for (GPT-2's bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + shifted)
            shifted += 1
    return {chr(char): byte for byte, char in zip(printable, chars)}


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
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "BPE has subword affixes"
    for token in config.get("added_tokens") or []:
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            return f"added token {token.get('content')!r} has strip rules"
    return None


class _RankTable:
    """tokenizer.json's vocabulary as tiktoken ranks, and rank -> the model's id."""

    def __init__(self, model: dict[str, Any], added: set[str]):
        to_byte = _gpt2_byte_decoder()
        vocab: dict[str, int] = model["vocab"]
        self.ranks: dict[bytes, int] = {}
        self.ids: list[int] = []
        for token, token_id in sorted(vocab.items(), key=lambda item: item[1]):
            if len(token) == 1 and token not in added:
                self._add(bytes([to_byte[token]]), token_id)
        self.missing_bytes = sorted(set(range(256)) - {b[0] for b in self.ranks})
        for merge in model["merges"]:
            left, right = merge.split(" ") if isinstance(merge, str) else merge
            product = left + right
            if product not in vocab:
                raise ValueError(f"merge {left!r} + {right!r} makes no token in the vocabulary")
            as_bytes = bytes(to_byte[c] for c in product)
            if as_bytes in self.ranks:
                raise ValueError(f"token {product!r} is made by more than one merge")
            self._add(as_bytes, vocab[product])
        unranked = len(vocab) - len(self.ids) - len(added & vocab.keys())
        if unranked:
            raise ValueError(f"{unranked} vocabulary tokens are neither a byte nor made by a merge")

    def _add(self, token: bytes, token_id: int) -> None:
        self.ranks[token] = len(self.ids)
        self.ids.append(token_id)

    def unencodable_pattern(self) -> re.Pattern[str]:
        """Characters whose UTF-8 holds a byte the vocabulary lacks, and lone surrogates (not UTF-8)."""
        classes = [r"\ud800-\udfff"]
        for byte in self.missing_bytes:
            if byte < 0x80:
                classes.append(re.escape(chr(byte)))
            elif 0xC2 <= byte <= 0xDF:  # lead byte of the 64 two-byte code points it starts
                start = (byte & 0x1F) << 6
                classes.append(f"{re.escape(chr(start))}-{re.escape(chr(start + 0x3F))}")
            elif 0xE0 <= byte <= 0xEF:
                start = (byte & 0x0F) << 12
                classes.append(f"{re.escape(chr(start))}-{re.escape(chr(start + 0xFFF))}")
            elif 0xF0 <= byte <= 0xF4:
                start = (byte & 0x07) << 18
                classes.append(f"{re.escape(chr(start))}-{re.escape(chr(min(start + 0x3FFFF, 0x10FFFF)))}")
            elif 0x80 <= byte <= 0xBF:  # a continuation byte: too many characters hold it
                raise ValueError(f"the vocabulary lacks byte 0x{byte:02x}")
            # 0xC0, 0xC1 and 0xF5-0xFF never occur in UTF-8.
        return re.compile("[" + "".join(classes) + "]")


class FastByteLevelEncoder:
    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any]):
        import tiktoken  # only needed (and only a dependency) for the fast path

        self._tokenizer = tokenizer
        added = {t["content"]: t["id"] for t in config.get("added_tokens") or []}
        table = _RankTable(config["model"], set(added))
        self._bpe = tiktoken.Encoding("dynamo_lite", pat_str=BYTE_LEVEL_PATTERN, mergeable_ranks=table.ranks,
                                      special_tokens={})
        self._rank_to_id = table.ids.__getitem__
        self._unencodable = table.unencodable_pattern()
        # Leftmost-longest, as tokenizers' AddedVocabulary matches them.
        by_length = sorted(added, key=len, reverse=True)
        self._added = re.compile("(" + "|".join(re.escape(t) for t in by_length) + ")") if by_length else None
        self._added_ids = added
        self._prefix: list[int] = []
        self._suffix: list[int] = []

    @classmethod
    def build(cls, tokenizer: Tokenizer, tokenizer_json: str) -> FastByteLevelEncoder | None:
        """The fast encoder if it is exact for this tokenizer (checked on probes), else None."""
        try:
            config = json.loads(tokenizer_json)
            reason = _structure_allows_fast_path(config)
            if reason is None:
                encoder = cls(tokenizer, config)
                encoder._learn_special_affixes()
                reason = encoder._self_check(list(encoder._added_ids))
        except ImportError:
            reason = "tiktoken is not installed"
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
        return None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids tokenizers would give. tiktoken releases the GIL while it works, so calling this
        from a thread leaves the event loop free."""
        if self._unencodable.search(text) is not None:
            return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        ids: list[int] = list(self._prefix) if add_special_tokens else []
        parts = self._added.split(text) if self._added is not None else [text]
        rank_to_id = self._rank_to_id
        for index, part in enumerate(parts):
            if index % 2:  # odd parts are the added tokens the split captured
                ids.append(self._added_ids[part])
            elif part:
                ids.extend(map(rank_to_id, self._bpe.encode_ordinary(part)))
        if add_special_tokens:
            ids.extend(self._suffix)
        return ids
