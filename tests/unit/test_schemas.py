"""Request validation at the HTTP edge: pydantic schemas, unsupported options, length checks.

Every bad input must become a 400 whose body names the offending field.
"""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from dynamo_lite.frontend.errors import pydantic_error_response
from dynamo_lite.frontend.models import ServedModel
from dynamo_lite.frontend.preprocess import plan_chat, plan_completion
from dynamo_lite.frontend.schemas import ChatCompletionRequest, CompletionRequest, check_supported
from dynamo_lite.frontend.tokenizer import ModelTokenizer
from dynamo_lite.protocol.errors import InvalidRequestError
from dynamo_lite.protocol.messages import ModelCard

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONTEXT = 64


def served_model() -> ServedModel:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    config = {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}
    tokenizer = ModelTokenizer(tok, config, TEMPLATE, {"eos_token_id": [257]})
    card = ModelCard(name="tiny", path="/nonexistent", context_length=CONTEXT, kv_block_size=16)
    return ServedModel(name="tiny", card=card, tokenizer=tokenizer)


def error_of(schema, body: dict | str) -> tuple[int, dict]:
    raw = body if isinstance(body, str) else json.dumps(body)
    with pytest.raises(ValidationError) as info:
        schema.model_validate_json(raw)
    response = pydantic_error_response(info.value)
    return response.status_code, json.loads(response.body)["error"]


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


def test_valid_chat_request_parses_with_defaults():
    request = ChatCompletionRequest.model_validate_json(json.dumps(CHAT))
    assert request.stream is False and request.n == 1 and request.stop_strings() == []
    assert request.requested_max_tokens() is None


