"""Disaggregated serving with real vLLM: two prefill workers and one decode worker (NixlConnector; prefill A
on core 0, the decode worker and prefill B on core 1) behind a kv-mode frontend, all started with
`python -m` as a user would. Two prefill workers make the KV router's choice among them observable.

The equality check needs a reference that no KV transfer touched. The decode worker keeps pulled
blocks in its prefix cache, so an aggregated request there after the disaggregated one would reuse
the transferred KV (and one before it would leave nothing to transfer). The reference is therefore
computed first, by the prefill worker alone (a plain request on its request plane, prefill and
decode in one engine); the disaggregated answer (prefill there, KV pulled over NIXL, decode on the
other engine) must then be token for token the same. A second frontend on the namespace with
--no-disaggregation serves the aggregated comparison through the decode worker for the TTFT figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid

import httpx
import jsonschema
import pytest

from dynamo_lite.protocol.messages import GenerateRequest, SamplingOptions, WorkerStatsRequest
from dynamo_lite.transport.client import RequestClient
from tests.e2e.conftest import _new_group
from tests.e2e.harness import DEFAULT_MODEL_PATH, SERVED_MODEL_NAME, Proc, metric_sum, wait_until
from tests.services import free_tcp_port

pytestmark = pytest.mark.vllm

MAX_TOKENS = 24
TOPICS = ["the history of the Roman empire", "how bread is baked", "the life cycle of stars",
          "the rules of chess", "why the sky is blue", "the water cycle"]


def long_text(topic: str, sentences: int = 15) -> str:
    """A prompt of several hundred tokens (vLLM's CPU KV block is 128 tokens)."""
    facts = [f"Fact {i} about {topic}: this is note number {i} in a long briefing that the reader must keep "
             f"in mind." for i in range(sentences)]
    return " ".join(facts) + f" Now, in one sentence, what is the main idea about {topic}?"


class DisaggStack:
    def __init__(self, group, namespace: str, frontend: Proc, base_url: str, reference_url: str,
                 prefill: Proc, decode: Proc | None = None):
        self.group, self.namespace = group, namespace
        self.frontend, self.base_url, self.reference_url = frontend, base_url, reference_url
        self.prefill, self.decode = prefill, decode
        self.prefill_b: Proc | None = None
        self.prefill_address = ""  # prefill worker A's request plane (its pid is self.prefill's)

    def instances(self, role: str) -> list[dict]:
        r = httpx.get(f"{self.base_url}/health", timeout=5)
        return [i for i in r.json().get("instances", []) if i.get("role") == role] if r.status_code == 200 else []

    def metric(self, name: str, **labels) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        return metric_sum(httpx.get(f"{self.base_url}/metrics", timeout=5).text, name, **labels)

    def served(self, reason: str) -> float:
        return self.metric("dynamo_lite_frontend_disagg_requests_total", reason=reason)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, etcd_endpoint, nats_url):
    if not (DEFAULT_MODEL_PATH / "config.json").exists():
        pytest.fail(f"default model missing at {DEFAULT_MODEL_PATH}: run scripts/setup.sh")
    group = _new_group(tmp_path_factory, etcd_endpoint, nats_url, "vllm-disagg")
    namespace = f"e2e-{uuid.uuid4().hex[:8]}"
    try:
        port, reference_port = free_tcp_port(), free_tcp_port()
        frontend = group.start("frontend", "dynamo_lite.frontend", "--http-host", "127.0.0.1", "--http-port",
                               str(port), "--namespace", namespace, "--router-mode", "kv",
                               "--disagg-min-prefill-tokens", "256")
        group.start("frontend-agg", "dynamo_lite.frontend", "--http-host", "127.0.0.1", "--http-port",
                    str(reference_port), "--namespace", namespace, "--no-disaggregation")
        common = ["--model", str(DEFAULT_MODEL_PATH), "--served-model-name", SERVED_MODEL_NAME,
                  "--max-model-len", "2048", "--max-num-seqs", "8", "--namespace", namespace,
                  "--connector", "nixl"]
        # All three engines start together: prefill A alone on core 0, the decode worker and prefill B
        # on core 1. While an engine initialises, vLLM's NIXL worker moves its main thread to the last
        # core; the worker puts it back on its own cores once the engine is up (vllm/cpu_pinning.py).
        prefill = group.start("prefill", "dynamo_lite.vllm", *common, "--is-prefill-worker",
                              extra_env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0"})
        s = DisaggStack(group, namespace, frontend, f"http://127.0.0.1:{port}",
                        f"http://127.0.0.1:{reference_port}", prefill)
        s.decode = group.start("decode", "dynamo_lite.vllm", *common,
                               extra_env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "1"})
        s.prefill_b = group.start("prefill-b", "dynamo_lite.vllm", *common, "--is-prefill-worker",
                                  extra_env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "1"})
        wait_until(lambda: len(s.instances("prefill")) == 2 and s.instances("decode"), 300,
                   "2 prefill workers and the decode worker on /health", [frontend, prefill, s.decode, s.prefill_b])
        # Prefill worker A is the one whose instance record carries its process's pid.
        (first,) = [i for i in s.instances("prefill") if i["pid"] == prefill.pid]
        s.prefill_address = first["address"]
        yield s
    finally:
        group.stop()


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(DEFAULT_MODEL_PATH))


