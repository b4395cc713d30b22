"""Logprobs in OpenAI's shapes, with token strings made the way vLLM's server makes them.

Workers send one `TokenLogprob` per token: the chosen token's logprob and rank, and the alternatives vLLM
returned for that position (at most k + 1 entries for k requested: the chosen one and the top k), most
likely first. vLLM's server keeps each position as a dict in insertion order, the chosen token first,
then the top k; the chat API reports its first k entries, the completions API all of them
(OpenAI's "logprobs + 1"). `position_entries` rebuilds that order.

Token strings: vLLM's engine decodes each id alone (`tokenizer.decode([id])`, special tokens kept; a
SentencePiece tokenizer's stripped leading space restored), and a string ending in U+FFFD (a byte of
a character split over several tokens) is decoded again after up to 4 preceding chosen tokens of the
same sequence, keeping only what this token adds ("" if the character is still incomplete). The
context of generated tokens is the generated tokens only; of prompt tokens, the prompt.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer

from dynamo_lite.protocol.messages import TokenLogprob

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 4  # vLLM's max_context for the replacement-character correction


def _leading_space_marker(tokenizer: Tokenizer) -> str | None:
    """Metaspace's replacement character (SentencePiece models), whose leading instance decode() strips."""
    pre = json.loads(tokenizer.to_str()).get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace":
        return pre.get("replacement", "▁")
    for sub in pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else ():
        if sub.get("type") == "Metaspace":
            return sub.get("replacement", "▁")
    return None


class TokenStrings:
    """vLLM's per-token strings for one tokenizer (single-id decodes cached: the vocabulary is small)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._marker = _leading_space_marker(tokenizer)
        self._cache: dict[int, str] = {}

    def decode(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False) or ""
            if self._marker is not None:
                raw = self._tokenizer.id_to_token(token_id) or ""
                markers = len(raw) - len(raw.lstrip(self._marker))
                missing = markers - (len(text) - len(text.lstrip(" ")))
                if missing > 0:
                    text = " " * missing + text
            self._cache[token_id] = text
        return text

    def at_position(self, token_ids: Iterable[int], context: Sequence[int]) -> list[str]:
        """The strings of one position's alternatives, after the sequence's preceding chosen tokens."""
        out = []
        for token_id in token_ids:
            text = self.decode(token_id)
            if text.endswith(REPLACEMENT):
                text = self._completed(token_id, context)
            out.append(text)
        return out

    def _completed(self, token_id: int, context: Sequence[int]) -> str:
        """vLLM's _correct_decoded_token: what `token_id` adds to the text of up to 4 context tokens."""
        context = list(context[-CONTEXT_TOKENS:])
        for count in range(1, len(context) + 1):
            tail = context[-count:]
            full = self._tokenizer.decode(tail + [token_id], skip_special_tokens=False)
            if full.endswith(REPLACEMENT):
                continue
            clean_end = len(tail)
            for j in range(len(tail) - 1, -1, -1):  # context bytes of the same character belong to this token
                if self.decode(tail[j]).endswith(REPLACEMENT):
                    clean_end = j
                else:
                    break
            prefix = self._tokenizer.decode(tail[:clean_end], skip_special_tokens=False) if clean_end else ""
            if full.startswith(prefix):
                return full[len(prefix):]
            common = 0
            for a, b in zip(prefix, full):
                if a != b:
                    break
                common += 1
            return full[common:]
        return ""


def position_entries(lp: TokenLogprob) -> list[tuple[int, float]]:
    """One position as vLLM's server holds it: the chosen token first, then the others most likely first."""
    return [(lp.token_id, lp.logprob), *((t, v) for t, v in lp.top if t != lp.token_id)]


class Position:
    """One resolved position: the chosen token's string and logprob, and the entries' strings."""

    __slots__ = ("entries", "logprob", "token")

    def __init__(self, token: str, logprob: float | None, entries: list[tuple[str, float]] | None):
        self.token = token
        self.logprob = logprob
        self.entries = entries  # dict order, None for a position nothing predicts (the prompt's first)


class SequenceLogprobs:
    """Resolves one sequence's positions (a choice's generated tokens, or the prompt) in order."""

    def __init__(self, strings: TokenStrings):
        self._strings = strings
        self._context: list[int] = []

    def add(self, logprobs: Iterable[TokenLogprob | None], token_ids: Sequence[int] = ()) -> list[Position]:
        """token_ids: the tokens of the positions (only read where a position is None)."""
        out = []
        for i, lp in enumerate(logprobs):
            if lp is None:  # the prompt's first token: vLLM decodes it alone and reports no logprob
                out.append(Position(self._strings.decode(token_ids[i]), None, None))
                continue
            entries = position_entries(lp)
            texts = self._strings.at_position((t for t, _ in entries), self._context)
            out.append(Position(texts[0], lp.logprob, [(s, v) for s, (_, v) in zip(texts, entries)]))
            self._context.append(lp.token_id)
            if len(self._context) > CONTEXT_TOKENS:
                del self._context[0]
        return out


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_content(positions: Sequence[Position], top_logprobs: int) -> list[dict]:
    """choices[i].logprobs.content of the chat API."""
    return [{"token": p.token, "logprob": p.logprob, "bytes": _utf8(p.token),
             "top_logprobs": [{"token": s, "logprob": v, "bytes": _utf8(s)}
                              for s, v in p.entries[:top_logprobs]]}
            for p in positions]


class CompletionOffsets:
    """text_offset of the completions API: each token's start in the concatenated token strings."""

    __slots__ = ("offset",)

    def __init__(self) -> None:
        self.offset = 0


def completion_logprobs(positions: Sequence[Position], offsets: CompletionOffsets) -> dict:
    """choices[i].logprobs of the completions API (`top_logprobs` as {token string: logprob})."""
    tokens, token_logprobs, tops, text_offset = [], [], [], []
    for p in positions:
        tokens.append(p.token)
        token_logprobs.append(p.logprob)
        tops.append(None if p.entries is None else {s: v for s, v in p.entries})
        text_offset.append(offsets.offset)
        offsets.offset += len(p.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
            "text_offset": text_offset}


def vllm_prompt_logprobs(prompt: Sequence[TokenLogprob | None], requested: int,
                         strings: TokenStrings) -> list[dict | None]:
    """vLLM's own prompt_logprobs field: per prompt token None (the first) or {token id: {logprob, rank,
    decoded_token}} in vLLM's dict order, the top `requested` ranked 1..requested."""
    sequence = SequenceLogprobs(strings)
    out: list[dict | None] = []
    for lp in prompt:
        if lp is None:
            out.append(None)
            continue
        [position] = sequence.add([lp])
        top = [e for e in lp.top if e[0] != lp.token_id] if len(lp.top) > requested else list(lp.top)
        ranks = {t: i for i, (t, _) in enumerate(top, start=1)}
        entry = {}
        for (token_id, value), (text, _) in zip(position_entries(lp), position.entries):
            rank = ranks.get(token_id, lp.rank)  # only the chosen token can be outside the top
            entry[str(token_id)] = {"logprob": value, "rank": rank, "decoded_token": text}
        out.append(entry)
    return out
