"""Cores and GPUs of serve's engines, and its progress display."""

from __future__ import annotations

import io
import stat

import pytest

from dynamo_lite.serve.placement import (
    Placement,
    PlacementError,
    cpu_list,
    parallel_size,
    parse_cpu_list,
    place_engines,
    split_cpus,
    split_gpus,
    visible_gpus,
)
from dynamo_lite.serve.progress import Progress


def test_cpu_lists_round_trip():
    assert cpu_list([0, 1, 2, 3, 6, 8, 9]) == "0-3,6,8-9"
    assert cpu_list([1]) == "1"
    assert parse_cpu_list("0-3,6,8-9") == (0, 1, 2, 3, 6, 8, 9)
    for bad in ("", "a", "3-1", "-1"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


def test_cores_are_split_evenly_and_the_rest_is_left_to_the_frontend():
    assert split_cpus((0, 1), ["w0", "w1"]) == [Placement(cpus=(0,)), Placement(cpus=(1,))]
    assert split_cpus(tuple(range(7)), ["w0", "w1", "w2"]) == [
        Placement(cpus=(0, 1)), Placement(cpus=(2, 3)), Placement(cpus=(4, 5))]
    one = split_cpus((4, 5, 6, 7), ["w0"])[0]
    assert one.omp_bind() == "4-7" and one.env() == {} and one.describe() == "CPU 4-7"


def test_too_few_cores_names_the_numbers():
    with pytest.raises(PlacementError) as e:
        split_cpus((0, 1), ["prefill0", "decode0", "decode1"])
    assert "3 engines (prefill0, decode0, decode1) need 3 CPU cores" in str(e.value)
    assert "may use 2 (0-1)" in str(e.value)


def test_gpus_per_engine_follow_tensor_and_pipeline_parallel_size():
    assert parallel_size([]) == 1
    assert parallel_size(["--tensor-parallel-size", "2", "-pp", "2"]) == 4
    assert parallel_size(["-tp=2", "--max-model-len", "8"]) == 2
    gpus = ("0", "1", "2", "3")
    assert split_gpus(gpus, ["w0", "w1"], 2) == [Placement(gpus=("0", "1")), Placement(gpus=("2", "3"))]
    assert split_gpus(gpus, ["w0"], 1)[0].env() == {"CUDA_VISIBLE_DEVICES": "0"}
    assert split_gpus(gpus, ["w0"], 1)[0].omp_bind() is None
    with pytest.raises(PlacementError) as e:
        split_gpus(("0", "1"), ["w0", "w1"], 2)
    assert "2 engines (w0, w1) x 2 GPU(s) each need 4 GPUs, but 2 are visible (0,1)" in str(e.value)
    with pytest.raises(PlacementError):
        parallel_size(["-tp", "two"])


def test_vllm_engines_take_gpus_when_there_are_any_the_mocker_never():
    assert place_engines(["w0"], engine="vllm", worker_args=(), cpus=(0, 1), gpus=("GPU-a",)) == [
        Placement(gpus=("GPU-a",))]
    assert place_engines(["w0"], engine="vllm", worker_args=(), cpus=(0, 1), gpus=()) == [
        Placement(cpus=(0, 1))]
    assert place_engines(["w0"], engine="mocker", worker_args=(), cpus=(0,), gpus=("0",)) == [
        Placement(cpus=(0,))]


def test_visible_gpus_from_cuda_visible_devices_or_nvidia_smi(tmp_path):
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 3"}) == ("2", "3")
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == ()
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-1)'\necho '  MIG 1g.18gb Device 0'\n"
                    "echo 'GPU 1: NVIDIA H200 (UUID: GPU-2)'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    assert visible_gpus({}, nvidia_smi=str(fake)) == ("0", "1")
    assert visible_gpus({}, nvidia_smi=str(tmp_path / "missing")) == ()


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_plain_progress_prints_changes_and_a_reminder_per_interval():
    out, clock = io.StringIO(), Clock()
    progress = Progress(["worker0", "worker1"], ["CPU 0", "CPU 1"], stream=out, tty=False, clock=clock,
                        interval=30)
    progress.update([])
    clock.now = 112
    progress.update(["worker0"])
    clock.now = 131
    progress.update(["worker0"])
    assert not progress.done
    clock.now = 140
    progress.update(["worker0", "worker1"])
    assert progress.done
    assert out.getvalue().splitlines() == [
        "  worker0 (CPU 0)  loading… 0s", "  worker1 (CPU 1)  loading… 0s",
        "  worker0 (CPU 0)  ready in 12s",
        "  worker1 (CPU 1)  loading… 31s",
        "  worker1 (CPU 1)  ready in 40s"]


def test_terminal_progress_redraws_its_lines_in_place():
    out, clock = io.StringIO(), Clock()
    progress = Progress(["w0", "w1"], stream=out, tty=True, clock=clock, started=95.0)
    progress.update([])
    clock.now = 105
    progress.update(["w1"])
    first, second = out.getvalue().split("\x1b[2F")
    assert first == "\x1b[2K  w0  loading… 5s\n\x1b[2K  w1  loading… 5s\n"
    assert second == "\x1b[2K  w0  loading… 10s\n\x1b[2K  w1  ready in 10s\n"
