"""launch/settings.py: a lone CPU worker (agg.sh) gets the cores it should have."""

from __future__ import annotations

from dynamo_lite.launch.settings import LaunchSettings, lone_worker_cpus


def test_a_lone_worker_takes_every_core_but_the_first_on_a_many_core_machine():
    assert lone_worker_cpus(list(range(16))) == "1-15"
    assert lone_worker_cpus([0, 1, 2, 3]) == "1-3"
    assert lone_worker_cpus([3, 5, 6, 7]) == "5-7"  # a restricted affinity mask: its cores, not 0..n


def test_on_a_small_machine_it_keeps_one_core_and_leaves_the_rest_to_the_frontend():
    assert lone_worker_cpus([0, 1]) == "0"
    assert lone_worker_cpus([2]) == "2"


def test_an_explicit_bind_wins():
    assert LaunchSettings.from_env({"VLLM_CPU_OMP_THREADS_BIND": "2-5"}, "python").omp_bind == "2-5"
