"""Model presets (dynamo_lite/presets.toml): every preset is valid for the frontend, for vLLM's own parser
and for the model's shape; `--preset` fills in only what the command line leaves out."""

from __future__ import annotations

import json

import pytest

from dynamo_lite import presets
from dynamo_lite.frontend.chat_output import REASONING_PARSERS, TOOL_PARSERS
from dynamo_lite.protocol.errors import ConfigError

PRESETS = presets.load_presets()
SEED_MODELS = ["openai/gpt-oss-120b", "openai/gpt-oss-20b", "Qwen/Qwen2.5-7B-Instruct",
               "Qwen/Qwen2.5-14B-Instruct",
               "Qwen/Qwen2.5-32B-Instruct", "Qwen/Qwen2.5-72B-Instruct", "mistralai/Mistral-7B-Instruct-v0.3",
               "mistralai/Mistral-Nemo-Instruct-2407", "mistralai/Mixtral-8x7B-Instruct-v0.1",
               "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-70B-Instruct",
               "meta-llama/Llama-3.3-70B-Instruct", "microsoft/phi-4", "google/gemma-2-27b-it",
               "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "deepseek-ai/DeepSeek-R1-Distill-Llama-70B",
               "HuggingFaceTB/SmolLM2-135M-Instruct"]


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    """$DYN_MODELS_DIR with a folder (config.json only) for every preset's model."""
    for preset in PRESETS.values():
        folder = tmp_path / preset.model.rsplit("/", 1)[-1]
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    monkeypatch.setenv(presets.MODELS_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(presets.PRESET_ENV, raising=False)
    return tmp_path


def test_the_seeds_models_all_have_a_preset():
    assert set(SEED_MODELS) <= {p.model for p in PRESETS.values()}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_is_sane_for_its_model_and_the_frontend(name):
    from dynamo_lite.frontend.__main__ import parse_config

    p = PRESETS[name]
    assert p.tool_call_parser in ("", *TOOL_PARSERS) and p.reasoning_parser in ("", *REASONING_PARSERS)
    assert p.tensor_parallel_size in (1, 2, 4, 8)
    # vLLM splits attention heads evenly over TP ranks; KV heads split, or are replicated when fewer.
    assert p.attention_heads % p.tensor_parallel_size == 0
    assert p.kv_heads % p.tensor_parallel_size == 0 or p.tensor_parallel_size % p.kv_heads == 0
    assert p.max_model_len and p.max_model_len >= 2048 and p.weights_gb > 0 and p.description
    assert p.gpu_memory_utilization is None or 0.5 <= p.gpu_memory_utilization <= 0.95
    config = parse_config(["--preset", name])  # the frontend's own checks: parser names, combinations, ranges
    assert (config.tool_call_parser, config.reasoning_parser) == (p.tool_call_parser, p.reasoning_parser)
    if p.disagg_min_prefill_tokens is not None:
        assert config.disagg_min_prefill_tokens == p.disagg_min_prefill_tokens


def test_every_presets_flags_parse_with_vllms_own_parser(tmp_path):
    from dynamo_lite.vllm.args import build_parser

    parser = build_parser()
    for p in PRESETS.values():
        args = parser.parse_args(["--model", str(tmp_path), *(a for f in p.vllm_flags() for a in f)])
        assert args.tensor_parallel_size == p.tensor_parallel_size, p.name
        assert args.max_model_len == p.max_model_len, p.name
        if p.gpu_memory_utilization is not None:
            assert args.gpu_memory_utilization == p.gpu_memory_utilization, p.name
        assert args.enable_expert_parallel == ("--enable-expert-parallel" in p.vllm_args), p.name


def test_the_vllm_worker_takes_the_preset_and_explicit_flags_win(models_dir):
    from dynamo_lite.vllm.args import parse_args

    engine_args, _ = parse_args(["--preset", "qwen2.5-72b", "-tp", "4", "--max_model_len=4096"])
    assert engine_args.model == str(models_dir / "Qwen2.5-72B-Instruct")
    assert engine_args.served_model_name == ["Qwen/Qwen2.5-72B-Instruct"]
    assert (engine_args.tensor_parallel_size, engine_args.max_model_len) == (4, 4096)
    assert engine_args.gpu_memory_utilization == 0.90


def test_a_missing_model_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv(presets.MODELS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match=r"no local copy of openai/gpt-oss-20b .*huggingface-cli download"):
        presets.apply_worker_preset(["--preset", "gpt-oss-20b"], dict(presets.os.environ))
    # An explicit --model needs no local copy under the models folder.
    argv = presets.apply_worker_preset(["--preset=gpt-oss-20b", "--model", "/data/x"], {})
    assert argv[:2] == ["--served-model-name", "openai/gpt-oss-20b"] and argv[-2:] == ["--model", "/data/x"]


def test_the_hugging_face_cache_is_found(tmp_path):
    snapshot = tmp_path / "hub" / "models--microsoft--phi-4" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--microsoft--phi-4" / "refs").mkdir()
    (tmp_path / "hub" / "models--microsoft--phi-4" / "refs" / "main").write_text("abc123\n")
    env = {presets.MODELS_DIR_ENV: str(tmp_path / "none"), "HF_HUB_CACHE": str(tmp_path / "hub")}
    assert presets.local_model_path(PRESETS["phi-4"], env) == str(snapshot)


def test_serve_splits_the_preset_between_frontend_and_workers(models_dir):
    from dynamo_lite.serve.args import parse_args

    args = parse_args(["--preset", "qwen2.5-7b", "--tool-call-parser", "llama3_json", "--",
                       "--gpu-memory-utilization", "0.5"])
    assert args.model == str(models_dir / "Qwen2.5-7B-Instruct")
    assert args.served_model_names == ("Qwen/Qwen2.5-7B-Instruct",)
    assert "--tool-call-parser" in args.frontend_args
    assert args.frontend_args[args.frontend_args.index("--tool-call-parser") + 1] == "llama3_json"
    assert args.frontend_args[args.frontend_args.index("--disagg-min-prefill-tokens") + 1] == "256"
    assert args.worker_args == ("--tensor-parallel-size", "1", "--max-model-len", "32768",
                                "--gpu-memory-utilization", "0.5")
    mocker = parse_args(["--preset", "smollm2-135m", "--engine", "mocker"])
    assert mocker.worker_args == ("--context-length", "2048")


def test_the_mocker_takes_the_preset(models_dir):
    from dynamo_lite.mocker.__main__ import parse_config

    config = parse_config(["--preset", "gpt-oss-120b"])
    assert config.model_path == str(models_dir / "gpt-oss-120b")
    assert (config.served_model_name, config.context_length) == ("openai/gpt-oss-120b", 32768)


def test_unknown_preset_and_unknown_keys_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="no such preset; choose one of .*gpt-oss-120b"):
        presets.get_preset("gpt-5")
    bad = tmp_path / "p.toml"
    bad.write_text('[x]\nmodel = "a/b"\ntensor_paralel_size = 2\n')
    with pytest.raises(ConfigError, match="unknown keys"):
        presets.load_presets(bad)
