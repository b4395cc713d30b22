"""Model presets (`--preset NAME`): the flags a model wants, from dynamo_lite/presets.toml.

A preset fills in the flags the command line does not give, so an explicit flag always wins: it is
applied to the argument list before argparse runs (`fill_in`), the same way on the vLLM worker, the
mocker, the frontend and `serve`. Pure: no vLLM import, so the frontend may use it.

The preset names the model by its hub id; the weights must already be on this host (nothing downloads
here): `local_model_path` looks in $DYN_MODELS_DIR/<name> (default ~/.cache/dynamo_lite/models, where the
default model lives), then in the Hugging Face cache.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from dynamo_lite.protocol.errors import ConfigError

PRESETS_FILE = Path(__file__).with_name("presets.toml")
PRESET_ENV = "DYN_PRESET"
MODELS_DIR_ENV = "DYN_MODELS_DIR"
DEFAULT_MODELS_DIR = Path.home() / ".cache" / "dynamo_lite" / "models"
PRESET_HELP = ("Model preset from dynamo_lite/presets.toml (docs/presets.md): fills in the model, "
               "tensor parallel size, context, memory fraction, parsers and disaggregation thresholds that "
               "the command line does not give (env DYN_PRESET).")
# vLLM's short spellings of flags a preset sets: a user's `-tp 4` must win over the preset's TP too.
_SHORT_FLAGS = {"-tp": "--tensor-parallel-size", "-pp": "--pipeline-parallel-size",
                "-dp": "--data-parallel-size"}


@dataclass(frozen=True)
class Preset:
    """One [table] of presets.toml; see the file's header for what each field becomes."""

    name: str
    model: str
    description: str = ""
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    vllm_args: tuple[str, ...] = ()
    tool_call_parser: str = ""
    reasoning_parser: str = ""
    disagg_min_prefill_tokens: int | None = None
    max_prefill_queue: int | None = None
    attention_heads: int = 0
    kv_heads: int = 0
    weights_gb: float = 0.0
    extra: dict = field(default_factory=dict, compare=False)  # unknown keys: load_presets refuses them

    def vllm_flags(self) -> list[list[str]]:
        """vLLM engine flags, each as [flag, *values] (the model is local_model_path's business)."""
        out = [["--tensor-parallel-size", str(self.tensor_parallel_size)]]
        if self.max_model_len:
            out.append(["--max-model-len", str(self.max_model_len)])
        if self.gpu_memory_utilization is not None:
            out.append(["--gpu-memory-utilization", str(self.gpu_memory_utilization)])
        return out + split_flags(self.vllm_args)

    def mocker_flags(self) -> list[list[str]]:
        return [["--context-length", str(self.max_model_len)]] if self.max_model_len else []

    def frontend_flags(self) -> list[list[str]]:
        out = []
        if self.tool_call_parser:
            out.append(["--tool-call-parser", self.tool_call_parser])
        if self.reasoning_parser:
            out.append(["--reasoning-parser", self.reasoning_parser])
        if self.disagg_min_prefill_tokens is not None:
            out.append(["--disagg-min-prefill-tokens", str(self.disagg_min_prefill_tokens)])
        if self.max_prefill_queue is not None:
            out.append(["--max-prefill-queue", str(self.max_prefill_queue)])
        return out


