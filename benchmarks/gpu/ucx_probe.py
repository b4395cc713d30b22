"""Why does NIXL's UCX backend move KV between two processes on one GPU at 0.4 GB/s?

Two processes, as a prefill and a decode worker are: a target that allocates a CUDA buffer and registers
it with a NIXL agent (UCX backend), and an initiator that reads it into its own CUDA buffer, timed per
size. Run under several UCX settings (each in fresh processes, since UCX reads its environment once),
with what the machine says about CUDA IPC (a torch tensor shared across processes uses the same CUDA
IPC that UCX's cuda_ipc transport needs) and UCX's own account of the protocol it chose.

    python benchmarks/gpu/ucx_probe.py --out DIR     # DIR/ucx_probe.json, DIR/ucx-*.log
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = [1 << 20, 16 << 20, 128 << 20]
REPEATS = 5
# UCX settings to compare; {} is NIXL's default (UCX picks the transports).
VARIANTS = {
    "default": {},
    "cuda_ipc_only": {"UCX_TLS": "cuda_ipc,cuda_copy,self,sm"},
}
VARIANT_TIMEOUT = 90  # seconds; a transfer UCX cannot make hangs rather than failing
# UCX debug lines worth keeping (the whole debug log is hundreds of MB).
KEEP = ("cuda_ipc", "unreachable", "sys_dev", "topo", "ucp_get", "rndv", "| ", "error", "warn")


def _target(conn, size: int) -> None:
    import torch
    from nixl._api import nixl_agent, nixl_agent_config

    torch.cuda.set_device(0)
    buffer = torch.full((size,), 7, dtype=torch.uint8, device="cuda")
    agent = nixl_agent("target", nixl_agent_config(backends=["UCX"]))
    agent.register_memory(agent.get_reg_descs(buffer))
    conn.send((agent.get_agent_metadata(), buffer.data_ptr(), size))
    conn.recv()  # the initiator is done
    conn.close()


def _initiate(meta: bytes, address: int, size: int) -> dict:
    import torch
    from nixl._api import nixl_agent, nixl_agent_config

    torch.cuda.set_device(0)
    buffer = torch.zeros((size,), dtype=torch.uint8, device="cuda")
    agent = nixl_agent("initiator", nixl_agent_config(backends=["UCX"]))
    agent.register_memory(agent.get_reg_descs(buffer))
    remote = agent.add_remote_agent(meta)
    local_descs = agent.get_xfer_descs(buffer)
    remote_descs = agent.get_xfer_descs([(address, size, 0)], "VRAM")
    times = []
    backend = None
    for _ in range(REPEATS + 1):
        handle = agent.initialize_xfer("READ", local_descs, remote_descs, remote)
        t0 = time.perf_counter()
        state = agent.transfer(handle)
        deadline = t0 + 60
        while state == "PROC" and time.perf_counter() < deadline:
            state = agent.check_xfer_state(handle)
        elapsed = time.perf_counter() - t0
        backend = agent.query_xfer_backend(handle)
        agent.release_xfer_handle(handle)
        if state != "DONE":
            return {"error": f"transfer state {state}"}
        times.append(elapsed)
    torch.cuda.synchronize()
    correct = bool((buffer == 7).all().item())
    median = sorted(times[1:])[len(times[1:]) // 2]  # the first one sets up the connection
    return {"bytes": size, "median_s": median, "gbps": size / median / 1e9, "correct": correct,
            "backend": backend}


def _pair(size: int) -> dict:
    """One target process and the initiator in this process (spawned fresh by the caller)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    target = ctx.Process(target=_target, args=(child, size))
    target.start()
    try:
        if not parent.poll(120):
            return {"error": "the target did not start"}
        meta, address, size = parent.recv()
        return _initiate(meta, address, size)
    finally:
        parent.send("done")
        target.join(30)
        if target.is_alive():
            target.kill()


def _torch_ipc() -> dict:
    """Can a second process open this one's CUDA memory (cudaIpcOpenMemHandle, what torch uses)?"""
    code = ("import torch, torch.multiprocessing as tmp\n"
            "def child(q):\n"
            "    t = q.get(); q.put(float(t.sum().item()))\n"
            "if __name__ == '__main__':\n"
            "    ctx = tmp.get_context('spawn'); q = ctx.Queue(); p = ctx.Process(target=child, args=(q,))\n"
            "    p.start(); t = torch.ones(1024, device='cuda' if torch.cuda.is_available() else 'cpu'); q.put(t); import time; time.sleep(5)\n"
            "    print('sum', q.get(timeout=60)); p.join(30)\n")
    # A file, not `python -c`: spawned children import the parent's main module to find `child`.
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(code)
    try:
        r = subprocess.run([sys.executable, script.name], capture_output=True, text=True, timeout=180)
    finally:
        os.unlink(script.name)
    return {"rc": r.returncode, "stdout": r.stdout[-500:], "stderr": r.stderr[-1500:]}


def _facts() -> dict:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout[-3000:]
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{cmd[0]}: {e}"

    facts = {"nvidia_smi_topo": run("nvidia-smi", "topo", "-m"),
             "nvidia_smi_q": run("nvidia-smi", "-q", "-d", "COMPUTE,PERFORMANCE")[-1500:]}
    for path in ("/proc/sys/kernel/yama/ptrace_scope", "/proc/driver/nvidia/version"):
        try:
            facts[path] = Path(path).read_text()[-500:]
        except OSError as e:
            facts[path] = str(e)
    facts["dev_shm"] = run("df", "-h", "/dev/shm")
    facts["capabilities"] = run("grep", "Cap", "/proc/self/status")
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one variant, run in a fresh process
    args = parser.parse_args()
    if args.child:
        print(json.dumps([_pair(size) for size in SIZES]), flush=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"facts": _facts(), "torch_cuda_ipc": _torch_ipc(), "variants": {}}
    ipc = result["torch_cuda_ipc"]
    print("torch CUDA IPC: rc", ipc["rc"], ipc["stdout"].strip(), ipc["stderr"][-600:], flush=True)
    for name, env in VARIANTS.items():
        log = args.out / f"ucx-{name}.log"
        full_env = {**os.environ, **env, "UCX_PROTO_INFO": "y", "UCX_LOG_LEVEL": "debug"}
        t0 = time.monotonic()
        # Its own process group: on a hang the target process it spawned is stopped with it.
        child = subprocess.Popen([sys.executable, __file__, "--out", str(args.out), "--child", name],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                                 start_new_session=True)
        try:
            stdout, stderr = child.communicate(timeout=VARIANT_TIMEOUT)
            lines = [line for line in stdout.splitlines() if line.startswith("[")]
            rows = json.loads(lines[-1]) if lines else {"error": f"rc {child.returncode}", "tail": stderr[-2000:]}
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            stdout, stderr = child.communicate()
            rows = {"error": f"no transfer within {VARIANT_TIMEOUT} s"}
        output = stderr.splitlines() + stdout.splitlines()  # UCX logs to stdout
        log.write_text("\n".join([line for line in output if any(k in line.lower() for k in KEEP)][:3000]))
        protocol_lines = [line for line in log.read_text().splitlines()
                          if "ucp_get" in line or "unreachable" in line][:40] if log.exists() else []
        result["variants"][name] = {"env": env, "rows": rows, "wall_s": round(time.monotonic() - t0, 1),
                                    "ucx_protocols": protocol_lines}
        print(name, json.dumps(rows)[:600], flush=True)
    (args.out / "ucx_probe.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