def chat_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return tokenizer.encode(rendered, add_special_tokens=False)


def complete(base_url: str, prompt_ids: list[int], max_tokens: int = MAX_TOKENS) -> dict:
    r = httpx.post(f"{base_url}/v1/completions", timeout=300, json={
        "model": SERVED_MODEL_NAME, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def worker_call(address: str, request, timeout: float = 300):
    async def run():
        client = RequestClient()
        try:
            if isinstance(request, WorkerStatsRequest):
                return await client.call(address, request, timeout=timeout)
            tokens: list[int] = []
            async with asyncio.timeout(timeout):
                async for frame in client.stream(address, request):
                    tokens += frame.token_ids
            return tokens
        finally:
            await client.close()

    return asyncio.run(run())


def worker_stats(stack: DisaggStack, address: str | None = None):
    """Request counters of the worker at `address` (default: prefill worker A)."""
    return worker_call(address or stack.prefill_address, WorkerStatsRequest())


def completed_per_prefill_worker(stack: DisaggStack) -> dict[int, int]:
    return {i["instance_id"]: worker_stats(stack, i["address"]).completed_requests
            for i in stack.instances("prefill")}


def reference_on_prefill_worker(stack: DisaggStack, tokenizer, prompt_ids: list[int]) -> list[int]:
    """Greedy tokens computed by the prefill worker's engine alone (no transfer)."""
    request = GenerateRequest(request_id=f"ref-{uuid.uuid4().hex[:8]}", token_ids=prompt_ids,
                              sampling=SamplingOptions(max_tokens=MAX_TOKENS, temperature=0.0,
                                                       stop_token_ids=[tokenizer.eos_token_id]))
    return worker_call(stack.prefill_address, request)


def test_disaggregated_greedy_output_equals_single_engine_output(stack, tokenizer):
    before = worker_stats(stack).completed_requests
    blocks_before = stack.metric("dynamo_lite_frontend_kv_transfer_blocks_sum")
    for topic in TOPICS[:3]:
        prompt_ids = chat_ids(tokenizer, long_text(topic))
        assert len(prompt_ids) > 400  # several KV blocks of 128 tokens
        reference = reference_on_prefill_worker(stack, tokenizer, prompt_ids)
        reference = [t for t in reference if t != tokenizer.eos_token_id]
        answer = complete(stack.base_url, prompt_ids)
        assert answer["choices"][0]["text"] == tokenizer.decode(reference, skip_special_tokens=True), topic
        assert answer["usage"]["completion_tokens"] in (len(reference), len(reference) + 1)  # + EOS if it ended
    assert stack.served("disaggregated") == 3
    # The KV router sent each prefill to worker A, which already held the prompt from its reference run
    # (3 references + 3 prefills there).
    assert worker_stats(stack).completed_requests == before + 6
    # The decode worker pulled the prompt's KV: blocks handed over and bytes its vLLM measured.
    assert stack.metric("dynamo_lite_frontend_kv_transfer_blocks_sum") - blocks_before >= 3 * 4
    moved = stack.metric("dynamo_lite_frontend_kv_transfer_bytes_sum")
    assert moved > 0, "the decode worker's vLLM reported no NIXL bytes"
    print(f"\nKV moved for 3 requests: {moved / 1e6:.1f} MB, transfer time "
          f"{stack.metric('dynamo_lite_frontend_kv_transfer_seconds_sum') * 1e3:.1f} ms")


def test_shared_prefix_goes_to_the_prefill_worker_holding_it(stack, tokenizer):
    base = long_text(TOPICS[3])
    first = chat_ids(tokenizer, base)
    before = completed_per_prefill_worker(stack)
    complete(stack.base_url, first, max_tokens=4)
    after_first = completed_per_prefill_worker(stack)
    (holder,) = [w for w in after_first if after_first[w] == before[w] + 1]  # one of the two prefilled it
    extended_text = base + " " + long_text("a follow-up question", 10)
    extended = chat_ids(tokenizer, extended_text)
    shared = next(i for i, (a, b) in enumerate(zip(first, extended)) if a != b)
    cached_blocks = shared // 128  # full KV blocks of the shared prefix
    assert cached_blocks >= 2

    def overlaps() -> dict[int, int]:
        r = httpx.post(f"{stack.base_url}/debug/route", timeout=10, json={
            "model": SERVED_MODEL_NAME, "messages": [{"role": "user", "content": extended_text}]})
        return {w["worker_id"]: w["overlap_blocks"] for w in r.json()["prefill"]["workers"]}

    wait_until(lambda: overlaps().get(holder, 0) >= cached_blocks, 30,
               "the prefill workers' KV events for the first prompt")
    route = httpx.post(f"{stack.base_url}/debug/route", timeout=10, json={
        "model": SERVED_MODEL_NAME, "messages": [{"role": "user", "content": extended_text}]}).json()["prefill"]
    assert route["choice"] == holder, route
    assert all(o < cached_blocks for w, o in overlaps().items() if w != holder)  # the other holds none of it
    served = stack.served("disaggregated")
    complete(stack.base_url, extended, max_tokens=4)
    assert stack.served("disaggregated") == served + 1
    after_second = completed_per_prefill_worker(stack)
    assert {w: after_second[w] - after_first[w] for w in after_second} == {
        w: int(w == holder) for w in after_second}


def test_n_choices_are_served_on_the_decode_worker_alone(stack, tokenizer):
    """n > 1 is prefilled once, on the decode worker (vLLM's n children cannot share one remote pull): the
    same seeded choices as the aggregated frontend gets from that worker."""
    prompt_ids = chat_ids(tokenizer, long_text("the n choices of a long prompt"))
    body = {"model": SERVED_MODEL_NAME, "prompt": prompt_ids, "max_tokens": 8, "n": 3, "seed": 5,
            "temperature": 1.0}
    before, parallel = completed_per_prefill_worker(stack), stack.served("parallel_sampling")
    r = httpx.post(f"{stack.base_url}/v1/completions", timeout=300, json=body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2] and len({c["text"] for c in choices}) > 1
    assert stack.served("parallel_sampling") == parallel + 1
    assert completed_per_prefill_worker(stack) == before  # no prefill worker took part
    aggregated = httpx.post(f"{stack.reference_url}/v1/completions", timeout=300, json=body).json()["choices"]
    assert [c["text"] for c in choices] == [c["text"] for c in aggregated]


def generate_frames(address: str, request: GenerateRequest, timeout: float = 300) -> list:
    async def run():
        client = RequestClient()
        try:
            async with asyncio.timeout(timeout):
                return [frame async for frame in client.stream(address, request)]
        finally:
            await client.close()

    return asyncio.run(run())


# bf16 engine numerics: the decode worker computes the prompt's last token alone (one row) on the pulled KV,
# where a single engine computes it within the prompt's pass; that moves logprobs by ~1e-2 here (measured
# 0.009 on the first token, ~1e-3 after), inherent to vLLM's P/D, not to what the frontend carries.
DISAGG_LOGPROB_TOLERANCE = 0.05


def test_first_token_logprobs_through_disagg_equal_a_single_engines(stack, tokenizer):
    """The decode worker computes the first token after the KV pull: its logprobs (and the next ones) are
    the single-engine reference's, computed first on prefill worker A alone (see the module doc): the same
    tokens and alternatives, the values within bf16 noise."""
    prompt_ids = chat_ids(tokenizer, long_text("the logprobs of a first token"))
    request = GenerateRequest(request_id=f"ref-{uuid.uuid4().hex[:8]}", token_ids=prompt_ids,
                              sampling=SamplingOptions(max_tokens=4, temperature=0.0, logprobs=3))
    frames = generate_frames(stack.prefill_address, request)
    reference = [lp for frame in frames for lp in frame.logprobs or ()]
    served = stack.served("disaggregated")
    r = httpx.post(f"{stack.base_url}/v1/completions", timeout=300, json={
        "model": SERVED_MODEL_NAME, "prompt": prompt_ids, "max_tokens": 4, "temperature": 0, "logprobs": 3})
    assert r.status_code == 200, r.text
    assert stack.served("disaggregated") == served + 1
    logprobs = r.json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [tokenizer.decode([lp.token_id]) for lp in reference]
    rows = zip(logprobs["token_logprobs"], reference, logprobs["top_logprobs"], strict=True)
    for mine, theirs, top in rows:
        assert abs(mine - theirs.logprob) <= DISAGG_LOGPROB_TOLERANCE, (logprobs, reference)
        expected = {tokenizer.decode([t]): v for t, v in theirs.top}
        assert top.keys() == expected.keys()
        assert all(abs(top[k] - v) <= DISAGG_LOGPROB_TOLERANCE for k, v in expected.items())


def test_short_prompt_stays_on_the_decode_worker(stack, tokenizer):
    done = worker_stats(stack).completed_requests
    short = stack.served("short_prompt")
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", timeout=300, json={
        "model": SERVED_MODEL_NAME, "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
    assert stack.served("short_prompt") == short + 1
    assert worker_stats(stack).completed_requests == done


def ttft(base_url: str, prompt_ids: list[int]) -> float:
    start = time.monotonic()
    with httpx.stream("POST", f"{base_url}/v1/completions", timeout=300, json={
            "model": SERVED_MODEL_NAME, "prompt": prompt_ids, "max_tokens": 8, "temperature": 0,
            "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {") and '"text":""' not in line:
                return time.monotonic() - start
    raise AssertionError("no token streamed")


def test_time_to_first_token_remote_and_local_prefill(stack, tokenizer):
    """Figures, not assertions on speed: TTFT of a fresh long prompt served each way."""
    remote = ttft(stack.base_url, chat_ids(tokenizer, long_text(TOPICS[4], 25)))
    local = ttft(stack.reference_url, chat_ids(tokenizer, long_text(TOPICS[5], 25)))
    prefill_sum = stack.metric("dynamo_lite_frontend_remote_prefill_seconds_sum")
    prefill_count = stack.metric("dynamo_lite_frontend_remote_prefill_seconds_count")
    handoff_sum = stack.metric("dynamo_lite_frontend_remote_decode_first_token_seconds_sum")
    print(f"\nTTFT remote prefill {remote:.2f}s, local prefill {local:.2f}s; mean remote prefill "
          f"{prefill_sum / prefill_count:.2f}s, mean decode first token after handoff "
          f"{handoff_sum / prefill_count:.2f}s")
    assert remote > 0 and local > 0


def hang_up_after(base_url: str, prompt_ids: list[int], seconds: float, chunks: int | None = None) -> None:
    """Stream a completion and close the connection after `seconds`, at whatever stage it is, or once
    `chunks` chunks of text have streamed (then it is decoding)."""
    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    async with client.stream("POST", f"{base_url}/v1/completions", json={
                            "model": SERVED_MODEL_NAME, "prompt": prompt_ids, "max_tokens": 64,
                            "temperature": 0, "ignore_eos": True, "stream": True}) as response:
                        streamed = 0
                        async for line in response.aiter_lines():
                            streamed += line.startswith("data: {")
                            if streamed == chunks:
                                return

    asyncio.run(run())


def test_cancelling_during_prefill_transfer_or_decode_leaves_every_engine_serving(stack, tokenizer):
    """Clients that hang up while the prompt is prefilled, while the decode worker pulls its KV, or while
    it decodes: every engine aborts or finishes its part and keeps serving."""
    workers = {i["address"]: i["role"] for i in stack.instances("prefill") + stack.instances("decode")}
    assert len(workers) == 3

    def aborted(role: str) -> int:
        return sum(worker_stats(stack, a).aborted_requests for a, r in workers.items() if r == role)

    before = {role: aborted(role) for role in ("prefill", "decode")}
    # A remote prefill of these prompts takes ~0.3-1 s here, the handoff and 64 decode steps ~2 s more;
    # on a loaded box (the whole suite on 2 cores) prefill can take 2-3 s, hence the later hang-ups.
    for seconds in (0.05, 0.2, 0.35, 0.5, 0.8, 1.2, 1.8, 2.5, 3.5, 5.0):
        hang_up_after(stack.base_url, chat_ids(tokenizer, long_text(f"cancellation after {seconds} s", 25)),
                      seconds)
    # Which stage a timed hang-up meets depends on the box's load; these meet the decode for sure.
    for chunks in (2, 8):
        hang_up_after(stack.base_url, chat_ids(tokenizer, long_text(f"cancellation after {chunks} chunks", 25)),
                      60, chunks)
    wait_until(lambda: all(worker_stats(stack, a).active_requests == 0 for a in workers), 60,
               "every worker to finish or abort the cancelled requests",
               [stack.prefill, stack.prefill_b, stack.decode])
    # Some were stopped on a prefill worker, some on the decode worker after their KV handoff.
    assert aborted("prefill") > before["prefill"]
    assert aborted("decode") > before["decode"]
    # Each engine still answers on its own (its engine core survived), and so does the whole path.
    for address in workers:
        request = GenerateRequest(request_id=f"after-cancel-{uuid.uuid4().hex[:8]}",
                                  token_ids=chat_ids(tokenizer, "Name a colour."),
                                  sampling=SamplingOptions(max_tokens=4, temperature=0.0, ignore_eos=True))
        assert len(worker_call(address, request, timeout=60)) == 4, workers[address]
    served, failed = stack.served("disaggregated"), stack.served("prefill_failed")
    answer = complete(stack.base_url, chat_ids(tokenizer, long_text(TOPICS[0] + " again")), max_tokens=8)
    assert answer["choices"][0]["text"]
    assert stack.served("disaggregated") == served + 1 and stack.served("prefill_failed") == failed


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"],
    "additionalProperties": False}}}


