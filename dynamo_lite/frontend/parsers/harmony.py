"""gpt-oss "harmony" output, read as text.

The output is a sequence of messages, e.g.
``<|channel|>analysis<|message|>…<|end|><|start|>assistant<|channel|>final<|message|>…<|return|>``;
a tool call is ``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{…}<|call|>``.
vLLM reads the same with the openai_harmony library over token ids (its HarmonyParser); this reads
the detokenized text (special tokens kept), so the frontend needs neither that library nor its
vocabulary.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

MESSAGE = "<|message|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>", "<|endoftext|>")
SPECIALS = ("<|start|>", "<|channel|>", "<|constrain|>", MESSAGE, *ENDS)
# Recipients that are built-in tools, not functions (vLLM's BUILTIN_TOOL_TO_MCP_SERVER_LABEL).
BUILTIN = ("browser", "python", "container", "code_interpreter", "web_search_preview")
_CHANNEL_RE = re.compile(r"<\|channel\|>\s*([^\s<]+)")
_RECIPIENT_RE = re.compile(r"\bto=([^\s<]+)")
_CONSTRAIN_RE = re.compile(r"(?:<\|constrain\|>|\s)\s*([A-Za-z/]*json[A-Za-z]*)\s*$")


def _partial_special(text: str) -> int:
    """Length of a suffix of ``text`` that may start a special token."""
    for k in range(min(len(text), max(map(len, SPECIALS)) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in SPECIALS):
            return k
    return 0


@dataclass
class Header:
    channel: str | None
    recipient: str | None
    content_type: str | None

    @classmethod
    def parse(cls, text: str) -> Header:
        channel = _CHANNEL_RE.search(text)
        recipient = _RECIPIENT_RE.search(text)
        ctype = _CONSTRAIN_RE.search(text)
        return cls(channel.group(1) if channel else None, recipient.group(1) if recipient else None,
                   ctype.group(1) if ctype else None)

    def kind(self) -> str:
        """"tool", "reasoning", "content" or "ignore", as vLLM's _SegmentType decides."""
        r = self.recipient
        if r and not r.startswith("<|") and r != "assistant" and r.split(".", 1)[0] not in BUILTIN:
            if not r.startswith("functions.") or len(r) > len("functions."):
                return "tool"
        if self.channel == "analysis":
            return "reasoning"
        if self.channel == "final" or (self.channel == "commentary" and r is None):
            return "content"
        return "ignore"

    def function(self) -> str:
        return (self.recipient or "").removeprefix("functions.")


Event = Callable[[Header, str, bool], None]  # (header, text delta, message ended)


class HarmonyReader:
    """Cuts harmony text into message headers and body deltas; holds back partial special tokens."""

    def __init__(self, on_event: Event):
        self._emit = on_event
        self._buf = ""
        self._header: Header | None = None  # set while inside a message body

    def feed(self, text: str, final: bool = False) -> None:
        self._buf += text
        while True:
            if self._header is None:
                at = self._buf.find(MESSAGE)
                if at == -1:
                    break
                self._header = Header.parse(self._buf[:at])
                self._buf = self._buf[at + len(MESSAGE):]
                self._emit(self._header, "", False)
                continue
            hits = [(self._buf.find(e), e) for e in ENDS if e in self._buf]
            if hits:
                at, end = min(hits)
                self._emit(self._header, self._buf[:at], True)
                self._buf = self._buf[at + len(end):]
                self._header = None
                continue
            hold = 0 if final else _partial_special(self._buf)
            body, self._buf = self._buf[:len(self._buf) - hold], self._buf[len(self._buf) - hold:]
            if body:
                self._emit(self._header, body, False)
            break
        if final and self._header is not None:  # the stream stopped inside a message: it ends there
            self._emit(self._header, "", True)
            self._header = None


def tool_arguments(header: Header, text: str) -> str:
    """vLLM: JSON bodies are re-serialized (json.dumps defaults), other ones kept as written."""
    if header.content_type is not None and "json" not in header.content_type:
        return text
    try:
        return json.dumps(json.loads(text))
    except ValueError:
        return text
