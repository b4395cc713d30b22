"""OpenAI request -> GenerationPlan: chat template, tokenization, length checks, sampling options."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from dynamo_lite.frontend.chat_output import ChatOutput, prompt_ends_reasoning
from dynamo_lite.frontend.middleware import RequestId
from dynamo_lite.frontend.models import ServedModel
from dynamo_lite.frontend.schemas import (ChatCompletionRequest, CompletionRequest, NamedToolChoice, SamplingFields,
                                          check_supported)
from dynamo_lite.frontend.structured import structured_output_of
from dynamo_lite.frontend.tool_calls import AnswerShaper, ForcedToolCalls
from dynamo_lite.protocol.errors import InvalidRequestError
from dynamo_lite.protocol.messages import SamplingOptions

# Prompts longer than this (characters) are tokenized in a thread with the GIL released, so a burst of
# long prompts is tokenized beside the event loop instead of in it, one after another. Below it the
# hop costs the loop more than it saves: ~40 µs of loop time, where 4k characters of English take
# ~0.2 ms inline.
THREAD_TOKENIZE_CHARS = 4096


@dataclass
class GenerationPlan:
    """Everything the pipeline needs for one request."""

    request_id: str
    model: ServedModel
    prompt_ids: list[int]
    sampling: SamplingOptions
    stop: list[str]
    prompt_param: str  # the field to blame in errors about the prompt ("messages" or "prompt")
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Chat answers that are more than text (tool calls, reasoning): a new shaper per choice, None for
    # plain text (the fast path). It splits the choice's text into content, reasoning and tool calls.
    answer_shaper: Callable[[], AnswerShaper] | None = None
    tool_choice: str = "none"  # "none" | "auto" | "required" | "named", for the finish reason
    # Logprobs the answer reports per token (None: not asked for): chat's top_logprobs alternatives, or
    # completions' logprobs (reported as that many + 1 entries, the chosen token's among them).
    logprobs: int | None = None
    echo_text: str | None = None  # completions' echo: the prompt text put before each choice's text
    # The stop tokens a choice's stop_reason names (vLLM's rule): the request's stop_token_ids and the
    # generation config's extra EOS ids; not the tokenizer's EOS (stop_reason null) unless ignore_eos.
    stop_reason_ids: frozenset[int] = frozenset()


async def _encode(model: ServedModel, text: str, add_special_tokens: bool) -> list[int]:
    if len(text) > THREAD_TOKENIZE_CHARS:
        return await asyncio.to_thread(model.tokenizer.encode_without_gil, text, add_special_tokens)
    return model.tokenizer.encode(text, add_special_tokens)


HARMONY_PARSERS = ("openai", "openai_gptoss")  # gpt-oss: reasoning and calls in special-token channels


@dataclass(frozen=True)
class ChatParsers:
    """The frontend's --tool-call-parser and --reasoning-parser ("" = none)."""

    tool_call: str = ""
    reasoning: str = ""


async def plan_chat(model: ServedModel, request: ChatCompletionRequest, request_id: RequestId | None = None,
                    parsers: ChatParsers = ChatParsers()) -> GenerationPlan:
    check_supported(request)
    text = model.tokenizer.render_chat(request.template_messages(), request.add_generation_prompt,
                                       request.template_tools(), request.chat_template_kwargs)
    prompt_ids = await _encode(model, text, add_special_tokens=False)
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    plan = _plan(model, request, prompt_ids, _request_id("chatcmpl-", request_id), "messages", logprobs)
    choice = request.effective_tool_choice()
    reasoning = parsers.reasoning or None
    if reasoning not in (None, *HARMONY_PARSERS) and prompt_ends_reasoning(text):
        reasoning = None  # no thinking to split off (e.g. Qwen3 with enable_thinking false)
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        plan.answer_shaper, plan.tool_choice = (lambda: ForcedToolCalls(name)), "named"
    elif choice == "required":
        plan.answer_shaper, plan.tool_choice = (lambda: ForcedToolCalls(None)), "required"
    elif choice == "auto":
        if not parsers.tool_call:
            # vLLM's server answers the same without a parser: the calls would come back as prose.
            raise InvalidRequestError('"auto" tool choice needs a tool-call parser on this frontend '
                                      '(--tool-call-parser); "required", a named function and "none" work '
                                      "without", param="tool_choice")
        plan.answer_shaper = functools.partial(ChatOutput, parsers.tool_call, reasoning, True)
        plan.tool_choice = "auto"
        # Tool-call markers are special tokens in some models' vocabularies (vLLM's hermes parser does the same).
        plan.skip_special_tokens = False
    elif reasoning:
        plan.answer_shaper = functools.partial(ChatOutput, None, reasoning, False)
        if reasoning in HARMONY_PARSERS:
            plan.skip_special_tokens = False  # harmony's channels are marked by special tokens
    return plan