def test_structured_answers_survive_disaggregation(stack):
    """The decode worker samples under the grammar from the first token it makes from the pulled KV:
    a JSON-schema answer and a forced tool call of a remotely prefilled prompt are valid."""
    served = stack.served("disaggregated")
    # Two contexts: with one, the second prompt's prefix would already sit on the decode worker.
    keepers, harbours = long_text("the keepers of lighthouses"), long_text("the harbours of Brittany")
    bodies = [{"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                          "strict": True}},
               "messages": [{"role": "system", "content": keepers},
                            {"role": "user", "content": "Describe one keeper as JSON."}]},
              {"tools": [WEATHER_TOOL], "tool_choice": "required",
               "messages": [{"role": "system", "content": harbours},
                            {"role": "user", "content": "What is the weather at the harbour of Brest?"}]}]
    answers = []
    for body in bodies:
        r = httpx.post(f"{stack.base_url}/v1/chat/completions", timeout=300,
                       json={"model": SERVED_MODEL_NAME, "max_tokens": 60, "temperature": 0, **body})
        assert r.status_code == 200, r.text
        answers.append(r.json()["choices"][0])
    jsonschema.validate(json.loads(answers[0]["message"]["content"]), PERSON)
    [call] = answers[1]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and answers[1]["finish_reason"] == "tool_calls"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER_TOOL["function"]["parameters"])
    assert stack.served("disaggregated") == served + 2


def test_killed_prefill_worker_does_not_fail_later_requests(stack, tokenizer):
    """SIGKILL both prefill workers' process groups (each worker and its vLLM engine processes): their
    leases linger until they expire and their request-plane ports refuse connections."""
    failed_before = stack.served("prefill_failed") + stack.served("no_prefill_workers")
    for proc in (stack.prefill, stack.prefill_b):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.popen.wait(10)
    for topic in ("the migration of birds", "volcanoes"):
        answer = complete(stack.base_url, chat_ids(tokenizer, long_text(topic)), max_tokens=8)
        assert answer["choices"][0]["text"]
    # Both were prefilled on the decode worker itself, not failed.
    assert stack.served("prefill_failed") + stack.served("no_prefill_workers") - failed_before == 2
