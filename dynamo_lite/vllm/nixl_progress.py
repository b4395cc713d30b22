"""vLLM plugin: let NIXL's progress thread wait instead of spinning.

NIXL 1.5.1's Python agent hard-codes `pthrDelay = 0` for its progress thread, so the thread polls UCX
in a busy loop: a whole core per vLLM worker, idle or not (measured here: 100% of a core with no
transfer in flight; 3% with a 100 us delay). On a GPU server that is a spare host core; on a CPU box
it is the core the engine computes on, and on a 2-core box it starves the other engine as well.
With a delay the thread still waits on UCX's event file descriptors, with the delay as the poll
timeout, so a transfer wakes it at once.

vLLM loads this in each of its processes (entry point group `vllm.general_plugins`, see
pyproject.toml), before the NixlConnector creates its agent. It acts only where
DYN_NIXL_PROGRESS_DELAY_US is set, which `python -m dynamo_lite.vllm` does for its own engine
(`NIXL_PROGRESS_DELAY_US` below unless the user set it), so other vLLM users of the same environment
are unaffected. Set it to 0 to keep NIXL's busy loop.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

ENV = "DYN_NIXL_PROGRESS_DELAY_US"
NIXL_PROGRESS_DELAY_US = 100


def register() -> None:
    """Entry point: wrap NIXL's agent constructor so it gets the configured progress delay."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return
    try:
        delay_us = int(value)
    except ValueError:
        logger.warning("%s=%r is not an integer number of microseconds: NIXL left as it is", ENV, value)
        return
    if delay_us <= 0:
        return
    # vLLM sets this before it first imports nixl (a UCX leak workaround); importing nixl here comes
    # first, so keep vLLM's default.
    os.environ.setdefault("UCX_RCACHE_MAX_UNRELEASED", "1024")
    try:
        from nixl import _api
    except ImportError:
        return  # no NIXL here: nothing to tune
    bindings = _api.nixlBind
    create_agent = bindings.nixlAgent
    if getattr(create_agent, "_dynamo_lite_delay_us", None) is not None:
        return  # already wrapped in this process

    def agent_with_delay(name, config):
        config.pthrDelay = delay_us
        return create_agent(name, config)

    agent_with_delay._dynamo_lite_delay_us = delay_us
    bindings.nixlAgent = agent_with_delay
    logger.debug("NIXL progress thread delay set to %d us", delay_us)
