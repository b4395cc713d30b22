"""NIXL agent created the way vLLM's NixlConnector creates it, with our vLLM plugin loaded by vLLM.

An idle agent must not keep a core busy: NIXL's own default progress thread spins (nixl_progress
explains it), which on a CPU box takes the engine's compute core away.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.vllm

IDLE_AGENT = """
import json, os, time, uuid
from vllm.plugins import load_general_plugins
load_general_plugins()  # what every vLLM worker process does before it builds its KV connector
from vllm.distributed.nixl_utils import NixlWrapper, nixl_agent_config
agent = NixlWrapper(str(uuid.uuid4()), nixl_agent_config(num_threads=4, capture_telemetry=True))
start, cpu = time.monotonic(), time.process_time()
time.sleep(2.0)
print(json.dumps((time.process_time() - cpu) / (time.monotonic() - start)))
"""


def idle_cpu_fraction(delay_env: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "DYN_NIXL_PROGRESS_DELAY_US"}
    if delay_env is not None:
        env["DYN_NIXL_PROGRESS_DELAY_US"] = delay_env
    result = subprocess.run([sys.executable, "-c", IDLE_AGENT], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_idle_nixl_agent_does_not_spin_a_core_with_the_worker_setting():
    pytest.importorskip("nixl")
    from dynamo_lite.vllm.nixl_progress import NIXL_PROGRESS_DELAY_US

    # The same agent with NIXL's own busy loop, measured here, shows what the setting removes. The two
    # run side by side (one core each: each figure is its own process's CPU time over wall time), so the
    # test pays for one vLLM import, not two.
    with ThreadPoolExecutor(2) as pool:
        spinning_run = pool.submit(idle_cpu_fraction, "0")
        waiting_run = pool.submit(idle_cpu_fraction, str(NIXL_PROGRESS_DELAY_US))
        spinning, waiting = spinning_run.result(), waiting_run.result()
    print(f"\nidle NIXL agent: {spinning:.0%} of a core with NIXL's default, {waiting:.0%} with "
          f"{NIXL_PROGRESS_DELAY_US} us")
    assert waiting < 0.3, f"an idle NIXL agent still uses {waiting:.0%} of a core"
