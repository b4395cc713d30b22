"""vLLM plugin: a migrated structured-output request resumes its grammar where the failed worker left it.

A request that migrates arrives at its new worker as one prompt: the original prompt followed by the
tokens the failed worker had generated. vLLM starts a request's grammar at its first generated token,
so on its own the new worker would begin the JSON (or tool call, regex, choice) again in the middle of
the answer, and the answer would break its schema. The frontend says how many of the prompt's last
tokens were generated (`GenerateRequest.resumed_tokens`); the worker passes that count to the engine
core in the sampling parameters' extra_args (RESUMED_TOKENS_KEY), and this plugin advances each new
grammar over those tokens as soon as it is compiled, exactly as the failed worker's grammar advanced
over them when it generated them. Tokens the grammar rejects (they cannot have come from this
grammar) fail the request as a grammar that does not compile does: with an error, not a broken answer.

vLLM loads this in each of its processes (entry point group `vllm.general_plugins`, see
pyproject.toml); what it wraps lives in the engine core process, where grammars are compiled. It
changes nothing for requests without the key. `supported()` tells the worker whether this vLLM has
the hook, so it can refuse a resume it could not honour.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

RESUMED_TOKENS_KEY = "dynamo_lite_resumed_tokens"


def _manager_class():
    try:
        from vllm.v1.structured_output import StructuredOutputManager
    except ImportError:
        return None
    return StructuredOutputManager if hasattr(StructuredOutputManager, "_create_grammar") else None


def supported() -> bool:
    """Whether this vLLM compiles grammars where the plugin can advance them."""
    return _manager_class() is not None


def resumed_tokens(request) -> list[int]:
    """The generated tokens at the end of an engine-core request's prompt (none for a fresh request)."""
    params = request.sampling_params
    count = (params.extra_args or {}).get(RESUMED_TOKENS_KEY, 0) if params is not None else 0
    if not count:
        return []
    prompt = request.prompt_token_ids or []
    if not 0 < count <= len(prompt):
        raise ValueError(f"{RESUMED_TOKENS_KEY}={count} for a prompt of {len(prompt)} tokens")
    return list(prompt[-count:])


def register() -> None:
    """Entry point: wrap the grammar compiler so that it advances a resumed request's grammar."""
    manager = _manager_class()
    if manager is None or getattr(manager._create_grammar, "_dynamo_lite_resume", False):
        return
    create_grammar = manager._create_grammar

    def create_resumed_grammar(self, request):
        grammar = create_grammar(self, request)
        tokens = resumed_tokens(request)
        if not tokens:
            return grammar
        if self.reasoner_cls is not None:
            # The grammar would wait for the end of reasoning, which may lie inside the resumed tokens.
            raise ValueError("a structured-output request cannot resume on an engine with a reasoning "
                             "parser for structured outputs")
        if not grammar.accept_tokens(request.request_id, tokens):
            raise ValueError(f"the {len(tokens)} resumed tokens of request {request.request_id} do not "
                             "satisfy its grammar")
        logger.debug("request %s: grammar resumed after %d generated tokens", request.request_id, len(tokens))
        return grammar

    create_resumed_grammar._dynamo_lite_resume = True
    manager._create_grammar = create_resumed_grammar
