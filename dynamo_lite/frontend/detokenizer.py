"""Incremental detokenization and stop strings.

Tokens arrive a few at a time; `tokenizers.decoders.DecodeStream` turns them into text without
re-decoding the whole output (and waits while a UTF-8 character spans several tokens). Stop
strings are matched on that text: the output is cut before the first match, and text that could be
the start of a stop string is held back until the next tokens settle it, so a stop string split
across tokens never leaks to the client.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# How many prompt tokens seed the decoder: enough context for tokenizers whose decoding of a token
# depends on the one before (SentencePiece's leading-space rule), cheap to copy.
PROMPT_CONTEXT_TOKENS = 4


class StopMatcher:
    """Finds stop strings in streamed text and holds back possible partial matches."""

    __slots__ = ("matched", "stops", "_include_stop", "_max_len", "_pending")

    def __init__(self, stops: Sequence[str], include_stop: bool = False):
        self.stops = [s for s in stops if s]
        self._include_stop = include_stop  # vLLM's include_stop_str_in_output: the match is emitted too
        self._max_len = max((len(s) for s in self.stops), default=0)
        self._pending = ""
        self.matched: str | None = None  # the stop string found (vLLM's stop_reason)

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit now, whether a stop string was found)."""
        if not self.stops:
            return text, False
        pending = self._pending + text
        first, first_stop = -1, ""
        for stop in self.stops:
            index = pending.find(stop)
            if index != -1 and (first == -1 or index < first):
                first, first_stop = index, stop
        if first != -1:
            self._pending = ""
            self.matched = first_stop
            return pending[:first + len(first_stop) if self._include_stop else first], True
        hold = self._partial_match_length(pending)
        if hold:
            self._pending = pending[-hold:]
            return pending[:-hold], False
        self._pending = ""
        return pending, False

    def _partial_match_length(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        for length in range(min(len(text), self._max_len - 1), 0, -1):
            tail = text[-length:]
            if any(stop.startswith(tail) for stop in self.stops):
                return length
        return 0

    def flush(self) -> str:
        """The held-back text, once the stream ended without completing a stop string."""
        pending, self._pending = self._pending, ""
        return pending


class IncrementalDetokenizer:
    """Token ids in, text deltas out, with stop strings applied.

    `push` returns (text to send now, stopped). After `stopped` is True the caller must stop the
    generation; tokens after the one that completed the stop string are not counted.
    """

    __slots__ = ("_tokenizer", "_stream", "_matcher", "stopped", "token_count")

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = (), prompt_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True, include_stop_str: bool = False):
        self._tokenizer = tokenizer
        context = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:]) if prompt_ids else None
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self._matcher = StopMatcher(stops, include_stop_str)
        self.stopped = False
        self.token_count = 0  # output tokens accepted (up to and including a stop string's last)

    def push(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        if self.stopped or not token_ids:
            return "", self.stopped
        if not self._matcher.stops:
            # No stop strings: decode the whole frame in one call.
            self.token_count += len(token_ids)
            return self._stream.step(self._tokenizer, list(token_ids)) or "", False
        # With stop strings, go token by token so the count stops at the token that completed one.
        out: list[str] = []
        for token_id in token_ids:
            self.token_count += 1
            piece = self._stream.step(self._tokenizer, token_id)
            if not piece:
                continue
            text, stopped = self._matcher.feed(piece)
            if text:
                out.append(text)
            if stopped:
                self.stopped = True
                break
        return "".join(out), self.stopped

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the output, if one did."""
        return self._matcher.matched

    def flush(self) -> str:
        """Text held back for a possible stop string, released when the stream ends."""
        return "" if self.stopped else self._matcher.flush()
