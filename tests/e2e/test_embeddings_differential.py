"""/v1/embeddings differentially: this project's frontend + a pooling vLLM worker beside vLLM's own OpenAI
server started the same way (`--runner pooling --convert embed`) on the default model, each engine pinned
to its own core. The same request to both gives the same vectors."""

from __future__ import annotations

import base64
import math
import struct

import httpx
import pytest

from tests.e2e.api.conftest import start_pair
from tests.e2e.conftest import _new_group
from tests.e2e.harness import SERVED_MODEL_NAME

pytestmark = pytest.mark.vllm

# --enforce-eager: this project's worker's default on CPU (dynamo_lite/vllm/args.py), not vLLM's server's;
# given to both, the two engines run the same configuration, and vLLM's server skips its inductor compile
# (~45 s of this module's start on 2 cores).
POOLING_ARGS = ["--runner", "pooling", "--convert", "embed", "--max-model-len", "2048", "--max-num-seqs", "8",
                "--enforce-eager"]


@pytest.fixture(scope="module")
def urls(tmp_path_factory, etcd_endpoint, nats_url):
    group = _new_group(tmp_path_factory, etcd_endpoint, nats_url, "embed-pair")
    try:
        yield start_pair(group, "vllm-serve-embed", POOLING_ARGS).urls()
    finally:
        group.stop()


def _embed(url: str, **body) -> dict:
    response = httpx.post(f"{url}/v1/embeddings", json={"model": SERVED_MODEL_NAME, **body}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def _assert_close(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b)
    # The model runs in bf16: two engines on different cores differ in the last bf16 bits (first run:
    # max |a - b| 3.6e-4 on components ~0.04), so the element bound is 1e-3 and the cosine is the real test.
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-3
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    assert dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))) > 0.9999


@pytest.mark.parametrize("value", ["The capital of France is Paris.",
                                   ["one sentence", "and a second, longer sentence here"],
                                   [1, 504, 3458, 282, 4649], [[1, 504], [3458, 282, 4649]]])
def test_embeddings_equal_vllm(urls, value):
    ours, theirs = _embed(urls["ours"], input=value), _embed(urls["vllm"], input=value)
    assert [d["index"] for d in ours["data"]] == [d["index"] for d in theirs["data"]]
    for mine, ref in zip(ours["data"], theirs["data"], strict=True):
        assert mine["object"] == "embedding"
        _assert_close(mine["embedding"], ref["embedding"])
    # vLLM's usage also carries completion_tokens 0 and null details; OpenAI's has these two only.
    assert ours["usage"] == {k: theirs["usage"][k] for k in ("prompt_tokens", "total_tokens")}
    assert ours["object"] == "list" and ours["model"] == SERVED_MODEL_NAME


def test_base64_decodes_to_the_same_floats(urls):
    floats = _embed(urls["ours"], input="base64 please")["data"][0]["embedding"]
    raw = base64.b64decode(_embed(urls["ours"], input="base64 please", encoding_format="base64")
                           ["data"][0]["embedding"])
    _assert_close(list(struct.unpack(f"<{len(raw) // 4}f", raw)), floats)


def test_generate_on_the_embedding_model_is_400(urls):
    for url in (urls["ours"], urls["vllm"]):
        response = httpx.post(f"{url}/v1/completions", json={"model": SERVED_MODEL_NAME, "prompt": "hi",
                                                             "max_tokens": 4}, timeout=60)
        assert 400 <= response.status_code < 500, (url, response.text)
