"""The mocker's n > 1 choices and simulated logprobs, layered on its one-stream generate().

Like vLLM's parallel sampling, choice i is its own request (id "i_<id>", seed + i); their frames
interleave with `index`, each ends with its own finish_reason, and only the stream's final frame is last.
Logprobs are plausible and deterministic: drawn from a Random seeded with the token, its position and
the choice, the sampled token placed at its rank among decreasing alternatives."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable

import msgspec

from dynamo_lite.protocol.messages import GenerateFrame, GenerateRequest, TokenLogprob

_DONE = object()


def simulated_logprob(token_id: int, position: int, salt: int, top: int, vocab_size: int) -> TokenLogprob:
    rng = random.Random(hash((token_id, position, salt)))
    rank = 1 if rng.random() < 0.7 else rng.randint(2, max(2, top + 1))
    values = sorted((-(rng.random() * 0.5 + i * rng.uniform(0.3, 1.5)) for i in range(max(top, rank))),
                    reverse=True)
    logprob = values[rank - 1]
    others = iter([t for t in rng.sample(range(vocab_size), min(vocab_size, top + 1)) if t != token_id])
    alternatives = [(token_id if i == rank - 1 else next(others), value)
                    for i, value in enumerate(values[:top])]
    if rank > top:  # like vLLM: the sampled token is always among the entries (then k + 1 of them)
        alternatives.append((token_id, logprob))
    return TokenLogprob(token_id=token_id, logprob=logprob, rank=rank, top=alternatives)


def with_logprobs(request: GenerateRequest, frames: AsyncIterator[GenerateFrame], salt: int,
                  vocab_size: int) -> AsyncIterator[GenerateFrame]:
    sampling = request.sampling

    async def decorate() -> AsyncIterator[GenerateFrame]:
        position = 0
        first = True
        async with contextlib.aclosing(frames) as inner:  # closing us closes (aborts) the request at once
            async for frame in inner:
                yield decorated(frame, position, first)
                position += len(frame.token_ids)
                first = False

    def decorated(frame: GenerateFrame, position: int, first: bool) -> GenerateFrame:
        if sampling.logprobs is not None:
            frame.logprobs = [simulated_logprob(t, position + i, salt, sampling.logprobs, vocab_size)
                              for i, t in enumerate(frame.token_ids)]
        if first and sampling.prompt_logprobs is not None:
            prompt = request.token_ids
            frame.prompt_logprobs = [None] + [
                simulated_logprob(t, -1 - i, salt, sampling.prompt_logprobs, vocab_size)
                for i, t in enumerate(prompt[1:], start=1)]
        return frame
    return decorate()


async def generate_choices(request: GenerateRequest, one: Callable[[GenerateRequest], AsyncIterator],
                           vocab_size: int) -> AsyncIterator[GenerateFrame]:
    """Frames of request.sampling.n choices, each served by `one` (the single-stream generate)."""
    n = request.sampling.n
    if n <= 1:
        async with contextlib.aclosing(with_logprobs(request, one(request), 0, vocab_size)) as frames:
            async for frame in frames:
                yield frame
        return
    seed = request.sampling.seed
    queue: asyncio.Queue = asyncio.Queue()

    async def run(index: int) -> None:
        sampling = msgspec.structs.replace(request.sampling, n=1,
                                           seed=None if seed is None else seed + index)
        child = msgspec.structs.replace(request, request_id=f"{index}_{request.request_id}",
                                        sampling=sampling)
        try:
            async with contextlib.aclosing(with_logprobs(child, one(child), index, vocab_size)) as frames:
                async for frame in frames:
                    frame.index = index
                    await queue.put(frame)
        except BaseException as e:
            await queue.put(e)
            raise
        finally:
            await queue.put(_DONE)

    tasks = [asyncio.ensure_future(run(i)) for i in range(n)]
    try:
        running, first, pending = n, True, None
        while running:
            item = await queue.get()
            if item is _DONE:
                running -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            if not first:
                item.prompt_tokens = None
                item.cached_tokens = None
                item.prompt_logprobs = None
            first = False
            item.last = False
            if pending is not None:
                yield pending
            pending = item  # held back: the final one gets last=True
        if pending is not None:
            pending.last = True
            yield pending
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)
