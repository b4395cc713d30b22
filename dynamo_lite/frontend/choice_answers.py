"""A generation's choices as OpenAI answers: one JSON body, or SSE chunks as the deltas come.

Each choice has its own answer shaper (tool calls, reasoning: a new one per choice from the plan's
factory), its own logprob positions (token strings need the choice's preceding tokens) and, for the
completions API, its own text offsets. Completions' echo puts the prompt text, and with logprobs the
prompt's positions (the first without a logprob), before each choice's first delta.

The plain case (one choice, no logprobs of any kind, no shaper, no echo) never comes here per delta:
app.py streams it through ChunkEncoder's pre-encoded text chunk.
"""

from __future__ import annotations

from dynamo_lite.frontend import responses
from dynamo_lite.frontend.logprobs import (CompletionOffsets, Position, SequenceLogprobs, chat_content,
                                           completion_logprobs, vllm_prompt_logprobs)
from dynamo_lite.frontend.pipeline import ChoiceDelta, Generation
from dynamo_lite.frontend.tool_calls import OutputDelta, finish_reason_with_tools


def is_plain(generation: Generation) -> bool:
    plan = generation.plan
    return (plan.sampling.n == 1 and plan.logprobs is None and plan.sampling.prompt_logprobs is None
            and plan.answer_shaper is None and plan.echo_text is None)


class _Choice:
    __slots__ = ("echoed", "index", "offsets", "parts", "positions", "sequence", "shaper")

    def __init__(self, index: int, answers: ChoiceAnswers):
        plan = answers.generation.plan
        self.index = index
        self.shaper = plan.answer_shaper() if plan.answer_shaper is not None else None
        self.sequence = SequenceLogprobs(answers.strings) if plan.logprobs is not None else None
        self.offsets = CompletionOffsets()
        self.parts: list[str] = []
        self.positions: list[Position] = []
        self.echoed = plan.echo_text is None


class ChoiceAnswers:
    """The answer of one generation being built, choice by choice."""

    def __init__(self, generation: Generation, chat: bool):
        self.generation = generation
        self.chat = chat
        plan = generation.plan
        self.strings = plan.model.tokenizer.token_strings
        self._choices = [_Choice(index, self) for index in range(plan.sampling.n)]
        self._prompt_positions: list[Position] | None = None

    # ------------------------------------------------------------------ per delta

    def _take(self, delta: ChoiceDelta) -> tuple[_Choice, str, list[Position] | None]:
        """The delta's text and resolved positions, with the echo in front on a choice's first delta."""
        choice = self._choices[delta.index]
        text = delta.text
        positions = None
        if choice.sequence is not None:
            positions = choice.sequence.add(delta.logprobs or ())
        if not choice.echoed:
            choice.echoed = True
            text = self.generation.plan.echo_text + text
            if positions is not None:
                positions = self._prompt() + positions
        return choice, text, positions

    def _prompt(self) -> list[Position]:
        if self._prompt_positions is None:
            generation = self.generation
            prompt_ids = generation.plan.prompt_ids
            prompt = generation.prompt_logprobs or [None] * len(prompt_ids)
            self._prompt_positions = SequenceLogprobs(self.strings).add(prompt, prompt_ids)
        return self._prompt_positions

    def _logprobs(self, choice: _Choice, positions: list[Position] | None) -> dict | None:
        if positions is None:
            return None
        if self.chat:
            return {"content": chat_content(positions, self.generation.plan.logprobs)}
        return completion_logprobs(positions, choice.offsets)

    def collect(self, delta: ChoiceDelta) -> None:
        """Whole answers: keep the delta."""
        choice, text, positions = self._take(delta)
        if text:
            choice.parts.append(text)
        if positions:
            choice.positions.extend(positions)

    def chunks(self, delta: ChoiceDelta, encoder: responses.ChunkEncoder) -> list[bytes]:
        """Streamed answers: the SSE chunks for the delta (its choice's finish chunk on its last one)."""
        choice, text, positions = self._take(delta)
        logprobs = self._logprobs(choice, positions) if positions else None
        out = []
        if choice.shaper is None:
            if text or logprobs:
                out.append(encoder.choice_text(choice.index, text, logprobs))
        else:
            piece = choice.shaper.feed(text) if text else None
            if piece or logprobs:
                out.append(encoder.delta(piece or OutputDelta(), choice.index, logprobs))
        if delta.finish_reason is not None:
            reason = delta.finish_reason
            if choice.shaper is not None:
                if piece := choice.shaper.finish():
                    out.append(encoder.delta(piece, choice.index))
                tool_choice = self.generation.plan.tool_choice
                reason = finish_reason_with_tools(tool_choice, choice.shaper.called_tools, reason)
            out.append(encoder.finish(reason, choice.index, delta.stop_reason))
        return out

    # ------------------------------------------------------------------ whole

    def body(self, usage: dict) -> bytes:
        generation = self.generation
        plan = generation.plan
        prompt_logprobs = None
        if generation.prompt_logprobs is not None:
            requested = plan.sampling.prompt_logprobs or 0
            prompt_logprobs = vllm_prompt_logprobs(generation.prompt_logprobs, requested, self.strings)
        choices = []
        for choice, state in zip(self._choices, generation.choices):
            if not choice.echoed:  # a choice that ended before any delta still echoes the prompt
                self.collect(ChoiceDelta(choice.index, ""))
            text = "".join(choice.parts)
            reason = state.finish_reason
            logprobs = self._logprobs(choice, choice.positions) if choice.sequence is not None else None
            if not self.chat:
                choices.append(responses.text_choice(choice.index, text, reason, logprobs, prompt_logprobs,
                                                     state.stop_reason))
                continue
            message = text
            if choice.shaper is not None:
                message = choice.shaper.parse_whole(text)
                reason = finish_reason_with_tools(plan.tool_choice, bool(message.tool_calls), reason)
            choices.append(responses.chat_choice(choice.index, message, reason, logprobs, state.stop_reason))
        model = plan.model.requested_name
        if self.chat:
            return responses.chat_completion(plan.request_id, model, choices, usage, prompt_logprobs)
        return responses.text_completion(plan.request_id, model, choices, usage)

