"""/v1/embeddings over real loopback workers: request validation, OpenAI's answer shape, base64, and the
400s between embedding and generating models. The engine is a deterministic fake pooling engine."""

from __future__ import annotations

import base64
import struct

import pytest

from dynamo_lite.engine.base import EngineInfo
from dynamo_lite.protocol.messages import EmbedReply, EmbedRequest
from tests.integration.test_frontend_app import (CONTEXT, MODEL, TOKENIZER, ScriptedEngine, chat_body,
                                                 model_dir, running_stack)

__all__ = ["model_dir"]  # the fixture, imported for pytest


def fake_vector(token_ids: list[int], dimensions: int | None) -> list[float]:
    values = [float(len(token_ids)), float(sum(token_ids)), float(token_ids[0]), 0.5]
    return values[:dimensions] if dimensions else values


class FakePoolingEngine(ScriptedEngine):
    def __init__(self, model_path):
        super().__init__(model_path)
        self.embeds: list[EmbedRequest] = []

    async def start(self) -> EngineInfo:
        return EngineInfo(model_name=MODEL, model_path=self.model_path, context_length=CONTEXT,
                          kv_block_size=16, total_kv_blocks=1000, runner="pooling")

    async def embed(self, request: EmbedRequest) -> EmbedReply:
        self.embeds.append(request)
        return EmbedReply(embeddings=[fake_vector(p, request.dimensions) for p in request.prompts],
                          prompt_tokens=sum(map(len, request.prompts)))


def ids(text: str) -> list[int]:
    return TOKENIZER.encode(text).ids


async def test_embeddings_shapes_for_every_input_form(model_dir):
    async with running_stack() as stack:
        engine = FakePoolingEngine(model_dir)
        await stack.add_worker(engine)
        cases = [("hello", [ids("hello")]), (["hi", "there you"], [ids("hi"), ids("there you")]),
                 ([5, 6, 7], [[5, 6, 7]]), ([[1, 2], [3]], [[1, 2], [3]])]
        for value, prompts in cases:
            response = await stack.http.post("/v1/embeddings", json={"model": MODEL, "input": value})
            assert response.status_code == 200, response.text
            total = sum(map(len, prompts))
            assert response.json() == {
                "object": "list", "model": MODEL, "usage": {"prompt_tokens": total, "total_tokens": total},
                "data": [{"object": "embedding", "index": i, "embedding": fake_vector(p, None)}
                         for i, p in enumerate(prompts)]}
            assert engine.embeds[-1].prompts == prompts


async def test_embeddings_base64_and_dimensions(model_dir):
    async with running_stack() as stack:
        engine = FakePoolingEngine(model_dir)
        await stack.add_worker(engine)
        response = await stack.http.post("/v1/embeddings", json={
            "model": MODEL, "input": ["ab", "c"], "encoding_format": "base64", "dimensions": 3, "user": "u"})
        assert response.status_code == 200, response.text
        for item, prompt in zip(response.json()["data"], [ids("ab"), ids("c")], strict=True):
            raw = base64.b64decode(item["embedding"])
            assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == fake_vector(prompt, 3)
        assert engine.embeds[-1].dimensions == 3


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "unknown_field": 1}, "unknown_field"),
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [10 ** 6]}, "input"),
    ({"input": "x", "dimensions": 0}, "dimensions"),
])
async def test_embeddings_refuses_bad_bodies(model_dir, body, param):
    async with running_stack() as stack:
        engine = FakePoolingEngine(model_dir)
        await stack.add_worker(engine)
        response = await stack.http.post("/v1/embeddings", json={"model": MODEL, **body})
        assert response.status_code == 400, response.text
        assert param in response.text
        assert engine.embeds == []


async def test_generate_on_embedding_model_and_embeddings_on_generating_model_are_400(model_dir):
    async with running_stack() as stack:
        await stack.add_worker(FakePoolingEngine(model_dir))
        response = await stack.http.post("/v1/chat/completions", json=chat_body())
        assert response.status_code == 400 and "embedding model" in response.text
        response = await stack.http.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert response.status_code == 400 and "embedding model" in response.text
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        response = await stack.http.post("/v1/embeddings", json={"model": MODEL, "input": "hi"})
        assert response.status_code == 400 and "--runner pooling" in response.text


async def test_engine_without_embed_answers_400_through_the_worker(model_dir):
    """A generating engine asked directly (no frontend check) refuses with a 400 ErrorFrame."""
    from dynamo_lite.protocol.messages import ErrorFrame

    async with running_stack() as stack:
        shell = await stack.add_worker(ScriptedEngine(model_dir))
        replies = [r async for r in stack.client_pool.stream(shell.address,
                                                             EmbedRequest(request_id="e", prompts=[[1]]))]
        assert len(replies) == 1 and isinstance(replies[0], ErrorFrame) and replies[0].status == 400
        assert "does not serve embeddings" in replies[0].message


async def test_embeddings_requests_are_in_the_request_metrics(model_dir):
    async with running_stack() as stack:
        await stack.add_worker(FakePoolingEngine(model_dir))
        for body in ({"model": MODEL, "input": ["hi", "there"]}, {"model": MODEL, "input": "hello"},
                     {"model": MODEL, "input": []}, {"model": MODEL, "input": "x", "nope": 1}):
            await stack.http.post("/v1/embeddings", json=body)
        text = (await stack.http.get("/metrics")).text
        prompt_tokens = float(len(ids("hi")) + len(ids("there")) + len(ids("hello")))
        for line in [
            f'dynamo_lite_frontend_requests_total{{endpoint="embeddings",model="{MODEL}",status="200"}} 2.0',
            f'dynamo_lite_frontend_requests_total{{endpoint="embeddings",model="{MODEL}",status="400"}} 1.0',
            'dynamo_lite_frontend_requests_total{endpoint="embeddings",model="unknown",status="400"} 1.0',
            f'dynamo_lite_frontend_request_duration_seconds_count{{endpoint="embeddings",model="{MODEL}"}} 3.0',
            f'dynamo_lite_frontend_input_tokens_total{{model="{MODEL}"}} {prompt_tokens}',
            f'dynamo_lite_frontend_inflight_requests{{model="{MODEL}"}} 0.0',
        ]:
            assert line in text, line
