"""Disaggregated serving across "hosts": network namespaces joined by veth links.

    hub namespace      etcd, NATS, frontend (kv mode)  bridge br0 = 10.N.M.1/24
    prefill namespace  vLLM prefill worker              eth0 = 10.N.M.2/24  (veth to br0)
    decode namespace   vLLM decode worker               eth0 = 10.N.M.3/24  (veth to br0)

Every process is started with `ip netns exec NS python -m ...`, as an operator would on separate hosts;
the workers get only ETCD_ENDPOINTS/NATS_SERVER and must find their own address (the interface that
reaches etcd), register it, and give it to vLLM as its NIXL side channel. UCX is restricted to TCP over
eth0, so the KV blocks cross the veth links. The test talks to the frontend from inside the hub
namespace (no address outside the namespaces is configured). Needs root and `ip netns`; skipped otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.harness import DEFAULT_MODEL_PATH, REPO, SERVED_MODEL_NAME, metric_sum

pytestmark = pytest.mark.vllm

MAX_TOKENS = 24
HTTP_PORT = 8000


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=check)


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"dlprobe-{uuid.uuid4().hex[:6]}"
    result = _run("ip", "netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"`ip netns add` failed: {result.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


class Net:
    """Three namespaces on a bridge; `close()` deletes them (and with them every link)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.hub, self.prefill, self.decode = f"dlhub-{tag}", f"dlpre-{tag}", f"dldec-{tag}"
        self.subnet = f"10.{random.randint(100, 250)}.{random.randint(0, 250)}"
        self.created: list[str] = []

    def addr(self, ns: str) -> str:
        return {self.hub: f"{self.subnet}.1", self.prefill: f"{self.subnet}.2", self.decode: f"{self.subnet}.3"}[ns]

    def create(self) -> None:
        for ns in (self.hub, self.prefill, self.decode):
            _run("ip", "netns", "add", ns)
            self.created.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.hub, "addr", "add", f"{self.addr(self.hub)}/24", "dev", "br0")
        _run("ip", "-n", self.hub, "link", "set", "br0", "up")
        for index, ns in enumerate((self.prefill, self.decode)):
            port = f"port{index}"
            _run("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", self.hub)
            _run("ip", "-n", ns, "addr", "add", f"{self.addr(ns)}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", self.hub, "link", "set", port, "master", "br0")
            _run("ip", "-n", self.hub, "link", "set", port, "up")

    def close(self) -> None:
        for ns in reversed(self.created):
            _run("ip", "netns", "del", ns, check=False)


SERVICES = {"etcd", "nats"}  # NsProcs names of the control planes: stopped after what uses them


class NsProcs:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, ns: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.run_dir / f"{name}.log", "wb")
        popen = subprocess.Popen(["ip", "netns", "exec", ns, *argv], cwd=REPO, stdout=log,
                                 stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                 start_new_session=True)
        log.close()
        self.procs.append((name, popen))
        return popen

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.run_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def check_alive(self) -> None:
        for name, popen in self.procs:
            if popen.poll() is not None:
                raise AssertionError(f"{name} exited ({popen.returncode}):\n{self.log_tail(name)}")

    def stop(self) -> None:
        """SIGTERM, up to 20 s, then SIGKILL of the process group. In two waves: the workers and the
        frontend together (each vLLM engine takes seconds to stop, so one after the other they took the
        sum of those), then etcd and NATS, which the workers still need while they deregister."""
        apps = [popen for name, popen in reversed(self.procs) if name not in SERVICES]
        services = [popen for name, popen in reversed(self.procs) if name in SERVICES]
        for wave in (apps, services):
            for popen in wave:
                if popen.poll() is None:
                    popen.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 20
            for popen in wave:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(max(0.0, deadline - time.monotonic()))
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)  # its engine processes too (own session)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(10)


def in_ns(ns: str, code: str, timeout: float = 320) -> object:
    """Run Python `code` (which prints one JSON value) inside namespace `ns`; its decoded output."""
    result = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def http(ns: str, method: str, path: str, body: object | None = None, timeout: float = 300) -> object:
    code = (f"import httpx, json; r = httpx.request({method!r}, 'http://127.0.0.1:{HTTP_PORT}{path}', "
            f"json={body!r}, timeout={timeout}); "
            "print(json.dumps({'status': r.status_code, 'body': r.json() if 'json' in "
            "r.headers.get('content-type', '') else r.text}))")
    return in_ns(ns, code, timeout + 20)


def wait_for(predicate, timeout: float, what: str, procs: NsProcs, interval: float = 2.0):
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        procs.check_alive()
        try:
            value = predicate()
            if value:
                return value
        except (AssertionError, subprocess.TimeoutExpired, KeyError, ValueError) as e:
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last})")


def metric(ns: str, name: str, **labels) -> float:
    return metric_sum(http(ns, "GET", "/metrics", timeout=10)["body"], name, **labels)


