"""MockerEngine through the Engine interface (no sockets), plus its config, CLI and timing model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import types

import pytest

from dynamo_lite.mocker.__main__ import parse_config
from dynamo_lite.mocker.config import MockerConfig, load_model_facts
from dynamo_lite.mocker import engine as engine_module
from dynamo_lite.mocker.engine import MockerEngine
from dynamo_lite.mocker.scheduler import StepOutput
from dynamo_lite.mocker.timing import DynamoStepTimeModel, StepTimeModel
from dynamo_lite.protocol.errors import ConfigError, EngineError, InvalidRequestError
from dynamo_lite.protocol.hashing import block_hashes
from dynamo_lite.protocol.messages import BlockStored, GenerateFrame, GenerateRequest, SamplingOptions, StructuredOutput

VOCAB = 1000
CONTEXT = 256
PROMPT = list(range(200, 240))  # 40 tokens: 2 full blocks of 16 and a partial one
TIMEOUT = 10.0


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "tiny-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"vocab_size": VOCAB, "max_position_embeddings": CONTEXT}))
    return folder


def make_config(model_dir, **overrides) -> MockerConfig:
    values = dict(model_path=str(model_dir), speedup_ratio=100000.0, num_gpu_blocks_override=64)
    values.update(overrides)
    return MockerConfig(**values)


@contextlib.asynccontextmanager
async def running_engine(config: MockerConfig):
    engine = MockerEngine(config)
    await asyncio.wait_for(engine.start(), TIMEOUT)
    try:
        yield engine
    finally:
        await asyncio.wait_for(engine.shutdown(), TIMEOUT)


def request(prompt=PROMPT, max_tokens=10, *, request_id="r1", seed=None, params=None) -> GenerateRequest:
    return GenerateRequest(request_id=request_id, token_ids=list(prompt), kv_transfer_params=params,
                           sampling=SamplingOptions(max_tokens=max_tokens, seed=seed))


async def collect(engine: MockerEngine, req: GenerateRequest) -> list[GenerateFrame]:
    async def run():
        return [frame async for frame in engine.generate(req)]
    return await asyncio.wait_for(run(), TIMEOUT)


def tokens_of(frames: list[GenerateFrame]) -> list[int]:
    return [t for frame in frames for t in frame.token_ids]


async def test_stream_starts_with_prompt_info_and_ends_after_exactly_max_tokens(model_dir):
    async with running_engine(make_config(model_dir)) as engine:
        assert engine.info.model_name == str(model_dir) and engine.info.context_length == CONTEXT
        assert engine.info.kv_block_size == 16 and engine.info.total_kv_blocks == 64
        frames = await collect(engine, request(max_tokens=10))
    assert frames[0].prompt_tokens == 40 and frames[0].cached_tokens == 0
    assert [f.last for f in frames] == [False] * (len(frames) - 1) + [True]
    assert frames[-1].finish_reason == "length"
    tokens = tokens_of(frames)
    # No tokenizer in the folder: ids come from [100, vocab_size), clear of any low special token.
    assert len(tokens) == 10 and all(100 <= t < VOCAB for t in tokens)


async def test_token_ids_are_reproducible_from_the_seed_or_the_prompt(model_dir):
    async with running_engine(make_config(model_dir)) as engine:
        seeded = [tokens_of(await collect(engine, request(seed=s, max_tokens=20))) for s in (3, 3, 4)]
        unseeded = [tokens_of(await collect(engine, request(prompt=p, max_tokens=20)))
                    for p in (PROMPT, PROMPT, PROMPT[::-1])]
    assert seeded[0] == seeded[1] != seeded[2]
    assert unseeded[0] == unseeded[1] != unseeded[2]


async def test_repeated_prompt_hits_the_prefix_cache_and_kv_events_announce_the_blocks(model_dir):
    async with running_engine(make_config(model_dir)) as engine:
        events = engine.kv_events()
        first = await collect(engine, request(max_tokens=10))
        batch = await asyncio.wait_for(events.__anext__(), TIMEOUT)
        second = await collect(engine, request(max_tokens=10, request_id="r2"))
        assert engine.stats.prefill_tokens == 40 + 8  # the second prompt computed only its last 8 tokens
        await events.aclose()
    assert first[0].cached_tokens == 0 and second[0].cached_tokens == 32
    assert batch == [BlockStored(block_hashes=block_hashes(PROMPT, 16), parent_block_hash=None,
                                 token_ids=PROMPT[:32], block_size=16)]


async def test_unread_kv_events_are_capped_keeping_the_newest(model_dir, monkeypatch):
    monkeypatch.setattr(engine_module, "MAX_UNREAD_KV_BATCHES", 2)
    async with running_engine(make_config(model_dir)) as engine:
        prompts = [[p] * 16 + [7] for p in range(300, 305)]  # one full block each
        for prompt in prompts:
            await collect(engine, request(prompt=prompt, max_tokens=1))
        events = engine.kv_events()
        kept = [await asyncio.wait_for(events.__anext__(), TIMEOUT) for _ in range(2)]
        await events.aclose()
    assert [batch[0].token_ids for batch in kept] == [prompts[3][:16], prompts[4][:16]]


async def test_closing_the_stream_aborts_the_request_and_frees_its_blocks(model_dir):
    # Real time (speedup 1): 200 decode steps take ~1 s, so the request is surely still running.
    async with running_engine(make_config(model_dir, speedup_ratio=1.0)) as engine:
        stream = engine.generate(request(max_tokens=200))
        first = await asyncio.wait_for(stream.__anext__(), TIMEOUT)
        assert first.prompt_tokens == 40 and engine.load().active_blocks == 3
        await stream.aclose()
        assert engine.load().active_blocks == 0 and engine.load().running_requests == 0

        consumer = asyncio.create_task(collect(engine, request(max_tokens=200, request_id="r2")))
        while engine.load().running_requests == 0:
            await asyncio.sleep(0.001)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        assert engine.load().active_blocks == 0 and engine.load().running_requests == 0


async def test_invalid_prompts_are_rejected_as_invalid_requests(model_dir):
    async with running_engine(make_config(model_dir)) as engine:
        with pytest.raises(InvalidRequestError, match="context length is 256"):
            await collect(engine, request(prompt=[5] * CONTEXT))
        with pytest.raises(InvalidRequestError):
            await collect(engine, request(prompt=[5, VOCAB]))
        with pytest.raises(InvalidRequestError):
            await collect(engine, request(prompt=[]))
        assert engine.load().active_blocks == 0


@pytest.mark.parametrize("constraint", [{"structured_output": StructuredOutput(regex="[0-9]+")},
                                        {"allowed_token_ids": [5, 6]}, {"logit_bias": {5: -100.0}},
                                        {"bad_words": ["no"]}])
async def test_token_constraints_are_refused_not_ignored(model_dir, constraint):
    async with running_engine(make_config(model_dir)) as engine:
        req = GenerateRequest(request_id="r1", token_ids=list(PROMPT),
                              sampling=SamplingOptions(max_tokens=4, **constraint))
        with pytest.raises(InvalidRequestError, match="needs a real engine") as info:
            await collect(engine, req)
        assert info.value.param == next(iter(constraint)) and info.value.status == 400
        assert engine.load().running_requests == 0


async def test_output_is_capped_by_the_context_length(model_dir):
    async with running_engine(make_config(model_dir)) as engine:
        frames = await collect(engine, request(prompt=[5] * (CONTEXT - 3), max_tokens=100))
    assert len(tokens_of(frames)) == 3 and frames[-1].finish_reason == "length"


async def test_prefill_worker_returns_one_token_and_transfer_params_the_decode_worker_accepts(model_dir):
    async with running_engine(make_config(model_dir)) as prefill, \
            running_engine(make_config(model_dir)) as decode:
        frames = await collect(prefill, request(max_tokens=50, params={"do_remote_decode": True}))
        assert len(tokens_of(frames)) == 1 and frames[-1].finish_reason == "length"
        params = frames[-1].kv_transfer_params
        assert params["remote_engine_id"] == prefill.engine_id and params["do_remote_prefill"] is True
        assert len(params["remote_block_ids"]) == 3 and params["remote_host"] == "127.0.0.1"

        frames = await collect(decode, request(max_tokens=20, params=params))
        assert len(tokens_of(frames)) == 20 and frames[-1].kv_transfer_params is None
        assert decode.stats.prefill_tokens == 1  # the transferred prompt was not computed again
        assert prefill.stats.prefill_tokens == 40


async def test_many_requests_on_a_small_pool_all_finish_through_preemption(model_dir):
    # 20 blocks x 16 = 320 tokens; 20 requests of 40 + 60 tokens cannot all stay resident.
    config = make_config(model_dir, num_gpu_blocks_override=20)
    async with running_engine(config) as engine:
        reqs = [request(prompt=[i + 1] * 40, max_tokens=60, request_id=f"r{i}") for i in range(20)]
        results = await asyncio.gather(*(collect(engine, r) for r in reqs))
        assert all(len(tokens_of(frames)) == 60 for frames in results)
        assert engine.stats.preemptions > 0
        assert engine.load() == type(engine.load())(active_blocks=0, total_blocks=20, running_requests=0,
                                                     waiting_requests=0)


async def test_shutdown_fails_open_streams_ends_kv_events_and_is_idempotent(model_dir):
    engine = MockerEngine(make_config(model_dir, speedup_ratio=1.0))
    await engine.start()
    events = engine.kv_events()
    stream = engine.generate(request(max_tokens=200))
    await asyncio.wait_for(stream.__anext__(), TIMEOUT)
    await engine.shutdown()
    await engine.shutdown()
    with pytest.raises(EngineError):
        await asyncio.wait_for(stream.__anext__(), TIMEOUT)
    # Batches produced before the shutdown are still delivered, then the iterator ends.
    async def drain():
        return [batch async for batch in events]
    assert await asyncio.wait_for(drain(), TIMEOUT) == [
        [BlockStored(block_hashes=block_hashes(PROMPT, 16), parent_block_hash=None, token_ids=PROMPT[:32],
                     block_size=16)]]
    with pytest.raises(EngineError):
        await collect(engine, request())


async def test_speedup_one_takes_at_least_the_simulated_time(model_dir):
    async with running_engine(make_config(model_dir, speedup_ratio=1.0)) as engine:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await collect(engine, request(max_tokens=5))
        elapsed = loop.time() - started
    # 40 prefill tokens (4 ms + attention) and 4 decode steps (4.04 ms each).
    assert engine.stats.simulated_seconds == pytest.approx(40 * 1e-4 + 40 * 40 * 5e-9 + 4 * 4.04e-3)
    assert elapsed >= engine.stats.simulated_seconds * 0.95


class _LateClock:
    """A simulated event-loop clock on which every sleep wakes up `late` seconds after it should."""

    def __init__(self, late: float):
        self.now = 0.0
        self.late = late

    async def sleep(self, delay: float, result=None):
        for _ in range(3):  # let the other tasks run first, in no time (a consumer reads what was delivered)
            await asyncio.sleep(0)
        self.now += max(0.0, delay) + self.late
        return result


class _LoopOnClock:
    """The running loop, telling the time of a _LateClock."""

    def __init__(self, loop, clock: _LateClock):
        self._loop, self._clock = loop, clock

    def time(self) -> float:
        return self._clock.now

    def __getattr__(self, name):
        return getattr(self._loop, name)


async def test_a_loop_that_wakes_late_does_not_slow_the_simulated_gpu(model_dir, monkeypatch):
    # Every sleep of the step loop overshoots by 2 ms (a busy event loop): a 20-step decode must still
    # take 20 step times, not 20 x (step + 2 ms). Only the last sleep's lateness shows.
    clock = _LateClock(late=2e-3)
    loop = _LoopOnClock(asyncio.get_running_loop(), clock)
    fake_asyncio = types.SimpleNamespace(**{name: getattr(asyncio, name) for name in dir(asyncio)
                                            if not name.startswith("__")})
    fake_asyncio.sleep = clock.sleep
    fake_asyncio.get_running_loop = lambda: loop
    monkeypatch.setattr(engine_module, "asyncio", fake_asyncio)
    timing = StepTimeModel(prefill_seconds_per_token=0.0, prefill_seconds_per_attention=0.0,
                           decode_seconds_per_step=10e-3, decode_seconds_per_sequence=0.0)
    engine = MockerEngine(make_config(model_dir, speedup_ratio=1.0), timing=timing)
    await asyncio.wait_for(engine.start(), TIMEOUT)
    try:
        frames = await collect(engine, request(max_tokens=21))  # the prefill step is free: 20 decode steps
    finally:
        await asyncio.wait_for(engine.shutdown(), TIMEOUT)
    assert len(tokens_of(frames)) == 21
    assert engine.stats.simulated_seconds == pytest.approx(20 * 10e-3)
    assert clock.now == pytest.approx(20 * 10e-3 + 2e-3)


async def test_dynamo_timing_delivers_a_step_s_tokens_after_its_prefill_before_its_decode_pass(model_dir, monkeypatch):
    # As Dynamo's mocker does: a lone prompt's first token comes when its prefill is done (its TTFT is the
    # prefill alone), and every later token one whole step after the one before.
    clock = _LateClock(late=0.0)
    loop = _LoopOnClock(asyncio.get_running_loop(), clock)
    fake_asyncio = types.SimpleNamespace(**{name: getattr(asyncio, name) for name in dir(asyncio)
                                            if not name.startswith("__")})
    fake_asyncio.sleep = clock.sleep
    fake_asyncio.get_running_loop = lambda: loop
    monkeypatch.setattr(engine_module, "asyncio", fake_asyncio)
    timing = DynamoStepTimeModel(capacity_tokens=64 * 16)
    engine = MockerEngine(make_config(model_dir, speedup_ratio=1.0), timing=timing)
    await asyncio.wait_for(engine.start(), TIMEOUT)
    arrivals = []
    try:
        async def run():
            async for frame in engine.generate(request(max_tokens=4)):
                arrivals.extend(clock.now for _ in frame.token_ids)
        await asyncio.wait_for(run(), TIMEOUT)
    finally:
        await asyncio.wait_for(engine.shutdown(), TIMEOUT)
    prefill = timing.prefill_seconds(len(PROMPT))
    decodes = [timing.decode_seconds(len(PROMPT) + k) for k in range(4)]  # the pass after token k + 1
    assert arrivals == pytest.approx([prefill, prefill + decodes[0], prefill + sum(decodes[:2]),
                                      prefill + sum(decodes[:3])])
    assert engine.stats.simulated_seconds == pytest.approx(prefill + sum(decodes))


def test_step_time_model_adds_prefill_and_decode_costs_and_divides_by_the_speedup():
    step = StepOutput(prefill_tokens=100, prefill_attention=100 * 300, decode_requests=10)
    expected = 100 * 1e-4 + 30000 * 5e-9 + 4e-3 + 10 * 4e-5
    assert StepTimeModel().step_seconds(step) == pytest.approx(expected)
    assert StepTimeModel(speedup_ratio=1000).step_seconds(step) == pytest.approx(expected / 1000)
    assert StepTimeModel().step_seconds(StepOutput()) == 0.0


# ---------------------------------------------------------------------- config and CLI


def test_model_facts_come_from_config_json_and_the_tokenizer(model_dir):
    facts = load_model_facts(make_config(model_dir))
    assert (facts.served_model_name, facts.context_length, facts.vocab_size) == \
        (str(model_dir), CONTEXT, VOCAB)
    assert (facts.first_token_id, facts.end_token_id) == (100, VOCAB)

    # Specials at both ends and a config vocab padded past the tokenizer: draw strictly between.
    tokenizer = {"added_tokens": [{"id": 0}, {"id": 1}, {"id": 2}, {"id": 950}],
                 "model": {"vocab": {str(i): i for i in range(960)}}}
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    facts = load_model_facts(make_config(model_dir, served_model_name="org/tiny", context_length=128))
    assert (facts.first_token_id, facts.end_token_id) == (3, 950)
    assert facts.served_model_name == "org/tiny" and facts.context_length == 128


def test_invalid_combinations_raise_config_errors_naming_the_flags(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="--block-size"):
        make_config(model_dir, block_size=0)
    with pytest.raises(ConfigError, match="--speedup-ratio"):
        make_config(model_dir, speedup_ratio=0.0)
    with pytest.raises(ConfigError, match="--is-prefill-worker and --is-decode-worker"):
        make_config(model_dir, is_prefill_worker=True, is_decode_worker=True)
    with pytest.raises(ConfigError, match="--num-gpu-blocks-override.*--context-length 8192"):
        make_config(model_dir, num_gpu_blocks_override=10, context_length=8192)
    # The context length read from config.json is checked against the pool too.
    with pytest.raises(ConfigError, match="--num-gpu-blocks-override 10 x --block-size 16"):
        load_model_facts(make_config(model_dir, num_gpu_blocks_override=10))
    with pytest.raises(ConfigError, match="no config.json"):
        load_model_facts(make_config(tmp_path / "missing"))


def test_cli_flags_and_env_twins(monkeypatch, capsys, model_dir):
    monkeypatch.setenv("DYN_MODEL_PATH", str(model_dir))
    monkeypatch.setenv("DYN_NUM_WORKERS", "3")
    monkeypatch.setenv("ETCD_ENDPOINTS", "http://127.0.0.1:12379")
    config = parse_config(["--block-size", "32", "--no-enable-prefix-caching", "--is-prefill-worker"])
    assert (config.model_path, config.num_workers, config.block_size) == (str(model_dir), 3, 32)
    assert config.enable_prefix_caching is False and config.role == "prefill"
    assert config.etcd_endpoints == "http://127.0.0.1:12379"
    assert parse_config(["--num-workers", "2"]).num_workers == 2  # the flag beats its env twin

    for argv in (["--max-num-seqs", "0"], ["--speedup-ratio", "fast"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_config(argv)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--max-num-seqs must be at least 1" in err and "invalid float value: 'fast'" in err


def test_the_served_name_is_the_model_path_as_given_unless_named(model_dir, monkeypatch):
    # The rule every engine follows (vLLM serves --model as given): no folder base name.
    monkeypatch.chdir(model_dir.parent)
    relative = model_dir.name
    assert load_model_facts(make_config(model_dir)).served_model_name == str(model_dir)
    facts = load_model_facts(make_config(relative))
    assert facts.served_model_name == relative and facts.path == str(model_dir)
    assert load_model_facts(make_config(relative, served_model_name="org/m")).served_model_name == "org/m"


def test_a_hub_id_as_model_path_is_refused_with_what_to_do(model_dir):
    with pytest.raises(ConfigError, match="--model-path HuggingFaceTB/SmolLM2-135M-Instruct: a model hub id, "
                                          "and there is no hub access; pass a local model folder"):
        load_model_facts(make_config("HuggingFaceTB/SmolLM2-135M-Instruct"))


def test_range_checks_name_the_flag_for_flags_and_env_twins(monkeypatch, capsys, model_dir):
    with pytest.raises(ConfigError, match=r"--request-plane-port must be at most 65535 \(got 70000\)"):
        make_config(model_dir, request_plane_port=70000)
    with pytest.raises(ConfigError, match="--request-plane-port 5000 can serve one worker, not --num-workers"):
        make_config(model_dir, request_plane_port=5000, num_workers=2)
    monkeypatch.setenv("DYN_NUM_WORKERS", "0")
    with pytest.raises(SystemExit) as exit_info:
        parse_config([])
    assert exit_info.value.code == 2
    assert "DYN_NUM_WORKERS='0': --num-workers must be at least 1 (got 0)" in capsys.readouterr().err


def choices_request(n=1, max_tokens=6, **sampling) -> GenerateRequest:
    return GenerateRequest(request_id="c1", token_ids=list(PROMPT),
                           sampling=SamplingOptions(max_tokens=max_tokens, seed=3, n=n, **sampling))


async def test_n_choices_interleave_with_their_own_finish_and_one_last_frame(model_dir):
    async with running_engine(make_config(model_dir)) as engine:
        frames = await collect(engine, choices_request(n=3))
        assert frames[0].prompt_tokens == len(PROMPT)
        assert [f.prompt_tokens is not None for f in frames].count(True) == 1
        assert frames[-1].last and [f.last for f in frames].count(True) == 1
        streams = {i: [t for f in frames if f.index == i for t in f.token_ids] for i in range(3)}
        assert all(len(tokens) == 6 for tokens in streams.values())
        assert len({tuple(tokens) for tokens in streams.values()}) == 3  # each its own seed
        finishes = sorted((f.index, f.finish_reason) for f in frames if f.finish_reason is not None)
        assert finishes == [(0, "length"), (1, "length"), (2, "length")]
        again = await collect(engine, choices_request(n=3))  # reproducible, however the frames fall
        assert {i: [t for f in again if f.index == i for t in f.token_ids] for i in range(3)} == streams
        assert engine.load().running_requests == 0


async def test_logprobs_are_deterministic_with_the_sampled_token_at_its_rank(model_dir):
    async with running_engine(make_config(model_dir)) as engine:
        frames = await collect(engine, choices_request(logprobs=4, prompt_logprobs=2))
        tokens = tokens_of(frames)
        logprobs = [lp for f in frames for lp in f.logprobs or []]
        assert [lp.token_id for lp in logprobs] == tokens
        for lp in logprobs:
            # The top 4, and the sampled token besides when it is not among them (as vLLM's entries).
            assert len(lp.top) == (4 if lp.rank <= 4 else 5) and dict(lp.top)[lp.token_id] == lp.logprob
            assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
            assert lp.rank >= 1 and (lp.rank > 4 or lp.top[lp.rank - 1][0] == lp.token_id)
        echo = frames[0].prompt_logprobs
        assert len(echo) == len(PROMPT) and echo[0] is None and echo[1].token_id == PROMPT[1]
        again = await collect(engine, choices_request(logprobs=4, prompt_logprobs=2))
        assert [lp for f in again for lp in f.logprobs] == logprobs and again[0].prompt_logprobs == echo

