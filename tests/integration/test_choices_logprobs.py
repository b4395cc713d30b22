"""n > 1 and logprobs through the frontend app, over a loopback worker whose engine scripts n choices with
known logprobs (test_frontend_app's byte tokenizer: one token per character), whole and streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dynamo_lite.protocol.messages import GenerateFrame, GenerateRequest, TokenLogprob
from tests.integration.test_frontend_app import (EOS, MODEL, REPLY, REPLY_IDS, TOKENIZER, PreferRouter,
                                              ScriptedEngine, chat_body, dying_worker_server, reply_offset,
                                              running_stack, sse_events, tokenizer_files)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    for name, data in tokenizer_files().items():
        (folder / name).write_bytes(data)
    return folder


# Choice i answers ANSWERS[i] (then EOS); n > 3 reuses them. Different lengths: the choices end apart.
ANSWERS = ["Hello world! STOP here.", "Hi.", "Good day to you."]


def answer_ids(index: int, answers: list[str] = ANSWERS) -> list[int]:
    return TOKENIZER.encode(answers[index % len(answers)]).ids + [EOS]


# Alternatives whose strings are whole characters.
LETTERS = TOKENIZER.encode("abcdefghijklmnopqrstuvwxyz").ids


def logprob_of(token: int, position: int, index: int, k: int) -> TokenLogprob:
    """Even positions: the token is the most likely; odd ones: ranked k + 1, after k others (then k + 1
    entries, as vLLM sends them)."""
    value = -0.25 * position - index
    if position % 2 == 0:
        others = [(LETTERS[(token + j) % 26], value - j) for j in range(1, k)]
        return TokenLogprob(token_id=token, logprob=value, rank=1, top=[(token, value), *others][:max(k, 1)])
    others = [(LETTERS[(token + j) % 26], value + k + 1 - j) for j in range(1, k + 1)]
    return TokenLogprob(token_id=token, logprob=value, rank=k + 1, top=[*others, (token, value)])


def prompt_logprob(token: int, position: int, k: int) -> TokenLogprob:
    return logprob_of(token, position, 7, k)


class ChoicesEngine(ScriptedEngine):
    """Interleaves the frames of n choices, each token a frame, with logprobs when asked."""

    answers = ANSWERS

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateFrame]:
        self.requests.append(request)
        sampling = request.sampling
        # A migrated request (n = 1) carries the start of its answer: go on from there.
        start = reply_offset(request.token_ids) if sampling.n == 1 else 0
        streams = [answer_ids(i, self.answers)[start:start + sampling.max_tokens] for i in range(sampling.n)]
        step, sent_first = 0, False
        frames = []
        while any(step < len(s) for s in streams):
            for index, tokens in enumerate(streams):
                if step >= len(tokens):
                    continue
                token = tokens[step]
                frame = GenerateFrame(token_ids=[token], index=index)
                if sampling.logprobs is not None:
                    frame.logprobs = [logprob_of(token, start + step, index, sampling.logprobs)]
                if step == len(tokens) - 1:
                    frame.finish_reason = "stop" if token == EOS else "length"
                if not sent_first:
                    sent_first = True
                    frame.prompt_tokens = len(request.token_ids)
                    if sampling.prompt_logprobs is not None:
                        frame.prompt_logprobs = [None] + [prompt_logprob(t, p, sampling.prompt_logprobs)
                                                          for p, t in enumerate(request.token_ids[1:], 1)]
                frames.append(frame)
            step += 1
        frames[-1].last = True
        for frame in frames:
            yield frame


def text_of(token: int) -> str:
    return TOKENIZER.decode([token], skip_special_tokens=False)


def expected_chat_logprobs(index: int, k: int, max_tokens: int = 100) -> list[dict]:
    out = []
    for position, token in enumerate(answer_ids(index)[:max_tokens]):
        lp = logprob_of(token, position, index, k)
        entries = [(token, lp.logprob), *((t, v) for t, v in lp.top if t != token)][:k]
        out.append({"token": text_of(token), "logprob": lp.logprob, "bytes": list(text_of(token).encode()),
                    "top_logprobs": [{"token": text_of(t), "logprob": v, "bytes": list(text_of(t).encode())}
                                     for t, v in entries]})
    return out


def completion_top(lp: TokenLogprob) -> dict:
    entries = [(lp.token_id, lp.logprob), *((t, v) for t, v in lp.top if t != lp.token_id)]
    return {text_of(t): v for t, v in entries}


async def test_chat_logprobs_and_top_logprobs_in_openai_shape(model_dir):
    async with running_stack() as stack:
        engine = ChoicesEngine(model_dir)
        await stack.add_worker(engine)
        body = chat_body(logprobs=True, top_logprobs=3)
        response = await stack.http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        sampling = engine.requests[-1].sampling
        assert sampling.logprobs == 3 and sampling.prompt_logprobs is None
        choice = response.json()["choices"][0]
        assert choice["message"]["content"] == ANSWERS[0]
        # Every counted token has its entry, the hidden EOS included (as vLLM reports it); the top 3 in
        # vLLM's order: the chosen token first, even where it is not among the 3 most likely.
        assert choice["logprobs"] == {"content": expected_chat_logprobs(0, 3)}
        # logprobs without top_logprobs: the chosen tokens only.
        response = await stack.http.post("/v1/chat/completions", json=chat_body(logprobs=True))
        content = response.json()["choices"][0]["logprobs"]["content"]
        assert engine.requests[-1].sampling.logprobs == 0
        assert [c["top_logprobs"] for c in content] == [[]] * len(answer_ids(0))
        response = await stack.http.post("/v1/chat/completions", json=chat_body())
        assert response.json()["choices"][0]["logprobs"] is None
        assert engine.requests[-1].sampling.logprobs is None


async def test_completion_logprobs_report_k_plus_one_with_offsets(model_dir):
    async with running_stack() as stack:
        await stack.add_worker(ChoicesEngine(model_dir))
        body = {"model": MODEL, "prompt": "a", "logprobs": 2}
        response = await stack.http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        logprobs = response.json()["choices"][0]["logprobs"]
        ids = answer_ids(0)
        lps = [logprob_of(t, p, 0, 2) for p, t in enumerate(ids)]
        assert logprobs["tokens"] == [text_of(t) for t in ids]
        assert logprobs["token_logprobs"] == [lp.logprob for lp in lps]
        assert logprobs["top_logprobs"] == [completion_top(lp) for lp in lps]
        assert logprobs["top_logprobs"][1].__len__() == 3  # odd positions: the chosen token and the top 2
        offsets = [sum(len(text_of(t)) for t in ids[:i]) for i in range(len(ids))]
        assert logprobs["text_offset"] == offsets


async def test_echo_puts_the_prompt_and_its_logprobs_first(model_dir):
    prompt = "Say hi"
    prompt_ids = TOKENIZER.encode(prompt).ids
    async with running_stack() as stack:
        engine = ChoicesEngine(model_dir)
        await stack.add_worker(engine)
        response = await stack.http.post("/v1/completions", json={
            "model": MODEL, "prompt": prompt, "echo": True, "max_tokens": 3})
        assert response.json()["choices"][0]["text"] == prompt + ANSWERS[0][:3]
        assert engine.requests[-1].sampling.prompt_logprobs is None  # echo alone needs no logprobs
        response = await stack.http.post("/v1/completions", json={
            "model": MODEL, "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 3})
        assert engine.requests[-1].sampling.prompt_logprobs == 1
        choice = response.json()["choices"][0]
        assert choice["text"] == prompt + ANSWERS[0][:3]
        logprobs = choice["logprobs"]
        generated = answer_ids(0)[:3]
        assert logprobs["tokens"] == [text_of(t) for t in prompt_ids + generated]
        prompt_lps = [prompt_logprob(t, p, 1) for p, t in enumerate(prompt_ids[1:], 1)]
        generated_lps = [logprob_of(t, p, 0, 1).logprob for p, t in enumerate(generated)]
        assert logprobs["token_logprobs"] == [None, *(lp.logprob for lp in prompt_lps), *generated_lps]
        assert logprobs["top_logprobs"][0] is None
        assert logprobs["top_logprobs"][1] == completion_top(prompt_lps[0])
        assert logprobs["text_offset"][:3] == [0, 1, 2]
        # vLLM's own prompt_logprobs field: token id -> {logprob, rank, decoded_token}, the top 1 ranked 1.
        raw = choice["prompt_logprobs"]
        assert raw[0] is None and len(raw) == len(prompt_ids)
        first = prompt_lps[0]
        expected = {str(first.token_id): {"logprob": first.logprob, "rank": first.rank,
                                          "decoded_token": text_of(first.token_id)}}
        for t, v in first.top:
            if t != first.token_id:
                expected[str(t)] = {"logprob": v, "rank": 1, "decoded_token": text_of(t)}
        assert raw[1] == expected


async def test_n_choices_whole_each_with_its_own_finish_and_stop_strings(model_dir):
    async with running_stack() as stack:
        engine = ChoicesEngine(model_dir)
        await stack.add_worker(engine)
        response = await stack.http.post("/v1/chat/completions", json=chat_body(n=3, stop=["STOP"]))
        assert response.status_code == 200, response.text
        body = response.json()
        assert engine.requests[-1].sampling.n == 3 and len(engine.requests) == 1  # one request, n choices
        assert [c["index"] for c in body["choices"]] == [0, 1, 2]
        texts = [c["message"]["content"] for c in body["choices"]]
        assert texts == ["Hello world! ", "Hi.", "Good day to you."]
        assert [c["finish_reason"] for c in body["choices"]] == ["stop"] * 3
        assert [c["stop_reason"] for c in body["choices"]] == ["STOP", None, None]  # the string, then EOS
        stopped_at = len(TOKENIZER.encode("Hello world! STOP").ids)  # counted up to the stop string's end
        assert body["usage"]["completion_tokens"] == stopped_at + len(answer_ids(1)) + len(answer_ids(2))
        response = await stack.http.post("/v1/completions", json={"model": MODEL, "prompt": "a", "n": 2,
                                                                  "max_tokens": 4, "logprobs": 0})
        choices = response.json()["choices"]
        assert [c["text"] for c in choices] == [ANSWERS[0][:4], ANSWERS[1][:3]]  # choice 1 ended (EOS) first
        assert [c["finish_reason"] for c in choices] == ["length", "stop"]
        assert [len(c["logprobs"]["tokens"]) for c in choices] == [4, 4]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_streamed_choices_interleave_and_equal_the_whole_answer(model_dir, path):
    chat = path == "/v1/chat/completions"
    request = chat_body(n=3, logprobs=True, top_logprobs=2) if chat else {
        "model": MODEL, "prompt": "Say hi", "n": 3, "logprobs": 2, "echo": True}
    async with running_stack() as stack:
        await stack.add_worker(ChoicesEngine(model_dir))
        whole = (await stack.http.post(path, json=request)).json()
        response = await stack.http.post(path, json={**request, "stream": True,
                                                     "stream_options": {"include_usage": True}})
        assert response.status_code == 200, response.text
        events = sse_events(response.text)
        assert events[-1] == "[DONE]"
        chunks = [e for e in events[:-1] if e["choices"]]
        order = [c["choices"][0]["index"] for c in chunks]
        assert set(order) == {0, 1, 2} and order != sorted(order)  # interleaved
        for choice in whole["choices"]:
            mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == choice["index"]]
            assert [m["finish_reason"] for m in mine if m["finish_reason"]] == [choice["finish_reason"]]
            assert mine[-1]["stop_reason"] == choice["stop_reason"]
            assert mine[-1]["finish_reason"] is not None  # nothing of a choice after its finish chunk
            logprobs = [m["logprobs"] for m in mine if m["logprobs"]]
            if chat:
                assert "".join(m["delta"].get("content", "") for m in mine) == choice["message"]["content"]
                assert [e for lp in logprobs for e in lp["content"]] == choice["logprobs"]["content"]
            else:
                assert "".join(m["text"] for m in mine) == choice["text"]
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    assert [e for lp in logprobs for e in lp[key]] == choice["logprobs"][key], key
        assert events[-2]["usage"] == whole["usage"]


async def test_n_choices_migrate_each_as_its_own_request(model_dir):
    router = PreferRouter()
    async with running_stack(router) as stack:
        server, address = await dying_worker_server(tokens_before_death=3)
        stack.servers.append(server)
        router.preferred = await stack.register(address, str(model_dir), migration_limit=3)
        engine = ChoicesEngine(model_dir)
        await stack.add_worker(engine, migration_limit=3)
        response = await stack.http.post("/v1/completions", json={"model": MODEL, "prompt": "a", "n": 2,
                                                                  "max_tokens": 40, "stream": True})
        events = sse_events(response.text)
        assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1])
        chunks = [e["choices"][0] for e in events[:-1]]
        assert [c["text"] for c in chunks[:3]] == list(REPLY[:3])  # what the dying worker sent (choice 0)
        # Choice 0 goes on from its 3 tokens, choice 1 (nothing yet) from the prompt: one request each,
        # n = 1, and the second worker's n = 1 answer is REPLY.
        for index in (0, 1):
            assert "".join(c["text"] for c in chunks if c["index"] == index) == REPLY
            assert [c["finish_reason"] for c in chunks if c["index"] == index][-1] == "stop"
        prompt = min((r.token_ids for r in engine.requests), key=len)
        moved = sorted((r.resumed_tokens, r.token_ids, r.sampling.n, r.sampling.max_tokens) for r in engine.requests)
        assert moved == [(0, prompt, 1, 40), (3, prompt + REPLY_IDS[:3], 1, 37)]
        metrics = (await stack.http.get("/metrics")).text
        assert f'dynamo_lite_frontend_migrations_total{{model="{MODEL}"}} 1.0' in metrics
        engine.requests.clear()
        # The same with n = 1 migrates (the choices' bookkeeping keeps one choice's migration working).
        router.preferred = await stack.register(address, str(model_dir), migration_limit=3)
        body = {"model": MODEL, "prompt": "a", "logprobs": 0}
        response = await stack.http.post("/v1/completions", json=body)
        choice = response.json()["choices"][0]
        assert choice["text"] == REPLY
        # The dying worker sent no logprobs with its 3 tokens; the rest come from the second worker.
        assert choice["logprobs"]["tokens"] == [text_of(t) for t in REPLY_IDS[3:]]
        assert choice["logprobs"]["token_logprobs"] == [logprob_of(t, p, 0, 0).logprob
                                                        for p, t in enumerate(REPLY_IDS) if p >= 3]
        assert len(engine.requests) == 1 and engine.requests[0].sampling.logprobs == 0


class ThinkingEngine(ChoicesEngine):
    answers = ["<think>Paris is in France.</think>Paris.", "<think>Hmm.</think>It is Paris, I think."]


@pytest.mark.parametrize("stream", [False, True])
async def test_each_choice_has_its_own_reasoning_parser(model_dir, stream):
    async with running_stack(reasoning_parser="deepseek_r1") as stack:
        await stack.add_worker(ThinkingEngine(model_dir))
        response = await stack.http.post("/v1/chat/completions", json=chat_body(n=2, stream=stream))
        assert response.status_code == 200, response.text
        expected = [("Paris is in France.", "Paris."), ("Hmm.", "It is Paris, I think.")]
        if not stream:
            messages = [c["message"] for c in response.json()["choices"]]
            assert [(m["reasoning"], m["content"]) for m in messages] == expected
            return
        parts: dict[int, dict[str, str]] = {0: {}, 1: {}}
        for chunk in sse_events(response.text)[:-1]:
            for choice in chunk["choices"]:
                for key in ("reasoning", "content"):
                    parts[choice["index"]][key] = parts[choice["index"]].get(key, "") + (
                        choice["delta"].get(key) or "")
        assert [(parts[i]["reasoning"], parts[i]["content"]) for i in (0, 1)] == expected
