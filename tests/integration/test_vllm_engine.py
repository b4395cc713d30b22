"""VllmEngine against a real in-process vLLM engine on the default model (one engine for the module)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path

import pytest
import pytest_asyncio

from dynamo_lite.protocol.errors import InvalidRequestError
from dynamo_lite.protocol.hashing import block_hashes
from dynamo_lite.runtime.models import default_model_path
from dynamo_lite.protocol.messages import (BlockStored, GenerateFrame, GenerateRequest, SamplingOptions,
                                           StructuredOutput)

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]

MODEL_PATH = Path(default_model_path())
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# Pin the engine to one core (two engines on two cores starve each other) and keep its KV cache small
# unless the caller already chose.
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0"}


def chat_token_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def long_prompt(tokenizer, topic: str, min_tokens: int) -> list[int]:
    text = f"Notes about {topic}. "
    ids: list[int] = []
    n = 0
    while len(ids) < min_tokens:
        n += 1
        text += f"Fact {n} about {topic}: it has property number {n * 7} and colour code {n * 13}. "
        ids = chat_token_ids(tokenizer, [{"role": "user", "content": text}])
    return ids


def request(request_id: str, token_ids: list[int], max_tokens: int, **sampling) -> GenerateRequest:
    options = SamplingOptions(max_tokens=max_tokens, temperature=0.0, **sampling)
    return GenerateRequest(request_id=request_id, token_ids=token_ids, sampling=options)


async def collect(engine, req: GenerateRequest) -> list[GenerateFrame]:
    return [frame async for frame in engine.generate(req)]


def tokens_of(frames: list[GenerateFrame]) -> list[int]:
    return [token for frame in frames for token in frame.token_ids]


class EventLog:
    """Everything the engine's kv_events() yields, gathered by a background task."""

    def __init__(self) -> None:
        self.events: list = []

    def stored_hashes(self) -> set[int]:
        return {h for e in self.events if isinstance(e, BlockStored) for h in e.block_hashes}


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(MODEL_PATH))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine_and_events():
    if not (MODEL_PATH / "config.json").is_file():
        pytest.skip(f"default model folder missing at {MODEL_PATH}: run scripts/prepare_model.py")
    from dynamo_lite.vllm.args import parse_args
    from dynamo_lite.vllm.engine import VllmEngine

    saved = {key: os.environ.get(key) for key in ENGINE_ENV}
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    engine_args, _ = parse_args(["--model", str(MODEL_PATH), "--max-model-len", "2048",
                                 "--max-num-seqs", "8"])
    engine = VllmEngine(engine_args)
    log = EventLog()
    relay: asyncio.Task | None = None
    try:
        await asyncio.wait_for(engine.start(), timeout=400)

        async def gather_events() -> None:
            async for events in engine.kv_events():
                log.events.extend(events)

        relay = asyncio.create_task(gather_events())
        yield engine, log
    finally:
        if relay is not None:
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay
        await asyncio.wait_for(engine.shutdown(), timeout=60)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def engine(engine_and_events):
    return engine_and_events[0]


async def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


async def test_engine_info_describes_the_model(engine):
    info = engine.info
    assert info.model_name == str(MODEL_PATH)  # no --served-model-name: the model argument
    assert Path(info.model_path, "tokenizer.json").is_file()
    assert info.context_length == 2048
    assert info.kv_block_size > 0 and info.total_kv_blocks > 0


async def test_greedy_chat_answers_paris(engine, tokenizer):
    prompt = chat_token_ids(tokenizer, QUESTION)
    frames = await collect(engine, request("paris", prompt, max_tokens=32))
    assert frames[0].prompt_tokens == len(prompt)
    # The engine core's queue and prefill times (vLLM's RequestStateStats), for the frontend's stage metrics.
    assert frames[0].queue_seconds is not None and frames[0].queue_seconds >= 0
    assert frames[0].prefill_seconds is not None and 0 < frames[0].prefill_seconds < 30
    assert frames[-1].last and frames[-1].finish_reason == "stop"
    assert not any(f.last for f in frames[:-1])
    answer = tokenizer.decode([t for f in frames for t in f.token_ids], skip_special_tokens=True)
    assert "Paris" in answer


async def test_max_tokens_ends_with_length(engine, tokenizer):
    frames = await collect(engine, request("len", chat_token_ids(tokenizer, QUESTION), max_tokens=3,
                                           ignore_eos=True))
    assert sum(len(f.token_ids) for f in frames) == 3
    assert frames[-1].finish_reason == "length"


