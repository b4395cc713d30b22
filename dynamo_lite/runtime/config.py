"""Config dataclasses -> argparse, with an environment twin for every flag.

Each component declares one frozen dataclass whose fields are built with `option()`. The field's
help text doubles as its docstring; the flag is `--field-name`, the environment twin `DYN_FIELD_NAME`
unless the option names another (ETCD_ENDPOINTS, NATS_SERVER follow Dynamo's names). Precedence:
command line > environment > dataclass default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, TypeVar

from dynamo_lite.protocol.errors import ConfigError

T = TypeVar("T")
ENV_PREFIX = "DYN_"


def option(default: Any, help: str, *, env: str | None = None, flag: str | None = None,
           choices: list[str] | None = None, negatable: bool = False) -> Any:
    """A config field. `negatable` bools get --x/--no-x."""
    return dataclasses.field(default=default, metadata={
        "help": help, "env": env, "flag": flag, "choices": choices, "negatable": negatable})


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def env_name(field: dataclasses.Field) -> str:
    return field.metadata.get("env") or ENV_PREFIX + field.name.upper()


def _parse_env(field: dataclasses.Field, raw: str) -> Any:
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    try:
        if kind.startswith("bool"):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError as e:
        raise ConfigError(f"environment variable {env_name(field)}={raw!r} is not a valid {kind}",
                          param=flag_name(field)) from e
    choices = field.metadata.get("choices")
    if choices and raw not in choices:  # argparse checks choices only for values given on the command line
        raise ConfigError(f"environment variable {env_name(field)}={raw!r} is not one of "
                          f"{', '.join(map(str, choices))} (the values of {flag_name(field)})",
                          param=flag_name(field))
    return raw


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, group: str | None = None) -> None:
    """Add one flag per field of `cls`; defaults come from the environment twin, else the field."""
    target = parser.add_argument_group(group) if group else parser
    for field in dataclasses.fields(cls):
        env = env_name(field)
        default = field.default
        if env in os.environ:
            default = _parse_env(field, os.environ[env])
        help_text = f"{field.metadata.get('help', '')} [env: {env}]"
        if not issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter):
            help_text += f" (default: {default!r})"  # vLLM's formatter already prints defaults
        kind = field.type if isinstance(field.type, str) else str(field.type)
        name = flag_name(field)
        if kind.startswith("bool"):
            target.add_argument(name, dest=field.name, default=default, help=help_text,
                                action=argparse.BooleanOptionalAction)
            continue
        caster = int if kind.startswith("int") else float if kind.startswith("float") else str
        target.add_argument(name, dest=field.name, default=default, type=caster,
                            choices=field.metadata.get("choices"), help=help_text)


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build the frozen config from parsed args (fields not in args keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**values)


def config_help(cls: type) -> dict[str, str]:
    """field name -> help text, for docs generation and tests."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
