"""OpenAI response bodies and SSE chunks, encoded with msgspec (no pydantic on the way out).

A streamed chunk differs from the previous one only in its text, so each stream pre-encodes the
bytes around the text once and splices the JSON-encoded text in per chunk.
"""

from __future__ import annotations

import time

from dynamo_lite.frontend.tool_calls import OutputDelta, ParsedMessage
from dynamo_lite.protocol.messages import json_encoder

DONE = b"data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chat_completion(request_id: str, model: str, choices: list[dict], usage_: dict,
                    prompt_logprobs: list | None = None) -> bytes:
    """choices: chat_choice() of each choice, by index."""
    body = {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_}
    if prompt_logprobs is not None:
        body["prompt_logprobs"] = prompt_logprobs  # vLLM's extra field
    return json_encoder.encode(body)


def chat_choice(index: int, message: str | ParsedMessage, finish_reason: str | None,
                logprobs: dict | None = None, stop_reason: str | int | None = None) -> dict:
    """message: the answer's text, or its parts when it may hold tool calls or reasoning. stop_reason is
    vLLM's extra field: the stop string or stop token id that ended the choice (null for EOS, length)."""
    return {"index": index, "message": chat_message(message), "logprobs": logprobs,
            "finish_reason": finish_reason, "stop_reason": stop_reason}


def chat_message(message: str | ParsedMessage) -> dict:
    if isinstance(message, str):
        return {"role": "assistant", "content": message}
    body = {"role": "assistant", "content": message.content,
            "tool_calls": [call.to_openai() for call in message.tool_calls]}
    if message.reasoning is not None:
        body["reasoning"] = message.reasoning
    return body


def text_completion(request_id: str, model: str, choices: list[dict], usage_: dict) -> bytes:
    """choices: text_choice() of each choice, by index."""
    return json_encoder.encode({
        "id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": choices, "usage": usage_,
    })


def text_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None,
                prompt_logprobs: list | None = None, stop_reason: str | int | None = None) -> dict:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
              "stop_reason": stop_reason}
    if prompt_logprobs is not None:
        choice["prompt_logprobs"] = prompt_logprobs  # vLLM's extra field
    return choice


class ChunkEncoder:
    """SSE chunks of one stream: `data: {json}\\n\\n` for chat (`chat.completion.chunk`) or
    completions (`text_completion`)."""

    def __init__(self, request_id: str, model: str, chat: bool, include_usage: bool):
        self.chat = chat
        self.include_usage = include_usage
        self._head = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                      "created": int(time.time()), "model": model}
        # Everything before and after the text, for the common chunk (text, no finish reason).
        marker = "\x00TEXT\x00"
        encoded = self._encode(self._choice({"content": marker} if chat else marker, None))
        self._text_prefix, self._text_suffix = encoded.split(json_encoder.encode(marker))

    def _choice(self, delta_or_text, finish_reason: str | None, index: int = 0,
                logprobs: dict | None = None, stop_reason: str | int | None = None) -> dict:
        choice = {"index": index, "delta" if self.chat else "text": delta_or_text, "logprobs": logprobs,
                  "finish_reason": finish_reason}
        if finish_reason is not None or not self.chat:
            # vLLM's chat chunks carry stop_reason on the finish chunk only, its completions chunks on each.
            choice["stop_reason"] = stop_reason
        body = dict(self._head, choices=[choice])
        if self.include_usage:
            body["usage"] = None
        return body

    @staticmethod
    def _encode(body: dict) -> bytes:
        return b"data: " + json_encoder.encode(body) + b"\n\n"

    def role(self, index: int = 0, usage_: dict | None = None) -> bytes:
        """The first chat chunk of a choice: the assistant role with empty content (and, when given, a
        usage: the internal callers' stand-in for vLLM's continuous usage stats)."""
        body = self._choice({"role": "assistant", "content": ""}, None, index)
        if usage_ is not None:
            body["usage"] = usage_
        return self._encode(body)

    def text(self, text: str) -> bytes:
        """The common chunk: text of choice 0, no logprobs (pre-encoded around the text)."""
        return self._text_prefix + json_encoder.encode(text) + self._text_suffix

    def choice_text(self, index: int, text: str, logprobs: dict | None) -> bytes:
        """Text (maybe "") of any choice, with the logprobs of the tokens it covers."""
        return self._encode(self._choice({"content": text} if self.chat else text, None, index, logprobs))

    def delta(self, delta: OutputDelta, index: int = 0, logprobs: dict | None = None) -> bytes:
        """A chat chunk with reasoning and tool-call pieces besides (or instead of) content."""
        body: dict = {}
        if delta.reasoning:
            body["reasoning"] = delta.reasoning
        if delta.content:
            body["content"] = delta.content
        if delta.tool_calls:
            body["tool_calls"] = [piece.to_openai() for piece in delta.tool_calls]
        return self._encode(self._choice(body, None, index, logprobs))

    def finish(self, finish_reason: str | None, index: int = 0,
               stop_reason: str | int | None = None) -> bytes:
        return self._encode(self._choice({} if self.chat else "", finish_reason, index, None, stop_reason))

    def usage(self, usage_: dict) -> bytes:
        """The include_usage chunk: empty choices, the request's usage."""
        return self._encode(dict(self._head, choices=[], usage=usage_))

    @staticmethod
    def error(status: int, message: str, error_type: str) -> bytes:
        """An error after the stream started (the status line is already sent)."""
        body = {"error": {"message": message, "type": error_type, "param": None, "code": status}}
        return b"data: " + json_encoder.encode(body) + b"\n\n"