async def test_repeated_long_prompt_is_served_from_the_prefix_cache(engine, tokenizer):
    block = engine.info.kv_block_size
    prompt = long_prompt(tokenizer, "the prefix cache", 3 * block + 10)
    first = await collect(engine, request("cache-1", prompt, max_tokens=1))
    second = await collect(engine, request("cache-2", prompt, max_tokens=1))
    assert first[0].cached_tokens == 0
    assert second[0].cached_tokens >= 3 * block
    assert second[0].cached_tokens % block == 0 and second[0].cached_tokens < len(prompt)


async def test_kv_events_carry_the_prompts_content_hashes(engine_and_events, tokenizer):
    engine, log = engine_and_events
    block = engine.info.kv_block_size
    prompt = long_prompt(tokenizer, "kv events", 2 * block + 5)
    expected = block_hashes(prompt, block)
    assert len(expected) == 2
    await collect(engine, request("events", prompt, max_tokens=1))
    assert await wait_for(lambda: set(expected) <= log.stored_hashes(), timeout=10), log.events[-5:]
    first = next(e for e in log.events if isinstance(e, BlockStored) and expected[0] in e.block_hashes)
    assert first.parent_block_hash is None  # the prompt's first block is a root
    assert first.block_hashes[:2] == expected
    assert first.token_ids[:2 * block] == prompt[:2 * block]


async def test_the_engines_publisher_replays_the_batches_it_sent(engine_and_events, tokenizer):
    # What the worker falls back on when ZMQ drops a batch: vLLM's engine core serves its replay buffer
    # on the endpoint the worker configured, and the replayed batches translate to the events relayed.
    import msgspec
    from vllm.distributed.kv_events import KVEventBatch

    from dynamo_lite.vllm.kv_events import KvEventTranslator

    engine, log = engine_and_events
    prompt = long_prompt(tokenizer, "replay", 2 * engine.info.kv_block_size + 5)
    expected = set(block_hashes(prompt, engine.info.kv_block_size))
    await collect(engine, request("replayed", prompt, max_tokens=1))
    assert await wait_for(lambda: expected <= log.stored_hashes(), timeout=10)
    replayed = await engine._subscriber.fetch_replay(0, 1 << 62)
    assert [seq for seq, _ in replayed] == list(range(len(replayed))) and replayed  # every batch, in order
    translator, decoder = KvEventTranslator(), msgspec.msgpack.Decoder(KVEventBatch)
    events = [event for _, payload in replayed
              for event in translator.translate(decoder.decode(payload).events)]
    assert {h for e in events if isinstance(e, BlockStored) for h in e.block_hashes} == log.stored_hashes()


async def test_cancelling_the_consumer_aborts_the_request(engine, tokenizer):
    prompt = chat_token_ids(tokenizer, [{"role": "user", "content": "Write a very long story about a cat."}])
    long_request = request("to-cancel", prompt, max_tokens=1500, ignore_eos=True)
    received = 0
    async with contextlib.aclosing(engine.generate(long_request)) as frames:
        async for frame in frames:
            received += len(frame.token_ids)
            if received >= 3:
                # While it streams, the engine reports it as running.
                assert await wait_for(lambda: engine.load().running_requests == 1, timeout=10)
                break
    assert await wait_for(lambda: engine.load().running_requests == 0, timeout=10)
    # The engine core itself dropped it: a new request is then the only one it schedules.
    await collect(engine, request("after-cancel", prompt, max_tokens=2, ignore_eos=True))
    stats = engine.last_scheduler_stats
    assert stats is not None and stats.num_running_reqs <= 1
    assert engine.load().running_requests == 0 and engine.load().active_blocks == 0


async def test_prompt_longer_than_the_context_is_an_invalid_request(engine):
    with pytest.raises(InvalidRequestError) as excinfo:
        await collect(engine, request("too-long", [100] * 3000, max_tokens=4))
    assert "2048" in str(excinfo.value)


async def test_min_tokens_above_max_tokens_is_an_invalid_request(engine, tokenizer):
    with pytest.raises(InvalidRequestError) as excinfo:
        await collect(engine, request("bad-min", chat_token_ids(tokenizer, QUESTION), max_tokens=2,
                                      min_tokens=5))
    assert "min_tokens" in str(excinfo.value)


# ----------------------------------------------------------------------------- translation, no engine


def vllm_stored(hashes, parent, tokens, block_size, **extra):
    from vllm.distributed.kv_events import BlockStored as VllmBlockStored

    return VllmBlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens,
                           block_size=block_size, lora_id=None, medium="GPU", lora_name=None, **extra)


