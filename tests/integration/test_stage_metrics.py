"""Per-stage timing (frontend/stages.py): a request through an in-memory stack (frontend app, MemoryDiscovery,
a loopback worker shell around the mocker) records every stage in the metrics and, when asked, in a header."""

from __future__ import annotations

import json

import pytest

from dynamo_lite.frontend.stages import STAGE_HEADER, STAGES
from dynamo_lite.mocker.config import MockerConfig
from dynamo_lite.mocker.engine import MockerEngine
from tests.integration.test_frontend_app import MODEL, TOKENIZER, running_stack, tokenizer_files

PROMPT = "tell me a story " * 40  # ~640 byte tokens: a prefill the mocker times


@pytest.fixture
def mocker_model_dir(tmp_path):
    for name, data in tokenizer_files().items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": TOKENIZER.get_vocab_size(),
                                                      "max_position_embeddings": 4096}))
    return tmp_path


def stage_counts(metrics_text: str) -> dict[str, float]:
    counts = {}
    for line in metrics_text.splitlines():
        if line.startswith("dynamo_lite_frontend_stage_seconds_count{"):
            labels, value = line.split("} ")
            stage = labels.split('stage="')[1].split('"')[0]
            assert f'model="{MODEL}"' in labels
            counts[stage] = float(value)
    return counts


def parse_header(value: str) -> dict[str, float]:
    return {k: float(v) for k, v in (item.split("=") for item in value.split(";"))}


async def test_a_request_records_every_stage_and_the_header_attributes_its_first_token(mocker_model_dir):
    config = MockerConfig(model_path=str(mocker_model_dir), served_model_name=MODEL, speedup_ratio=20.0)
    async with running_stack() as stack:
        await stack.add_worker(MockerEngine(config))
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "ignore_eos": True, "stream": True}
        async with stack.http.stream("POST", "/v1/completions", json=body,
                                     headers={STAGE_HEADER: "1"}) as response:
            assert response.status_code == 200
            stages = parse_header(response.headers[STAGE_HEADER])
            await response.aread()
        # Everything up to the first answer delta is in the header; stream comes only at the end.
        assert set(stages) == set(STAGES) - {"stream"}
        assert all(seconds >= 0 for seconds in stages.values())
        # The worker's split: the mocker's prefill of ~640 tokens at speedup 20 is a few ms, and the worker's
        # queue and prefill fit inside the frontend's wait for the first token.
        assert stages["prefill"] > 0.002
        assert stages["worker_queue"] + stages["prefill"] <= stages["first_token"] + 1e-3

        plain = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "ignore_eos": True}
        response = await stack.http.post("/v1/completions", json=plain)  # no header asked: none given
        assert response.status_code == 200 and STAGE_HEADER not in response.headers

        counts = stage_counts((await stack.http.get("/metrics")).text)
        assert counts == {stage: 2.0 for stage in STAGES}
