"""Time from `python -m dynamo_lite.serve` to its first answer, against `vllm serve` in the same run.

Each run starts `serve --ask QUESTION --once` on a free port and reads its output: seconds until the URL
line (every engine serves), until the answer, and until it exited with everything stopped. The baseline
is vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`, what `vllm serve` runs) on the
same model and engine arguments: seconds until /health answers 200, then until the same question is
answered. The page cache is warm after the first run; `--runs` repeats each setup.

    .venv/bin/python benchmarks/bench_serve_startup.py [--runs 2] [--setups vllm-1,mocker-2,vllm-serve,...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dynamo_lite.launch.supervisor import http_ok, start_process, wait_until  # noqa: E402
from dynamo_lite.runtime.net import free_tcp_port  # noqa: E402
from tests.e2e.harness import DEFAULT_MODEL_PATH, SERVED_MODEL_NAME  # noqa: E402

QUESTION = "What is the capital of France?"
ENGINE_ARGS = ["--max-model-len", "2048"]
SETUPS = {  # name -> serve arguments
    "vllm-1": ["--workers", "1"],
    "vllm-2": ["--workers", "2"],
    "vllm-disagg": ["--prefill-workers", "1", "--decode-workers", "1"],
    "mocker-2": ["--engine", "mocker", "--workers", "2"],
}
# name -> vLLM's own server's extra arguments. Our vLLM worker runs eager on a CPU build of vLLM (no
# torch.compile at start-up); vLLM's server compiles unless told --enforce-eager: both are measured.
VLLM_SERVE = {"vllm-serve": [], "vllm-serve-eager": ["--enforce-eager"]}


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("ETCD_ENDPOINTS", "NATS_SERVER", "DYN_DISCOVERY_DIR")}
    env.update(PYTHONUNBUFFERED="1", VLLM_CPU_KVCACHE_SPACE="1")
    return env


def time_serve(args: list[str], run_dir: Path) -> dict[str, float]:
    """Seconds from spawning serve to its URL line, its answer, and its exit (status 0 required)."""
    env = {**clean_env(), "RUN_DIR": str(run_dir)}
    argv = [sys.executable, "-m", "dynamo_lite.serve", *args, "--port", str(free_tcp_port()),
            "--ask", QUESTION, "--once", *([] if "mocker" in args else ENGINE_ARGS)]
    marks: dict[str, float] = {}
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)

    def read() -> None:
        for line in proc.stdout:
            if line.startswith("Serving ") and "ready" not in marks:
                marks["ready"] = time.monotonic() - started
            elif line.startswith("A: ") and "answer" not in marks:
                marks["answer"] = time.monotonic() - started

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    status = proc.wait(900)
    marks["exit"] = time.monotonic() - started
    reader.join(10)
    if status != 0 or "answer" not in marks:
        raise SystemExit(f"serve {' '.join(args)} failed with status {status}; logs in {run_dir}")
    return marks


def time_vllm_serve(extra: list[str], run_dir: Path) -> dict[str, float]:
    """The same for vLLM's own server: /health 200, then the answer; exit = stopped after SIGTERM."""
    port = free_tcp_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(DEFAULT_MODEL_PATH),
            "--served-model-name", SERVED_MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
            *ENGINE_ARGS, *extra]
    started = time.monotonic()
    proc = start_process("vllm-serve", argv, run_dir / "vllm-serve.log", env=clean_env())
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 900, "vLLM's server", [proc])
        marks = {"ready": time.monotonic() - started}
        body = json.dumps({"model": SERVED_MODEL_NAME, "max_tokens": 48, "temperature": 0,
                           "messages": [{"role": "user", "content": QUESTION}]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as resp:
            assert json.loads(resp.read())["choices"][0]["message"]["content"]
        marks["answer"] = time.monotonic() - started
    finally:
        proc.stop(60)
    marks["exit"] = time.monotonic() - started
    return marks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--setups", default="vllm-1,vllm-2,vllm-disagg,mocker-2,vllm-serve,vllm-serve-eager",
                        help=f"comma-separated, of {', '.join([*SETUPS, *VLLM_SERVE])}")
    opts = parser.parse_args()
    names = [n.strip() for n in opts.setups.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETUPS and n not in VLLM_SERVE]
    if unknown:
        parser.error(f"unknown setup(s) {', '.join(unknown)}")
    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for run in range(opts.runs):  # interleaved: a slow moment of the machine hits every setup alike
        for name in names:
            run_dir = root / f"{name}-{run}"
            marks = time_vllm_serve(VLLM_SERVE[name], run_dir) if name in VLLM_SERVE else \
                time_serve(SETUPS[name], run_dir)
            results[name].append(marks)
            print(f"run {run + 1} {name}: ready {marks['ready']:.1f}s, answer {marks['answer']:.1f}s, "
                  f"stopped {marks['exit']:.1f}s", flush=True)
    print(f"\n{'setup':<12} {'ready s':>14} {'first answer s':>16} {'all stopped s':>14}   (median, min-max)")
    for name, runs in results.items():
        cells = []
        for key in ("ready", "answer", "exit"):
            values = [r[key] for r in runs]
            cells.append(f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})")
        print(f"{name:<12} {cells[0]:>14} {cells[1]:>16} {cells[2]:>14}")
    print(f"\nlogs: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
