"""The mocker's two step-time models (--timing native | dynamo) on scheduler steps."""

from __future__ import annotations

import pytest

from dynamo_lite.mocker.__main__ import parse_config
from dynamo_lite.mocker.block_pool import BlockPool
from dynamo_lite.mocker.engine import MockerEngine
from dynamo_lite.mocker.scheduler import Scheduler, SchedRequest, StepOutput
from dynamo_lite.mocker.timing import DynamoStepTimeModel, StepTimeModel

BS = 4


def scheduler(budget: int = 64) -> Scheduler:
    return Scheduler(BlockPool(64, BS, True), max_num_seqs=8, max_num_batched_tokens=budget,
                     token_range=(1000, 2000), max_model_len=1024)


def dynamo_prefill_ms(tokens: int) -> float:
    return 4.209989e-07 * tokens ** 2 + 1.518344e-02 * tokens + 1.650142e+01


def test_steps_count_the_requests_that_sample_and_their_context():
    s = scheduler(budget=20)
    s.add_request(SchedRequest("a", list(range(30)), 3, seed=0))
    first = s.step()  # a 20-token chunk: nothing sampled
    assert (first.prefill_tokens, first.sampled_requests, first.sampled_context_tokens) == (20, 0, 0)
    s.add_request(SchedRequest("b", list(range(100, 108)), 3, seed=0))
    second = s.step()  # a's last 10 prompt tokens and b's 8: both complete their prompt and sample
    assert (second.prefill_tokens, second.sampled_requests, second.sampled_context_tokens) == (18, 2, 38)
    third = s.step()  # two decodes, contexts 31 and 9
    assert (third.decode_requests, third.sampled_requests, third.sampled_context_tokens) == (2, 2, 40)


def test_dynamo_timing_prices_prefill_by_new_tokens_and_decode_by_kv_usage():
    model = DynamoStepTimeModel(capacity_tokens=1000)
    # A chunk of 512 new tokens costs the same whatever context it attends to (cached or earlier chunks).
    alone = StepOutput(prefill_tokens=512, prefill_attention=512 * 512)
    behind_context = StepOutput(prefill_tokens=512, prefill_attention=512 * 4096)
    assert model.step_seconds(alone) == model.step_seconds(behind_context) == pytest.approx(
        dynamo_prefill_ms(512) * 1e-3)
    # Decode: -25.74 u^2 + 54.01 u + 5.74 ms at usage u = 250 / 1000.
    decode = StepOutput(decode_requests=2, sampled_requests=2, sampled_context_tokens=250)
    assert model.step_seconds(decode) == pytest.approx((-25.74 / 16 + 54.01 / 4 + 5.74) * 1e-3)
    full = StepOutput(decode_requests=2, sampled_requests=2, sampled_context_tokens=5000)  # usage capped at 1
    assert model.step_seconds(full) == pytest.approx((-25.74 + 54.01 + 5.74) * 1e-3)
    # Both parts in one step, then the speedup divides the sum.
    mixed = StepOutput(prefill_tokens=100, sampled_requests=1, sampled_context_tokens=0)
    expected = (dynamo_prefill_ms(100) + 5.74) * 1e-3
    assert model.step_seconds(mixed) == pytest.approx(expected)
    assert DynamoStepTimeModel(capacity_tokens=1000, speedup_ratio=4).step_seconds(mixed) == pytest.approx(
        expected / 4)
    assert model.step_seconds(StepOutput()) == 0.0


def test_native_timing_charges_attention_over_context_where_dynamo_does_not():
    native = StepTimeModel()
    alone = StepOutput(prefill_tokens=512, prefill_attention=512 * 512)
    behind_context = StepOutput(prefill_tokens=512, prefill_attention=512 * 4096)
    assert native.step_seconds(behind_context) > native.step_seconds(alone)


def test_the_timing_flag_picks_the_engine_model(tmp_path):
    (tmp_path / "config.json").write_text('{"vocab_size": 1000, "max_position_embeddings": 256}')
    base = ["--model-path", str(tmp_path), "--num-gpu-blocks-override", "100", "--block-size", "16"]
    assert parse_config(base).timing == "native"
    assert isinstance(MockerEngine(parse_config(base))._timing, StepTimeModel)
    engine = MockerEngine(parse_config([*base, "--timing", "dynamo", "--speedup-ratio", "2"]))
    assert engine._timing == DynamoStepTimeModel(capacity_tokens=1600, speedup_ratio=2.0)
    with pytest.raises(SystemExit):
        parse_config([*base, "--timing", "gpu"])