async def test_translator_chains_content_hashes_across_events_and_maps_removals():
    from vllm.distributed.kv_events import BlockRemoved as VllmBlockRemoved

    from dynamo_lite.protocol.messages import BlockRemoved
    from dynamo_lite.vllm.kv_events import KvEventTranslator

    tokens = list(range(12))
    expected = block_hashes(tokens, 4)
    translator = KvEventTranslator()
    out = translator.translate([vllm_stored([b"a", b"b"], None, tokens[:8], 4),
                                vllm_stored([b"c"], b"b", tokens[8:], 4),
                                VllmBlockRemoved(block_hashes=[b"c", b"unknown"], medium="GPU")])
    assert out[0].block_hashes == expected[:2] and out[0].parent_block_hash is None
    assert out[1].block_hashes == expected[2:] and out[1].parent_block_hash == expected[1]
    assert out[2] == BlockRemoved(block_hashes=[expected[2]])


async def test_translator_drops_what_token_ids_cannot_describe():
    from dynamo_lite.vllm.kv_events import KvEventTranslator

    translator = KvEventTranslator()
    orphan = vllm_stored([b"x"], b"never-seen", [1, 2, 3, 4], 4)
    lora = vllm_stored([b"y"], None, [1, 2, 3, 4], 4, extra_keys=[("adapter",)])
    offloaded = vllm_stored([b"z"], None, [1, 2, 3, 4], 4)
    offloaded.medium = "CPU"
    assert translator.translate([orphan, lora, offloaded]) == []
    assert translator.dropped_orphans == 1


async def test_n_choices_each_finish_on_their_own_and_one_last_frame(engine, tokenizer):
    prompt = chat_token_ids(tokenizer, QUESTION)
    req = GenerateRequest(request_id="choices", token_ids=prompt, sampling=SamplingOptions(
        max_tokens=8, temperature=1.0, seed=7, n=3, ignore_eos=True))
    frames = await collect(engine, req)
    assert frames[0].prompt_tokens == len(prompt)
    assert [f.last for f in frames].count(True) == 1 and frames[-1].last
    finishes = [(f.index, f.finish_reason) for f in frames if f.finish_reason is not None]
    assert sorted(finishes) == [(0, "length"), (1, "length"), (2, "length")]
    for index in range(3):
        mine = [f for f in frames if f.index == index]
        assert sum(len(f.token_ids) for f in mine) == 8
        assert mine[-1].finish_reason == "length"  # nothing of a choice after its finish frame


async def test_logprobs_top_alternatives_include_the_sampled_token(engine, tokenizer):
    prompt = chat_token_ids(tokenizer, QUESTION)
    frames = await collect(engine, request("logprobs", prompt, max_tokens=6, logprobs=5, prompt_logprobs=2))
    tokens = [t for f in frames for t in f.token_ids]
    logprobs = [lp for f in frames for lp in (f.logprobs or [])]
    assert len(logprobs) == len(tokens) == 6
    for token, lp in zip(tokens, logprobs):
        assert lp.token_id == token and lp.rank == 1  # greedy: the most likely token
        assert len(lp.top) == 5
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        assert dict(lp.top)[token] == lp.logprob and lp.top[0][0] == token
    echo = frames[0].prompt_logprobs
    assert echo is not None and len(echo) == len(prompt) and echo[0] is None
    # The top 2, and the prompt's token besides when it is not among them.
    assert all(e.token_id == t and e.rank >= 1 and len(e.top) == (2 if e.rank <= 2 else 3)
               for e, t in zip(echo[1:], prompt[1:]))


FACTS = {"type": "object", "properties": {"facts": {"type": "array", "minItems": 4, "maxItems": 4,
                                                    "items": {"type": "string", "maxLength": 60}}},
         "required": ["facts"], "additionalProperties": False}


async def test_a_migrated_json_answer_resumes_its_grammar_after_the_generated_tokens(engine, tokenizer):
    """What a migration hands the new worker: the prompt followed by the answer's first tokens, and how
    many of them were generated. The grammar (vllm/structured_resume.py) starts after them, so the
    continuation completes the same JSON; a grammar started afresh would open a new object inside it."""
    jsonschema = pytest.importorskip("jsonschema")
    prompt = chat_token_ids(tokenizer, [{"role": "user", "content": "Give four facts about lighthouses as JSON."}])
    schema = StructuredOutput(json=json.dumps(FACTS))
    whole = tokens_of(await collect(engine, request("json-whole", prompt, 300, structured_output=schema)))
    first = whole[:12]
    moved = GenerateRequest(request_id="json-moved", token_ids=prompt + first, resumed_tokens=len(first),
                            sampling=SamplingOptions(max_tokens=300, temperature=0.0, structured_output=schema))
    rest = tokens_of(await collect(engine, moved))
    answer = json.loads(tokenizer.decode(first + rest, skip_special_tokens=True))
    jsonschema.validate(answer, FACTS)
