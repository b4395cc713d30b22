"""The differential pair for the API tests: this project's frontend + one vLLM worker, and vLLM's own
OpenAI server (`python -m vllm.entrypoints.openai.api_server`, what `vllm serve` runs), both on the
default model with the same engine arguments, each engine pinned to its own core.

Package-scoped: every test module under tests/e2e/api shares one pair (~60 s to start), and it is
stopped when the package's tests end, before other modules start engines of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import httpx
import pytest

from tests.e2e.conftest import Stack, _new_group, start_stack
from tests.e2e.harness import DEFAULT_MODEL_PATH, SERVED_MODEL_NAME, Proc, wait_until
from tests.services import free_tcp_port

T = TypeVar("T")

# Engine arguments both sides get, so that they run the same engine configuration. --enforce-eager is
# this project's worker's default on CPU (dynamo_lite/vllm/args.py) but not vLLM's server's: a compiled
# graph computes slightly different logits, enough to flip greedy near-ties within a few dozen tokens.
ENGINE_ARGS = ["--max-model-len", "2048", "--max-num-seqs", "16", "--enforce-eager"]
# Frontend options of this project's side (parsers the API tests exercise).
FRONTEND_ARGS: list[str] = ["--tool-call-parser", "hermes"]
# vLLM-server options that mirror FRONTEND_ARGS. vLLM's server parses forced tool calls (tool_choice
# "required" or a named function) only with a tool-call parser set; without one it answers their JSON
# as content with no tool_calls.
REFERENCE_ARGS: list[str] = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
# With its default VLLM_ENFORCE_STRICT_TOOL_CALLING=1, vLLM 0.32 forces hermes calls through an xgrammar
# structural tag (`<tool_call>...</tool_call>`) instead of the JSON schema of the tools; on this model that
# answered arguments that are not even an object. Off, it builds the same JSON-schema constraint as
# this project (and as vLLM did before), which is what the differential tests compare.
REFERENCE_ENV = {"VLLM_ENFORCE_STRICT_TOOL_CALLING": "0"}


@dataclass
class ApiPair:
    ours: Stack  # .base_url, .model
    reference_url: str  # vLLM's own server, serving the same model name
    reference: Proc

    @property
    def model(self) -> str:
        return self.ours.model

    def urls(self) -> dict[str, str]:
        """{"ours": ..., "vllm": ...}: the same request goes to both."""
        return {"ours": self.ours.base_url, "vllm": self.reference_url}

    def on_both(self, call: Callable[[str], T]) -> dict[str, T]:
        """{"ours": call(our url), "vllm": call(vLLM's url)}, the two calls made at the same time: each
        engine runs on its own core, so a differential request costs one answer's time, not two. An
        exception in either call is raised here.

        For single-choice requests only (the logprobs module, with its n > 1 requests, asks one side
        after the other): with the two servers busy at once, whether an engine takes a request's n
        children in one step or over two depends on timing, which moves their logprobs (one run here
        saw a seeded n = 3 completion's logprobs differ past the 1e-3 tolerance)."""
        with ThreadPoolExecutor(2) as pool:
            futures = {side: pool.submit(call, url) for side, url in self.urls().items()}
            return {side: future.result() for side, future in futures.items()}


def _reference_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v1/models", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def start_pair(group, name: str, engine_args: list[str], frontend_args: list[str] = (),
               reference_args: list[str] = (), reference_env: dict[str, str] | None = None) -> ApiPair:
    """vLLM's own server (core 1) and this project's frontend + one worker (core 0) in `group`, both on
    the default model with `engine_args`, once both answer."""
    if not (DEFAULT_MODEL_PATH / "config.json").exists():
        pytest.fail(f"default model missing at {DEFAULT_MODEL_PATH}: run scripts/setup.sh")
    port = free_tcp_port()
    reference = group.start(
        name, "vllm.entrypoints.openai.api_server", "--model", str(DEFAULT_MODEL_PATH),
        "--served-model-name", SERVED_MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
        *engine_args, *reference_args,
        extra_env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "1", **(reference_env or {})})
    reference_url = f"http://127.0.0.1:{port}"
    ours = start_stack(group, "dynamo_lite.vllm",
                       ["--model", str(DEFAULT_MODEL_PATH), "--served-model-name", SERVED_MODEL_NAME,
                        *engine_args],
                       model=SERVED_MODEL_NAME, frontend_args=list(frontend_args),
                       worker_env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0"},
                       startup_timeout=300)
    wait_until(lambda: _reference_ready(reference_url), 300, f"vLLM's server on {reference_url}", [reference])
    return ApiPair(ours, reference_url, reference)


@pytest.fixture(scope="package")
def api_pair(tmp_path_factory, etcd_endpoint, nats_url):
    group = _new_group(tmp_path_factory, etcd_endpoint, nats_url, "api-pair")
    try:
        yield start_pair(group, "vllm-serve", ENGINE_ARGS, FRONTEND_ARGS, REFERENCE_ARGS, REFERENCE_ENV)
    finally:
        group.stop()
