"""Config dataclasses -> argparse, with an environment twin for every flag.

Each component declares one frozen dataclass whose fields are built with `option()`. The field's
help text doubles as its docstring; the flag is `--field-name`, the environment twin `DYN_FIELD_NAME`
unless the option names another (ETCD_ENDPOINTS, NATS_SERVER follow Dynamo's names). Precedence:
command line > environment > dataclass default. Fields not built with `option()` are no flags: code
sets them (a worker command derives them from its flags). Bools get --x/--no-x. A `tuple[str, ...]`
field takes one or more values (`--api-key a b`, or a JSON list as vLLM's CORS flags take it:
`--allowed-origins '["https://a"]'`); its environment twin is a comma-separated list or a JSON list.

Range checks are declared on the option (`minimum`, `maximum`, `exclusive_minimum`): an environment
twin out of range is refused while the parser is built, and `check_ranges(config)`, called from the
dataclass's __post_init__, refuses a flag or a value given in code, each with a ConfigError naming the
flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Collection
from typing import Any, TypeVar

from dynamo_lite.protocol.errors import ConfigError

T = TypeVar("T")
ENV_PREFIX = "DYN_"


def option(default: Any, help: str, *, env: str | None = None, flag: str | None = None,
           choices: list[str] | None = None, minimum: float | None = None, maximum: float | None = None,
           exclusive_minimum: float | None = None, secret: bool = False) -> Any:
    """A config field that is a flag with an environment twin. `minimum`/`maximum` bound the value
    inclusively, `exclusive_minimum` strictly (a value that must be above it). A `secret` (API keys) is
    left out of the config's repr and of --help, which would otherwise print it from the environment."""
    return dataclasses.field(default=default, repr=not secret, metadata={
        "help": help, "env": env, "flag": flag, "choices": choices, "minimum": minimum, "maximum": maximum,
        "exclusive_minimum": exclusive_minimum, "secret": secret})


def is_option(field: dataclasses.Field) -> bool:
    return "help" in field.metadata


def range_error(field: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with `value` for the field's declared range, or None if it is within it."""
    meta, flag = field.metadata, flag_name(field)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if meta.get("minimum") is not None and value < meta["minimum"]:
        return f"{flag} must be at least {meta['minimum']} (got {value})"
    if meta.get("exclusive_minimum") is not None and not value > meta["exclusive_minimum"]:
        return f"{flag} must be > {meta['exclusive_minimum']} (got {value})"
    if meta.get("maximum") is not None and value > meta["maximum"]:
        return f"{flag} must be at most {meta['maximum']} (got {value})"
    return None


def check_ranges(config: Any) -> None:
    """Raise ConfigError naming the flag of the first option whose value is out of its declared range."""
    for field in dataclasses.fields(config):
        if is_option(field) and (problem := range_error(field, getattr(config, field.name))):
            raise ConfigError(problem, param=flag_name(field))


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def env_name(field: dataclasses.Field) -> str:
    return field.metadata.get("env") or ENV_PREFIX + field.name.upper()


def _is_list(kind: str) -> bool:
    return kind.startswith("tuple")


def parse_list(raw: str) -> list[str]:
    """One value of a list option: a JSON list of strings ('["a", "b"]'), else comma-separated text."""
    if raw.lstrip().startswith("["):
        try:
            values = json.loads(raw)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"not a JSON list of strings: {raw!r}") from e
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise argparse.ArgumentTypeError(f"not a JSON list of strings: {raw!r}")
        return values
    return [part.strip() for part in raw.split(",") if part.strip()]


class _ExtendList(argparse.Action):
    """nargs="+" whose values may each be a JSON list: the flag's values, flattened, as a tuple."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, tuple(item for value in values for item in value))


def _parse_env(field: dataclasses.Field, raw: str) -> Any:
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    if _is_list(kind):
        try:
            return tuple(parse_list(raw))
        except argparse.ArgumentTypeError as e:
            raise ConfigError(f"environment variable {env_name(field)}: {e}", param=flag_name(field)) from e
    try:
        if kind.startswith("bool"):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind.startswith("int"):
            value: Any = int(raw)
        elif kind.startswith("float"):
            value = float(raw)
        else:
            value = None
    except ValueError as e:
        raise ConfigError(f"environment variable {env_name(field)}={raw!r} is not a valid {kind}",
                          param=flag_name(field)) from e
    if value is not None:
        if problem := range_error(field, value):
            raise ConfigError(f"environment variable {env_name(field)}={raw!r}: {problem}",
                              param=flag_name(field))
        return value
    choices = field.metadata.get("choices")
    if choices and raw not in choices:  # argparse checks choices only for values given on the command line
        raise ConfigError(f"environment variable {env_name(field)}={raw!r} is not one of "
                          f"{', '.join(map(str, choices))} (the values of {flag_name(field)})",
                          param=flag_name(field))
    return raw


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, group: str | None = None, *,
                         exclude: Collection[str] = (), given_only: bool = False) -> None:
    """Add one flag per field of `cls` (but the fields named in `exclude`); defaults come from the
    environment twin, else the field. `given_only`: no defaults at all, so that the parsed namespace
    holds only the flags given (a launcher that passes them on to the component)."""
    target = parser.add_argument_group(group) if group else parser
    for field in dataclasses.fields(cls):
        if not is_option(field) or field.name in exclude:
            continue
        env = env_name(field)
        default = field.default
        if given_only:
            default = argparse.SUPPRESS
        elif env in os.environ:
            default = _parse_env(field, os.environ[env])
        help_text = f"{field.metadata.get('help', '')} [env: {env}]"
        if not issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter):
            shown_default = field.default if given_only else default
            shown = "<hidden>" if field.metadata.get("secret") and shown_default else repr(shown_default)
            help_text += f" (default: {shown})"  # vLLM's formatter already prints defaults
        kind = field.type if isinstance(field.type, str) else str(field.type)
        name = flag_name(field)
        if kind.startswith("bool"):
            target.add_argument(name, dest=field.name, default=default, help=help_text,
                                action=argparse.BooleanOptionalAction)
            continue
        if _is_list(kind):
            # A JSON list is one value to the shell; plain values are split on commas too, so the flag
            # reads the same as its environment twin.
            target.add_argument(name, dest=field.name, default=default, type=parse_list, nargs="+",
                                action=_ExtendList, metavar=field.name.upper(), help=help_text)
            continue
        caster = int if kind.startswith("int") else float if kind.startswith("float") else str
        target.add_argument(name, dest=field.name, default=default, type=caster,
                            choices=field.metadata.get("choices"), help=help_text)


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build the frozen config from parsed args (fields not in args keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if is_option(f) and f.init and hasattr(args, f.name)}
    return cls(**values)


def config_help(cls: type) -> dict[str, str]:
    """field name -> help text, for docs generation and tests."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(cls) if is_option(f)}
