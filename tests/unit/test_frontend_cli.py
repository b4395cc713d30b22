"""`python -m dynamo_lite.frontend` flags and their environment twins."""

from __future__ import annotations

import pytest

from dynamo_lite.frontend.__main__ import main, parse_config


def test_defaults_flags_and_env_twins(monkeypatch):
    for name in ("DYN_HTTP_HOST", "DYN_HTTP_PORT", "DYN_ROUTER_MODE", "DYN_NAMESPACE", "ETCD_ENDPOINTS",
                 "NATS_SERVER"):
        monkeypatch.delenv(name, raising=False)
    config = parse_config([])
    assert (config.http_host, config.http_port, config.router_mode, config.namespace) == (
        "0.0.0.0", 8000, "round-robin", "dynamo")

    monkeypatch.setenv("DYN_HTTP_HOST", "127.0.0.1")
    monkeypatch.setenv("DYN_HTTP_PORT", "9100")
    monkeypatch.setenv("DYN_ROUTER_MODE", "kv")
    monkeypatch.setenv("DYN_NAMESPACE", "team-a")
    monkeypatch.setenv("ETCD_ENDPOINTS", "http://10.0.0.5:2379")
    monkeypatch.setenv("NATS_SERVER", "nats://10.0.0.5:4222")
    config = parse_config([])
    assert (config.http_host, config.http_port, config.router_mode, config.namespace) == (
        "127.0.0.1", 9100, "kv", "team-a")
    assert (config.etcd_endpoints, config.nats_server) == ("http://10.0.0.5:2379", "nats://10.0.0.5:4222")
    # A flag beats its environment twin.
    assert parse_config(["--router-mode", "random", "--http-port", "8001"]).router_mode == "random"


@pytest.mark.parametrize("env, value, words", [
    ("DYN_ROUTER_MODE", "bogus", "DYN_ROUTER_MODE='bogus' is not one of round-robin, random, kv"),
    ("DYN_HTTP_PORT", "eighty", "DYN_HTTP_PORT='eighty' is not a valid int"),
])
def test_a_bad_environment_value_is_a_clear_cli_error(monkeypatch, capsys, env, value, words):
    monkeypatch.setenv(env, value)
    assert main([]) == 2
    assert words in capsys.readouterr().err


def test_a_bad_flag_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--router-mode", "bogus"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_a_taken_http_port_is_one_line_naming_the_flag_and_a_clean_exit():
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # No etcd at that address: the port is checked before anything is connected.
        result = subprocess.run([sys.executable, "-m", "dynamo_lite.frontend", "--http-host", "127.0.0.1",
                                 "--http-port", str(port), "--etcd-endpoints", "http://127.0.0.1:9"],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"127.0.0.1:{port} is already in use" in lines[0]
    assert "--http-port / DYN_HTTP_PORT" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_header_read_timeout_flag_env_twin_and_range(monkeypatch, capsys):
    monkeypatch.delenv("DYN_HEADER_READ_TIMEOUT", raising=False)
    assert parse_config([]).header_read_timeout == 20.0
    monkeypatch.setenv("DYN_HEADER_READ_TIMEOUT", "3.5")
    assert parse_config([]).header_read_timeout == 3.5
    assert parse_config(["--header-read-timeout", "0"]).header_read_timeout == 0.0  # off
    monkeypatch.setenv("DYN_HEADER_READ_TIMEOUT", "-1")
    assert main([]) == 2
    assert "DYN_HEADER_READ_TIMEOUT" in capsys.readouterr().err
