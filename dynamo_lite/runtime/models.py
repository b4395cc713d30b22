"""Where a component finds its model: the default model folder, and the rule that a model is a local
path (nothing here can reach a model hub: weights are never downloaded at run time)."""

from __future__ import annotations

import os
from pathlib import Path

from dynamo_lite.protocol.errors import ConfigError

# The folder scripts/setup.sh prepares (scripts/prepare_model.py); $DYN_MODEL_PATH overrides it.
DEFAULT_MODEL_PATH = str(Path.home() / ".cache" / "dynamo_lite" / "models" / "SmolLM2-135M-Instruct")
MODEL_PATH_ENV = "DYN_MODEL_PATH"
# The default model's hub id: the name the launch scripts and tests serve it under (--served-model-name).
DEFAULT_SERVED_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def default_model_path() -> str:
    """$DYN_MODEL_PATH, else the prepared default model folder."""
    return str(Path(os.environ.get(MODEL_PATH_ENV) or DEFAULT_MODEL_PATH).expanduser())


def refuse_hub_id(model: str, flag: str) -> None:
    """ConfigError naming `flag` if `model` is no local path but reads as a model hub id ("org/name").

    A hub id would otherwise fail late, in the engine, and the frontend would get no tokenizer from the
    worker; refuse it at start and say what to do instead. Other missing paths are left to the engine,
    which names what it looked for.
    """
    if os.path.exists(os.path.expanduser(model)):
        return
    org, _, name = model.partition("/")
    if org and name and "/" not in name and not org.startswith((".", "~")):
        raise ConfigError(f"{flag} {model}: a model hub id, and there is no hub access; pass a local model "
                          "folder (scripts/prepare_model.py builds the default one) and, for the name "
                          "clients use, --served-model-name", param=flag)
