"""`python -m dynamo_lite.serve` command lines: what goes to serve, to the frontend, to every worker."""

from __future__ import annotations

import pytest

from dynamo_lite.runtime.models import DEFAULT_SERVED_MODEL_NAME
from dynamo_lite.serve.args import parse_args


def test_model_first_then_vllm_args_go_to_every_worker(tmp_path):
    args = parse_args([str(tmp_path), "--max-model-len", "2048", "--enforce-eager", "--dtype=bfloat16"])
    assert args.model == str(tmp_path)
    assert args.served_model_names == (str(tmp_path),)  # vLLM's rule: the model as given
    assert args.worker_args == ("--max-model-len", "2048", "--enforce-eager", "--dtype=bfloat16")
    assert (args.workers, args.prefill_workers, args.decode_workers, args.engine) == (1, 0, 0, "vllm")
    assert args.frontend_args == ()  # one worker: the frontend's default router


def test_no_model_means_the_default_model_under_its_hub_name():
    args = parse_args(["--engine", "mocker"])
    assert args.served_model_name == DEFAULT_SERVED_MODEL_NAME
    assert args.model.endswith("SmolLM2-135M-Instruct")


def test_a_model_folder_from_dyn_model_path_is_served_under_its_path(monkeypatch, tmp_path):
    monkeypatch.setenv("DYN_MODEL_PATH", str(tmp_path))
    assert parse_args([]).served_model_names == (str(tmp_path),)


def test_a_worker_flag_value_is_not_taken_for_the_model(tmp_path):
    # `--max-model-len 2048` before the model: 2048 stays with its flag, --model names the model.
    args = parse_args(["--max-model-len", "2048", "--model", str(tmp_path)])
    assert args.model == str(tmp_path) and args.worker_args == ("--max-model-len", "2048")


def test_several_workers_use_the_kv_router_unless_told_otherwise():
    assert parse_args(["--workers", "2"]).frontend_args == ("--router-mode", "kv")
    random = parse_args(["--workers", "2", "--router-mode", "random"])
    assert random.frontend_args == ("--router-mode", "random")
    disagg = parse_args(["--prefill-workers", "1", "--decode-workers", "1"])
    assert disagg.disaggregated and disagg.frontend_args == ()
    two_prefill = parse_args(["--prefill-workers", "2", "--decode-workers", "1"])
    assert two_prefill.frontend_args == ("--router-mode", "kv")


def test_frontend_options_are_passed_on_only_when_given():
    args = parse_args(["--api-key", "k1", "k2", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3",
                       "--no-kv-events", "--request-timeout", "5", "--gpu-memory-utilization", "0.5"])
    assert args.frontend_args == ("--request-timeout", "5.0", "--no-kv-events", "--api-key", "k1", "k2",
                                  "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3")
    assert args.worker_args == ("--gpu-memory-utilization", "0.5")


def test_served_model_name_and_namespace_go_to_workers_port_host_stay_with_serve():
    args = parse_args(["--served-model-name", "a", "b", "--namespace", "ns1", "--port", "9000",
                       "--host", "127.0.0.1", "--enable-auto-tool-choice"])
    assert args.served_model_names == ("a", "b") and args.served_model_name == "a"
    assert (args.namespace, args.port, args.host) == ("ns1", 9000, "127.0.0.1")
    assert args.worker_args == () and args.frontend_args == ()


def test_engine_names_and_roles():
    assert parse_args(["--workers", "3"]).engine_names() == [("worker0", "agg"), ("worker1", "agg"),
                                                             ("worker2", "agg")]
    assert parse_args(["--prefill-workers", "2", "--decode-workers", "1"]).engine_names() == [
        ("prefill0", "prefill"), ("prefill1", "prefill"), ("decode0", "decode")]


def test_arguments_after_a_double_dash_go_to_the_workers_untouched():
    args = parse_args(["--workers", "2", "--", "--port", "1", "--workers", "5"])
    assert args.workers == 2 and args.worker_args == ("--port", "1", "--workers", "5")


def test_cpus_list():
    assert parse_args(["--cpus", "0-2,5"]).cpus == (0, 1, 2, 5)


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "--workers: must be at least 1"),
    (["--workers", "two"], "not a whole number"),
    (["--workers", "2", "--prefill-workers", "1", "--decode-workers", "1"], "exclude each other"),
    (["--prefill-workers", "1"], "needs both --prefill-workers and --decode-workers"),
    (["--engine", "sglang"], "invalid choice: 'sglang'"),
    (["--port", "70000"], "not a TCP port"),
    (["--cpus", "3-1"], "not a CPU list"),
    (["--tool-call-parser", "nope"], "unknown --tool-call-parser 'nope'"),
    (["--router-mode", "fastest"], "invalid choice: 'fastest'"),
    (["no-such-org/no-such-model"], "no-such-org/no-such-model"),
    (["/tmp", "--model", "/tmp"], "the model is given twice"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_ask_sends_the_first_api_key_given_or_from_the_environment(monkeypatch):
    assert parse_args(["--api-key", "k1", "k2"]).api_key == "k1"
    monkeypatch.setenv("DYN_API_KEY", "e1,e2")
    assert parse_args([]).api_key == "e1"
    assert parse_args([]).frontend_args == ()  # the frontend reads DYN_API_KEY itself


def test_plane_security_options_go_to_the_frontend_and_every_worker(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef0123")
    args = parse_args(["--engine", "mocker", "--plane-secret-file", str(secret), "--etcd-user", "root",
                       "--etcd-password-file", str(secret)])
    for argv in (args.frontend_args, args.worker_args):
        assert argv[argv.index("--plane-secret-file") + 1] == str(secret)
        assert argv[argv.index("--etcd-user") + 1] == "root"
