"""What serve asks the launch Stack to start for each engine (no process is started)."""

from __future__ import annotations

from dynamo_lite.serve.args import parse_args
from dynamo_lite.serve.placement import Placement
from dynamo_lite.serve.start import EngineSpec, start_workers


class FakeProc:
    def __init__(self, pid: int):
        self.pid = pid


class FakeStack:
    def __init__(self):
        self.calls = []

    def start_worker(self, name, omp_bind, role, extra=(), *, env=None, cpus=None):
        self.calls.append((name, omp_bind, role, list(extra), env, cpus))
        return FakeProc(len(self.calls))


def test_cpu_engines_are_bound_and_pinned_gpu_engines_get_their_devices():
    args = parse_args(["--prefill-workers", "1", "--decode-workers", "1", "--served-model-name", "a", "b",
                       "--namespace", "ns", "--max-model-len", "2048"])
    stack = FakeStack()
    procs = start_workers(stack, args, [EngineSpec("prefill0", "prefill", Placement(cpus=(0, 1))),
                                        EngineSpec("decode0", "decode", Placement(gpus=("2", "3")))])
    assert list(procs) == ["prefill0", "decode0"]
    extra = ["--served-model-name", "a", "b", "--max-model-len", "2048", "--namespace", "ns"]
    assert stack.calls == [
        ("prefill0", "0-1", "prefill", extra, {}, (0, 1)),
        ("decode0", None, "decode", extra, {"CUDA_VISIBLE_DEVICES": "2,3"}, None)]


def test_one_served_name_is_left_to_the_stack():
    stack = FakeStack()
    start_workers(stack, parse_args(["--served-model-name", "a"]), [EngineSpec("worker0", "agg", Placement((0,)))])
    assert stack.calls[0][3] == []
