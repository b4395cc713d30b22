"""A faster encode, by tiktoken, for byte-level BPE tokenizers with the GPT-2 pre-tokenizer (SmolLM2, GPT-2).

`tokenizers.Tokenizer.encode` spends most of its time in bookkeeping (offsets, alignments) that the
frontend never reads (~1.3 µs per token) and holds the GIL while it does. tiktoken runs the same
byte-level BPE in Rust at ~0.2 µs per token and releases the GIL, so the frontend can tokenize long
prompts in threads while its event loop goes on serving other requests.

tiktoken is built from tokenizer.json the way its own GPT-2 encoding is built from GPT-2's merge list:
single bytes first, then each merge's product ranked by the merge's position (the model's ids are the
ranks when they rise in that order, as tokenizers' trainer numbers them; else ranks are mapped back to
ids). tiktoken merges the adjacent pair whose concatenation has the lowest rank, and takes a piece that
is a whole token as it is; BPE merges the adjacent pair with the earliest merge rule. They agree when
every token is made by one merge and the merges rebuild every token from its bytes, both checked at
load (a vocabulary where a token can only be reached by a merge order BPE never takes fails the second
check). Added tokens are split off first, leftmost-longest, as tokenizers' AddedVocabulary does.

Only used when this is exact: no normalizer, a plain ByteLevel pre-tokenizer (the GPT-2 pattern), BPE
without dropout or subword affixes, the two checks above, added tokens without strip rules; and only
after a self-check against the real encode on probe texts at load. Text with a character whose bytes
the vocabulary lacks (tokenizers drops such bytes, tiktoken cannot) goes to the real encoder.
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
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
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


def unencodable_characters(missing_bytes: list[int]) -> re.Pattern[str]:
    """Characters whose UTF-8 holds one of `missing_bytes`, and lone surrogates (which are not UTF-8)."""
    classes = [r"\ud800-\udfff"]
    for byte in missing_bytes:
        if byte < 0x80:
            first = last = byte
        elif 0xC2 <= byte <= 0xDF:  # a lead byte: the code points whose encoding it starts
            first = (byte & 0x1F) << 6
            last = first + 0x3F
        elif 0xE0 <= byte <= 0xEF:
            first = max((byte & 0x0F) << 12, 0x800)  # below U+0800 is two bytes
            last = ((byte & 0x0F) << 12) + 0xFFF
        elif 0xF0 <= byte <= 0xF4:
            first = max((byte & 0x07) << 18, 0x10000)  # below U+10000 is three bytes
            last = min(((byte & 0x07) << 18) + 0x3FFFF, 0x10FFFF)
        elif 0x80 <= byte <= 0xBF:  # a continuation byte: too many characters hold it
            raise ValueError(f"the vocabulary lacks byte 0x{byte:02x}")
        else:  # 0xC0, 0xC1 and 0xF5-0xFF never occur in UTF-8
            continue
        classes.append(f"{re.escape(chr(first))}-{re.escape(chr(last))}")
    return re.compile("[" + "".join(classes) + "]")


class _RankTable:
    """tokenizer.json's vocabulary as tiktoken ranks, and how ranks map back to the model's ids."""

    def __init__(self, tokenizer: Tokenizer, model: dict[str, Any], added_ids: set[int]):
        to_byte = _gpt2_byte_decoder()
        vocab: dict[str, int] = model["vocab"]
        singles = {token: token_id for token, token_id in vocab.items()
                   if len(token) == 1 and token_id not in added_ids}
        self.missing_bytes = sorted(set(range(256)) - {to_byte[token] for token in singles})
        ordered: list[tuple[bytes, int]] = [(bytes([to_byte[t]]), i) for t, i in sorted(singles.items())]
        made: set[str] = set()
        for merge in model["merges"]:
            left, right = merge.split(" ") if isinstance(merge, str) else merge
            product = left + right
            if product not in vocab:
                raise ValueError(f"merge {left!r} + {right!r} makes no token in the vocabulary")
            if product in made:
                raise ValueError(f"token {product!r} is made by more than one merge")
            made.add(product)
            ordered.append((bytes(to_byte[c] for c in product), vocab[product]))
        unranked = set(vocab.values()) - {token_id for _, token_id in ordered} - added_ids
        if unranked:
            raise ValueError(f"{len(unranked)} vocabulary tokens are neither a byte nor made by a merge")
        # tiktoken returns a piece that is a whole token as that token, where BPE runs the merges on it
        # (unless ignore_merges): the two agree only if every token's merges rebuild the token.
        for token, token_id in vocab.items():
            if token_id not in added_ids and [t.id for t in tokenizer.model.tokenize(token)] != [token_id]:
                raise ValueError(f"BPE does not rebuild token {token!r} from its bytes")
        merge_ids = [token_id for _, token_id in ordered[len(singles):]]
        if all(a < b for a, b in zip(merge_ids, merge_ids[1:])):
            # Ids already rise in merge order (tokenizers' trainer numbers them so): they are the ranks.
            self.ranks = dict(ordered)
            self.ids: list[int] | None = None
        else:
            self.ranks = {token: rank for rank, (token, _) in enumerate(ordered)}
            self.ids = [token_id for _, token_id in ordered]


class FastByteLevelEncoder:
    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any]):
        import tiktoken  # only needed (and only a dependency) for the fast path

        self._tokenizer = tokenizer
        added = {t["content"]: t["id"] for t in config.get("added_tokens") or []}
        table = _RankTable(tokenizer, config["model"], set(added.values()))
        self._bpe = tiktoken.Encoding("dynamo_lite", pat_str=BYTE_LEVEL_PATTERN, mergeable_ranks=table.ranks,
                                      special_tokens={})
        self._rank_to_id = table.ids.__getitem__ if table.ids is not None else None
        self._unencodable = unencodable_characters(table.missing_bytes)
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
            if self._unencodable.search(text) is not None:  # would be checked against itself
                return f"the vocabulary lacks bytes of common text such as {text[:40]!r}"
            for special in (False, True):
                expected = self._tokenizer.encode(text, add_special_tokens=special).ids
                if self.encode(text, special) != expected:
                    return f"self-check mismatch on {text[:40]!r}"
        return None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids tokenizers would give. Both tiktoken and the fallback release the GIL while they
        work, so calling this from a thread leaves the event loop free."""
        if self._unencodable.search(text) is not None:
            return self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        ids: list[int] = list(self._prefix) if add_special_tokens else []
        parts = self._added.split(text) if self._added is not None else [text]
        rank_to_id = self._rank_to_id
        for index, part in enumerate(parts):
            if index % 2:  # odd parts are the added tokens the split captured
                ids.append(self._added_ids[part])
            elif part:
                ranks = self._bpe.encode_ordinary(part)
                ids.extend(ranks if rank_to_id is None else map(rank_to_id, ranks))
        if add_special_tokens:
            ids.extend(self._suffix)
        return ids
