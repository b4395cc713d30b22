"""The frontend's operations flags (--api-key, CORS), list-valued options in general, and the names a
worker serves a model under (--served-model-name aliases)."""

from __future__ import annotations

import pytest

from dynamo_lite.discovery.memory import MemoryDiscovery
from dynamo_lite.discovery.watcher import InstanceWatcher
from dynamo_lite.frontend.__main__ import main, parse_config
from dynamo_lite.protocol import keys
from dynamo_lite.protocol.messages import InstanceRecord, ModelCard, json_encoder

OPS_ENV = ("DYN_API_KEY", "DYN_ALLOWED_ORIGINS", "DYN_ALLOWED_METHODS", "DYN_ALLOWED_HEADERS",
           "DYN_ALLOW_CREDENTIALS")


@pytest.fixture(autouse=True)
def no_ops_environment(monkeypatch):
    for name in OPS_ENV:
        monkeypatch.delenv(name, raising=False)


def test_defaults_as_vllm_serve_has_them():
    config = parse_config([])
    assert config.api_key == () and config.allowed_origins == ()
    assert config.allowed_methods == config.allowed_headers == ("*",) and not config.allow_credentials


def test_one_or_more_api_keys_from_the_flag_or_the_environment(monkeypatch):
    assert parse_config(["--api-key", "k1"]).api_key == ("k1",)
    assert parse_config(["--api-key", "k1", "k2"]).api_key == ("k1", "k2")
    monkeypatch.setenv("DYN_API_KEY", "e1,e2")
    assert parse_config([]).api_key == ("e1", "e2")
    assert parse_config(["--api-key", "k1"]).api_key == ("k1",)  # the flag beats its twin
    monkeypatch.setenv("DYN_API_KEY", "")
    assert parse_config([]).api_key == ()


def test_cors_lists_take_vllm_json_or_plain_values(monkeypatch):
    # vLLM's own spelling: one JSON list per flag.
    config = parse_config(["--allowed-origins", '["https://a.example", "https://b.example"]',
                           "--allowed-methods", '["GET", "POST"]', "--allow-credentials"])
    assert config.allowed_origins == ("https://a.example", "https://b.example")
    assert config.allowed_methods == ("GET", "POST") and config.allow_credentials
    assert parse_config(["--allowed-headers", "Authorization", "Content-Type"]).allowed_headers == (
        "Authorization", "Content-Type")
    monkeypatch.setenv("DYN_ALLOWED_ORIGINS", '["*"]')
    assert parse_config([]).allowed_origins == ("*",)


def test_a_list_that_is_not_json_is_a_clear_error(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        parse_config(["--allowed-origins", '["https://a.example"'])
    assert "not a JSON list of strings" in capsys.readouterr().err
    monkeypatch.setenv("DYN_ALLOWED_ORIGINS", "[1, 2]")
    assert main([]) == 2
    assert "DYN_ALLOWED_ORIGINS" in capsys.readouterr().err


def test_api_keys_are_not_printed(monkeypatch, capsys):
    monkeypatch.setenv("DYN_API_KEY", "sk-secret-value")
    config = parse_config([])
    assert "sk-secret-value" not in repr(config)
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    out = capsys.readouterr().out
    assert "--api-key" in out and "sk-secret-value" not in out


# --------------------------------------------------------------------------- aliases in discovery


async def _register(discovery, model: str, aliases: list[str]) -> int:
    lease = await discovery.grant_lease(10)
    record = InstanceRecord(instance_id=lease.id, component=keys.COMPONENT_BACKEND, address="127.0.0.1:1",
                            model=model, host="127.0.0.1", pid=1)
    card = ModelCard(name=model, path="/m", context_length=64, kv_block_size=16, aliases=aliases)
    await discovery.put(keys.instance_key("ns", keys.COMPONENT_BACKEND, lease.id), json_encoder.encode(record),
                        lease)
    await discovery.put(keys.model_card_key("ns", model, lease.id), json_encoder.encode(card), lease)
    return lease.id


async def test_watcher_lists_and_resolves_aliases():
    discovery = MemoryDiscovery()
    first = await _register(discovery, "org/model", ["model", "chat"])
    await _register(discovery, "other", [])
    watcher = InstanceWatcher(discovery, "ns", failed_cooldown=60)
    await watcher.start()
    try:
        assert watcher.models() == ["chat", "model", "org/model", "other"]
        assert [watcher.resolve(n) for n in ("org/model", "model", "chat", "other", "nope")] == [
            "org/model", "org/model", "org/model", "other", None]
        # A failed worker's aliases leave the list with it.
        watcher.mark_failed(first)
        assert watcher.models() == ["other"]
    finally:
        await watcher.close()
        await discovery.close()


def test_a_card_without_aliases_decodes_as_before():
    from dynamo_lite.protocol.messages import card_json_decoder

    old = b'{"name":"m","path":"/m","context_length":64,"kv_block_size":16}'
    assert card_json_decoder.decode(old).aliases == []


# --------------------------------------------------------------------------- the vLLM worker's names


def test_vllm_served_model_names():
    from dynamo_lite.vllm.args import parse_args
    from dynamo_lite.vllm.engine import served_names

    engine_args, _ = parse_args(["--model", "/models/x", "--served-model-name", "org/x", "x", "org/x"])
    assert served_names(engine_args.served_model_name, engine_args.model) == ("org/x", "x")
    engine_args, _ = parse_args(["--model", "/models/x"])
    assert served_names(engine_args.served_model_name, engine_args.model) == ("/models/x",)
    assert served_names("one", "/models/x") == ("one",)