async def plan_completion(model: ServedModel, request: CompletionRequest,
                          request_id: RequestId | None = None) -> GenerationPlan:
    check_supported(request)
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise InvalidRequestError("a list of several prompts is not supported: send one prompt per request",
                                      param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        prompt_ids = await _encode(model, prompt, add_special_tokens=True)
    else:
        prompt_ids = list(prompt)
        vocab_size = model.tokenizer.vocab_size
        for token_id in prompt_ids:
            if token_id >= vocab_size:
                raise InvalidRequestError(f"token id {token_id} is outside the vocabulary (size {vocab_size})",
                                          param="prompt")
    plan = _plan(model, request, prompt_ids, _request_id("cmpl-", request_id), "prompt", request.logprobs,
                 echo=request.echo)
    if request.echo:
        plan.echo_text = prompt if isinstance(prompt, str) else model.tokenizer.tokenizer.decode(
            prompt_ids, skip_special_tokens=False)
    return plan


def _request_id(prefix: str, request_id: RequestId | None) -> str:
    """The id of a request on the wire, in logs and in the answer. A client's X-Request-Id is kept in
    it (grep finds it everywhere) with a random suffix: two requests a client sent under one id must
    still be told apart by the router and the workers."""
    if request_id is None:
        return prefix + uuid.uuid4().hex
    if request_id.from_client:
        return f"{prefix}{request_id.value}-{uuid.uuid4().hex[:8]}"
    return prefix + request_id.value


def _plan(model: ServedModel, request: SamplingFields, prompt_ids: list[int], request_id: str,
          prompt_param: str, logprobs: int | None = None, echo: bool = False) -> GenerationPlan:
    if model.card.runner != "generate":  # a pooling worker has no sampler: vLLM's server answers 400 too
        raise InvalidRequestError(f"the model {model.requested_name} is an embedding model (runner "
                                  f"{model.card.runner}): it serves /v1/embeddings only", param="model")
    context_length = model.card.context_length
    prompt_tokens = len(prompt_ids)
    if prompt_tokens == 0:
        raise InvalidRequestError("the prompt is empty", param=prompt_param)
    if prompt_tokens >= context_length:
        raise InvalidRequestError(
            f"This model's maximum context length is {context_length} tokens, but the prompt has "
            f"{prompt_tokens} tokens, leaving no room for output.", param=prompt_param,
            code="context_length_exceeded")
    requested = request.requested_max_tokens()
    room = context_length - prompt_tokens
    max_param = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) else "max_tokens"
    if requested is not None and requested > room:
        raise InvalidRequestError(
            f"{max_param}={requested} is too large: the prompt has {prompt_tokens} tokens and this model's "
            f"maximum context length is {context_length} tokens, so at most {room} can be generated.",
            param=max_param, code="context_length_exceeded")
    max_tokens = requested if requested is not None else room
    if request.min_tokens > max_tokens:
        raise InvalidRequestError(f"min_tokens={request.min_tokens} is larger than {max_param}={max_tokens}",
                                  param="min_tokens")
    stop_token_ids = list(request.stop_token_ids or ())
    if not request.ignore_eos:
        stop_token_ids.extend(i for i in model.tokenizer.eos_token_ids if i not in stop_token_ids)
    stop_reason_ids = frozenset(stop_token_ids)
    if not request.ignore_eos:
        stop_reason_ids -= {model.tokenizer.eos_token_id}
    top_k = request.top_k if request.top_k is not None and request.top_k > 0 else 0
    vocab_size = model.tokenizer.vocab_size
    logit_bias = _logit_bias(request.logit_bias, vocab_size)
    for token_id in request.allowed_token_ids or ():
        if token_id >= vocab_size:
            raise InvalidRequestError(f"token id {token_id} is outside the vocabulary (size {vocab_size})",
                                      param="allowed_token_ids")
    prompt_logprobs = request.prompt_logprobs
    if prompt_logprobs is None and echo and logprobs is not None:
        prompt_logprobs = logprobs  # echo shows the prompt's tokens with their logprobs (as vLLM does)
    sampling = SamplingOptions(
        max_tokens=max_tokens,
        n=request.n,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=top_k,
        seed=request.seed,
        min_tokens=request.min_tokens,
        ignore_eos=request.ignore_eos,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        stop_token_ids=stop_token_ids,
        min_p=request.min_p,
        repetition_penalty=request.repetition_penalty,
        logit_bias=logit_bias,
        allowed_token_ids=request.allowed_token_ids,
        bad_words=request.bad_words or None,
        structured_output=structured_output_of(request),
    )
    return GenerationPlan(request_id=request_id, model=model, prompt_ids=prompt_ids,
                          sampling=sampling, stop=request.stop_strings(), prompt_param=prompt_param,
                          skip_special_tokens=request.skip_special_tokens,
                          include_stop_str_in_output=request.include_stop_str_in_output, logprobs=logprobs,
                          stop_reason_ids=stop_reason_ids)


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias has token ids as JSON object keys (strings)."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise InvalidRequestError(f"logit_bias key {key!r} is not a token id", param="logit_bias") from None
        if not 0 <= token_id < vocab_size:
            raise InvalidRequestError(f"logit_bias token id {token_id} is outside the vocabulary "
                                      f"(size {vocab_size})", param="logit_bias")
        out[token_id] = value
    return out