@pytest.fixture(scope="module")
def netns_stack(tmp_path_factory):
    reason = _netns_unavailable()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    if not (DEFAULT_MODEL_PATH / "config.json").exists():
        pytest.fail(f"default model missing at {DEFAULT_MODEL_PATH}: run scripts/setup.sh")
    run_dir = tmp_path_factory.mktemp("netns")
    net = Net()
    procs = NsProcs(run_dir)
    try:
        net.create()
        hub = net.addr(net.hub)
        procs.start("etcd", net.hub, ["etcd", "--name", "hub", "--data-dir", str(run_dir / "etcd"),
                                      "--listen-client-urls", f"http://{hub}:2379",
                                      "--advertise-client-urls", f"http://{hub}:2379",
                                      "--listen-peer-urls", "http://127.0.0.1:2380",
                                      "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                                      "--initial-cluster", "hub=http://127.0.0.1:2380", "--log-level", "warn"])
        procs.start("nats", net.hub, ["nats-server", "-a", hub, "-p", "4222"])
        env = {"ETCD_ENDPOINTS": f"http://{hub}:2379", "NATS_SERVER": f"nats://{hub}:4222"}
        procs.start("frontend", net.hub, [sys.executable, "-m", "dynamo_lite.frontend", "--http-host", "0.0.0.0",
                                          "--http-port", str(HTTP_PORT), "--router-mode", "kv"], env)
        wait_for(lambda: http(net.hub, "GET", "/live", timeout=5)["status"] == 200, 60, "the frontend", procs)
        common = [sys.executable, "-m", "dynamo_lite.vllm", "--model", str(DEFAULT_MODEL_PATH),
                  "--served-model-name", SERVED_MODEL_NAME, "--max-model-len", "2048", "--max-num-seqs", "8",
                  "--connector", "nixl"]
        # KV bytes go over the veth links: UCX may use TCP on eth0 only (no shared memory shortcut).
        ucx = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "eth0", "VLLM_CPU_KVCACHE_SPACE": "1"}
        procs.start("prefill", net.prefill, [*common, "--is-prefill-worker"],
                    {**env, **ucx, "VLLM_CPU_OMP_THREADS_BIND": "0"})

        def roles() -> set[str]:
            health = http(net.hub, "GET", "/health", timeout=5)
            return {i["role"] for i in health["body"].get("instances", [])} if health["status"] == 200 else set()

        # Both engines start together, each on its own core (the worker restores its engine's affinity
        # after NIXL's init moved it: vllm/cpu_pinning.py).
        procs.start("decode", net.decode, common, {**env, **ucx, "VLLM_CPU_OMP_THREADS_BIND": "1"})
        wait_for(lambda: {"prefill", "decode"} <= roles(), 300, "the prefill and the decode worker", procs)
        yield net, procs
    finally:
        procs.stop()
        net.close()


def test_kv_crosses_namespaces_and_output_matches(netns_stack):
    transformers = pytest.importorskip("transformers")
    net, procs = netns_stack
    instances = http(net.hub, "GET", "/health", timeout=5)["body"]["instances"]
    by_role = {i["role"]: i for i in instances}
    # Each worker registered the address of its own namespace (found from the route to etcd).
    assert by_role["prefill"]["host"] == net.addr(net.prefill)
    assert by_role["decode"]["host"] == net.addr(net.decode)
    assert by_role["prefill"]["address"].startswith(net.addr(net.prefill) + ":")

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(DEFAULT_MODEL_PATH))
    text = " ".join(f"Note {i}: the harbour town keeps its boats painted blue and its nets drying on the pier."
                    for i in range(20)) + " In one sentence, what colour are the boats?"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    prompt_ids = tokenizer.encode(rendered, add_special_tokens=False)
    assert len(prompt_ids) > 400
    # Reference first, computed by one engine alone: the prefill worker, asked on its request plane.
    reference = in_ns(net.hub, f"""
import asyncio, json
from dynamo_lite.protocol.messages import GenerateRequest, SamplingOptions
from dynamo_lite.transport.client import RequestClient
async def main():
    client = RequestClient()
    tokens = []
    try:
        request = GenerateRequest(request_id="reference", token_ids={prompt_ids!r},
                                  sampling=SamplingOptions(max_tokens={MAX_TOKENS}, temperature=0.0,
                                                           stop_token_ids=[{tokenizer.eos_token_id}]))
        async with asyncio.timeout(300):
            async for frame in client.stream({by_role["prefill"]["address"]!r}, request):
                tokens += frame.token_ids
    finally:
        await client.close()
    print(json.dumps(tokens))
asyncio.run(main())
""")
    reference = [t for t in reference if t != tokenizer.eos_token_id]
    answer = http(net.hub, "POST", "/v1/completions", {"model": SERVED_MODEL_NAME, "prompt": prompt_ids,
                                                        "max_tokens": MAX_TOKENS, "temperature": 0})
    assert answer["status"] == 200, answer
    assert answer["body"]["choices"][0]["text"] == tokenizer.decode(reference, skip_special_tokens=True)
    assert metric(net.hub, "dynamo_lite_frontend_disagg_requests_total", reason="disaggregated") == 1
    moved = metric(net.hub, "dynamo_lite_frontend_kv_transfer_bytes_sum")
    assert moved > 0, "the decode worker's vLLM measured no NIXL transfer"
    print(f"\nKV moved across namespaces: {moved / 1e6:.1f} MB in "
          f"{metric(net.hub, 'dynamo_lite_frontend_kv_transfer_seconds_sum') * 1e3:.1f} ms")
    stats = in_ns(net.hub, f"""
import asyncio, json
from dynamo_lite.protocol.messages import WorkerStatsRequest
from dynamo_lite.transport.client import RequestClient
async def main():
    client = RequestClient()
    try:
        stats = await client.call({by_role["prefill"]["address"]!r}, WorkerStatsRequest(), timeout=10)
    finally:
        await client.close()
    print(json.dumps(stats.completed_requests))
asyncio.run(main())
""")
    assert stats == 2  # the reference and the prefill of the disaggregated request