def load_presets(path: str | os.PathLike = PRESETS_FILE) -> dict[str, Preset]:
    """Every preset in `path`; ConfigError for a malformed file or an unknown key (a typo would otherwise
    be silently ignored)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read the presets file {path}: {e}", param="--preset") from e
    known = {f.name for f in fields(Preset)} - {"name", "extra"}
    presets = {}
    for name, table in data.items():
        unknown = set(table) - known
        if unknown or "model" not in table:
            what = f"unknown keys {sorted(unknown)}" if unknown else "no 'model'"
            raise ConfigError(f"presets file {path}: [{name}] has {what}", param="--preset")
        values = dict(table)
        values["vllm_args"] = tuple(values.get("vllm_args", ()))
        presets[name] = Preset(name=name, **values)
    return presets


def get_preset(name: str, path: str | os.PathLike = PRESETS_FILE) -> Preset:
    presets = load_presets(path)
    if name not in presets:
        raise ConfigError(f"--preset {name}: no such preset; choose one of {', '.join(presets)}",
                          param="--preset")
    return presets[name]


def pop_preset(argv: Sequence[str], env: Mapping[str, str]) -> tuple[str | None, list[str]]:
    """(--preset value or $DYN_PRESET or None, argv without --preset)."""
    name, rest, args = env.get(PRESET_ENV) or None, [], list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":  # what follows is someone else's
            rest += args[i:]
            break
        if arg == "--preset":
            if i + 1 >= len(args):
                raise ConfigError("--preset needs a NAME", param="--preset")
            name, i = args[i + 1], i + 2
            continue
        if arg.startswith("--preset="):
            name = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return name, rest


def split_flags(args: Sequence[str]) -> list[list[str]]:
    """["--a", "1", "--b", "--c", "x", "y"] -> [["--a", "1"], ["--b"], ["--c", "x", "y"]]."""
    out: list[list[str]] = []
    for arg in args:
        if arg.startswith("-") and not _is_number(arg) or not out:
            out.append([arg])
        else:
            out[-1].append(arg)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _flag_key(arg: str) -> str:
    """The flag an argument sets, spelled one way: '--max_model_len=4' -> 'max-model-len', '--no-x' -> 'x'."""
    name = _SHORT_FLAGS.get(arg, arg).split("=", 1)[0].lstrip("-").replace("_", "-")
    return name.removeprefix("no-")


def given_flags(argv: Sequence[str]) -> set[str]:
    return {_flag_key(a) for a in argv if a.startswith("-") and not _is_number(a) and a != "--"}


def fill_in(argv: Sequence[str], flags: Sequence[Sequence[str]]) -> list[str]:
    """`flags` the command line does not set already, then the command line (so that its own win)."""
    given = given_flags(argv)
    added = [arg for flag in flags if _flag_key(flag[0]) not in given for arg in flag]
    return [*added, *argv]


def local_model_path(preset: Preset, env: Mapping[str, str]) -> str:
    """The folder holding `preset.model` on this host; ConfigError saying where to put it if none does."""
    leaf = preset.model.rsplit("/", 1)[-1]
    models_dir = Path(env.get(MODELS_DIR_ENV) or DEFAULT_MODELS_DIR).expanduser()
    candidates = [models_dir / leaf, models_dir / preset.model]
    hf_home = Path(env.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    hub = Path(env.get("HF_HUB_CACHE") or hf_home / "hub")
    snapshots = hub.expanduser() / f"models--{preset.model.replace('/', '--')}" / "snapshots"
    ref = snapshots.parent / "refs" / "main"
    if ref.is_file():
        candidates.append(snapshots / ref.read_text().strip())
    if snapshots.is_dir():
        candidates += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        if (path / "config.json").is_file():
            return str(path)
    raise ConfigError(f"--preset {preset.name}: no local copy of {preset.model} (looked in "
                      f"{models_dir / leaf} and the Hugging Face cache {hub}); download it there first, e.g. "
                      f"`huggingface-cli "
                      f"download {preset.model} --local-dir {models_dir / leaf}`, or pass --model FOLDER",
                      param="--preset")


def apply_worker_preset(argv: Sequence[str], env: Mapping[str, str], engine: str = "vllm") -> list[str]:
    """A worker's argv with its --preset expanded (`engine`: "vllm", or "mocker" for its flag names)."""
    name, rest = pop_preset(argv, env)
    if name is None:
        return rest
    preset = get_preset(name)
    model_flag = "--model" if engine == "vllm" else "--model-path"
    flags = [["--served-model-name", preset.model]]
    if _flag_key(model_flag) not in given_flags(rest):
        flags.insert(0, [model_flag, local_model_path(preset, env)])
    flags += preset.vllm_flags() if engine == "vllm" else preset.mocker_flags()
    return fill_in(rest, flags)


def apply_frontend_preset(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """The frontend's argv with its --preset expanded (parsers and disaggregation thresholds)."""
    name, rest = pop_preset(argv, env)
    return rest if name is None else fill_in(rest, get_preset(name).frontend_flags())
