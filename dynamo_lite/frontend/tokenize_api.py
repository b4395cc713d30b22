"""/tokenize, /detokenize and /version, in the request and response shapes of vLLM's server.

/tokenize takes a `prompt` (encoded as /v1/completions encodes it) or chat `messages` (rendered with the
model's chat template, as /v1/chat/completions renders them) and answers
{count, max_model_len, tokens, token_strs}; /detokenize turns {tokens} back into {prompt}. Both run on
the frontend's own copy of the model's tokenizer: no worker is involved. `model` may be left out while
the frontend serves a single model, as vLLM's server (which serves one) allows.
"""

from __future__ import annotations

from typing import Annotated, Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.requests import Request
from starlette.responses import Response

import dynamo_lite
from dynamo_lite.discovery.watcher import InstanceWatcher
from dynamo_lite.frontend import errors
from dynamo_lite.frontend.models import ModelRegistry, ServedModel
from dynamo_lite.frontend.schemas import INT64_MAX, ChatMessage, ChatCompletionRequest
from dynamo_lite.protocol.errors import DynamoLiteError, InvalidRequestError
from dynamo_lite.protocol.messages import json_encoder

# Template variables the request's own fields set: chat_template_kwargs may not override them (vLLM
# merges them the same way, the fields winning).
_TEMPLATE_FIELDS = ("add_generation_prompt", "continue_final_message")


class _TokenizeFields(BaseModel):
    # Unknown fields are a 400 naming them (vLLM's multimodal options, a request-supplied template...):
    # accepted and ignored, they would change the answer without a word.
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    return_token_strs: StrictBool | None = False


class TokenizeCompletionRequest(_TokenizeFields):
    prompt: StrictStr
    add_special_tokens: StrictBool = True


class TokenizeChatRequest(_TokenizeFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    # The chat template holds BOS and the like already: adding them again is opt-in, as in vLLM.
    add_special_tokens: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    tokens: list[Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]]


def _json(body: dict) -> Response:
    return Response(json_encoder.encode(body), media_type="application/json")


def render_chat_prompt(model: ServedModel, request: TokenizeChatRequest) -> str:
    """The chat prompt as the template renders it; with continue_final_message, cut right after the
    last message's text so the model continues it (transformers' apply_chat_template does the same)."""
    if request.continue_final_message and request.add_generation_prompt:
        raise InvalidRequestError("Cannot set both `continue_final_message` and `add_generation_prompt` to "
                                  "True.", param="continue_final_message")
    # The same message shaping as chat requests (text parts joined, content None as "").
    messages = ChatCompletionRequest.model_construct(messages=request.messages).template_messages()
    extra = {k: v for k, v in (request.chat_template_kwargs or {}).items() if k not in _TEMPLATE_FIELDS}
    extra["continue_final_message"] = request.continue_final_message
    text = model.tokenizer.render_chat(messages, request.add_generation_prompt, request.tools, extra)
    if not request.continue_final_message:
        return text
    final = messages[-1]["content"]
    for piece in (final, final.strip()):  # some templates strip the message before rendering it
        if piece and piece in text:
            return text[:text.rindex(piece) + len(piece)]
    raise InvalidRequestError("continue_final_message: the chat template does not render the final message's "
                              "text, so it cannot be continued", param="continue_final_message")


class TokenizeService:
    def __init__(self, watcher: InstanceWatcher, models: ModelRegistry):
        self._watcher = watcher
        self._models = models

    async def _model(self, name: str | None) -> ServedModel:
        if name is None:
            served = sorted({self._watcher.resolve(alias) for alias in self._watcher.models()} - {None})
            if len(served) != 1:
                serving = ", ".join(served) if served else "no model yet"
                raise InvalidRequestError(f"'model' is required: this server serves {serving}", param="model")
            name = served[0]
        return await self._models.get(name)

    async def tokenize(self, request: Request) -> Response:
        try:
            data = pydantic.TypeAdapter(dict[str, Any]).validate_json(await request.body())
            if "messages" in data:
                chat = TokenizeChatRequest.model_validate(data)
                model = await self._model(chat.model)
                ids = model.tokenizer.encode(render_chat_prompt(model, chat), chat.add_special_tokens)
                want_strs = chat.return_token_strs
            else:
                body = TokenizeCompletionRequest.model_validate(data)
                model = await self._model(body.model)
                ids = model.tokenizer.encode(body.prompt, body.add_special_tokens)
                want_strs = body.return_token_strs
        except pydantic.ValidationError as e:
            return errors.pydantic_error_response(e)
        except DynamoLiteError as e:
            return errors.dynamo_error_response(e)
        tokenizer = model.tokenizer.tokenizer
        token_strs = [tokenizer.id_to_token(i) for i in ids] if want_strs else None
        return _json({"count": len(ids), "max_model_len": model.card.context_length, "tokens": ids,
                      "token_strs": token_strs})

    async def detokenize(self, request: Request) -> Response:
        try:
            body = DetokenizeRequest.model_validate_json(await request.body())
            model = await self._model(body.model)
            vocab_size = model.tokenizer.vocab_size
            for index, token_id in enumerate(body.tokens):
                if token_id >= vocab_size:
                    raise InvalidRequestError(f"token id {token_id} is outside the vocabulary "
                                              f"(size {vocab_size})", param=f"tokens[{index}]")
        except pydantic.ValidationError as e:
            return errors.pydantic_error_response(e)
        except DynamoLiteError as e:
            return errors.dynamo_error_response(e)
        # Special tokens are kept, as vLLM's /detokenize keeps them.
        return _json({"prompt": model.tokenizer.tokenizer.decode(body.tokens, skip_special_tokens=False)})

    async def version(self, request: Request) -> Response:
        return _json({"version": dynamo_lite.__version__})