@pytest.mark.parametrize("body, field", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "tiny"}, "messages"),
    ({"model": "tiny", "messages": []}, "messages"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"),
    ({**CHAT, "max_tokens": -5}, "max_tokens"),
    ({**CHAT, "max_tokens": "many"}, "max_tokens"),
    ({**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({**CHAT, "temperature": -0.1}, "temperature"),
    ({**CHAT, "top_p": 0}, "top_p"),
    ({**CHAT, "top_p": 1.5}, "top_p"),
    ({**CHAT, "presence_penalty": 3}, "presence_penalty"),
    ({**CHAT, "stop": 5}, "stop"),
    ({**CHAT, "stop": [""]}, "stop"),
    ({**CHAT, "stop": ["s"] * 17}, "stop"),
    ({**CHAT, "model": 7}, "model"),
    ({"model": "tiny", "messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({**CHAT, "stream": "yes please"}, "stream"),
])
def test_bad_chat_fields_are_400_naming_the_field(body, field):
    status, error = error_of(ChatCompletionRequest, body)
    assert status == 400
    assert error["type"] == "invalid_request_error"
    assert error["param"].startswith(field), error  # e.g. "stop[0]" for an empty stop string
    assert field in error["message"]


def test_malformed_json_is_400():
    status, error = error_of(ChatCompletionRequest, '{"model": "tiny", "messages": [')
    assert status == 400
    assert "malformed JSON" in error["message"]


def test_non_object_body_is_400():
    status, error = error_of(ChatCompletionRequest, "[1, 2]")
    assert status == 400 and "invalid request body" in error["message"]


@pytest.mark.parametrize("body, field", [
    ({"model": "tiny"}, "prompt"),
    ({"model": "tiny", "prompt": [1, -2]}, "prompt"),
    ({"model": "tiny", "prompt": {"text": "x"}}, "prompt"),
])
def test_bad_completion_prompt_is_400(body, field):
    status, error = error_of(CompletionRequest, body)
    assert status == 400 and error["param"].startswith(field) and field in error["message"]


@pytest.mark.parametrize("extra, param, words", [
    ({"top_logprobs": 3}, "top_logprobs", "`logprobs` must be set to true"),
    ({"best_of": 3}, "best_of", "best_of"),
    ({"truncate_prompt_tokens": 10}, "truncate_prompt_tokens", "it would be ignored"),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "not available when `stream=True`"),
    ({"skip_special_tokens": False, "spaces_between_special_tokens": False}, "spaces_between_special_tokens",
     "not supported"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs",
     "not both"),
    ({"tool_choice": "required"}, "tool_choice", "tool_choice needs 'tools'"),
])
def test_unsupported_options_are_rejected_clearly(extra, param, words):
    # Each of these, accepted and dropped, would change the answer without the client knowing.
    request = ChatCompletionRequest.model_validate({**CHAT, **extra})
    with pytest.raises(InvalidRequestError) as info:
        check_supported(request)
    assert info.value.status == 400 and info.value.param == param and words in info.value.message


def test_text_parts_are_joined_and_images_rejected():
    request = ChatCompletionRequest.model_validate({"model": "tiny", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert request.template_messages() == [{"role": "user", "content": "a\nb"}]
    request = ChatCompletionRequest.model_validate({"model": "tiny", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    with pytest.raises(InvalidRequestError) as info:
        request.template_messages()
    assert info.value.param == "messages[0].content[0].type"


# ---------------------------------------------------------------- plans (model-dependent checks)


async def test_default_max_tokens_fills_the_context():
    model = served_model()
    plan = await plan_completion(model, CompletionRequest(model="tiny", prompt="hello"))
    assert plan.prompt_ids == model.tokenizer.encode("hello")
    assert plan.sampling.max_tokens == CONTEXT - len(plan.prompt_ids)
    assert plan.sampling.stop_token_ids == [257]  # the model's EOS ids go to the engine
    assert plan.request_id.startswith("cmpl-")


async def test_chat_plan_renders_template_and_maps_sampling():
    model = served_model()
    request = ChatCompletionRequest.model_validate({
        **CHAT, "max_completion_tokens": 5, "temperature": 0, "top_k": -1, "seed": 3, "stop": "x",
        "ignore_eos": True, "stop_token_ids": [7]})
    plan = await plan_chat(model, request)
    expected = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert plan.prompt_ids == model.tokenizer.encode(expected, add_special_tokens=False)
    s = plan.sampling
    assert (s.max_tokens, s.temperature, s.top_k, s.seed, s.ignore_eos) == (5, 0.0, 0, 3, True)
    assert s.stop_token_ids == [7]  # ignore_eos: EOS ids are not added
    assert plan.stop == ["x"]


async def test_max_tokens_past_context_names_max_tokens():
    model = served_model()
    with pytest.raises(InvalidRequestError) as info:
        await plan_completion(model, CompletionRequest(model="tiny", prompt="hello", max_tokens=CONTEXT))
    assert info.value.param == "max_tokens" and "max_tokens" in info.value.message


async def test_prompt_longer_than_context_is_rejected():
    model = served_model()
    with pytest.raises(InvalidRequestError) as info:
        await plan_completion(model, CompletionRequest(model="tiny", prompt="x" * (CONTEXT + 1)))
    assert info.value.param == "prompt" and "maximum context length" in info.value.message


async def test_token_prompt_outside_vocabulary_and_batches_are_rejected():
    model = served_model()
    with pytest.raises(InvalidRequestError) as info:
        await plan_completion(model, CompletionRequest(model="tiny", prompt=[1, 99999]))
    assert info.value.param == "prompt" and "99999" in info.value.message
    with pytest.raises(InvalidRequestError) as info:
        await plan_completion(model, CompletionRequest(model="tiny", prompt=["a", "b"]))
    assert "several prompts" in info.value.message
    plan = await plan_completion(model, CompletionRequest(model="tiny", prompt=[[5, 6]]))
    assert plan.prompt_ids == [5, 6]


async def test_empty_prompt_is_rejected():
    with pytest.raises(InvalidRequestError) as info:
        await plan_completion(served_model(), CompletionRequest(model="tiny", prompt=""))
    assert info.value.param == "prompt"
