"""One option parser for every pass: ``--set pass.option=value``, a TOML file, or the API's dict, all
validated against the pass's config dataclass."""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

from .errors import OptionError


def parse_set_options(pairs: list[str]) -> dict[str, dict[str, str]]:
    """Split ``["remat.budget=0.5", ...]`` into ``{"remat": {"budget": "0.5"}}`` (values stay strings)."""
    options: dict[str, dict[str, str]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        pass_name, dot, option = key.strip().partition(".")
        if not sep or not dot or not pass_name or not option:
            raise OptionError(f"--set {pair!r} is not pass.option=value; write e.g. --set remat.budget=0.5")
        options.setdefault(pass_name, {})[option] = value.strip()
    return options


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML file: ``passes = [...]`` (optional) and one table per pass (``[remat]``), also accepted
    under ``[tool.effcompile]``. Returns the top-level mapping."""
    path = Path(path)
    if not path.exists():
        raise OptionError(f"config file {path} does not exist; pass an existing .toml file to --config")
    if path.is_dir():
        raise OptionError(f"config file {path} is a folder; pass a .toml file to --config (e.g. {path}/effcompile.toml)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise OptionError(f"config file {path} is not valid TOML ({' '.join(str(error).split())}); fix the file") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
        raise OptionError(f"config file {path} cannot be read ({reason}); pass a readable UTF-8 .toml file") from None
    return data.get("tool", {}).get("effcompile", data)


def merge_options(*sources: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Merge per-pass option mappings; later sources win option by option."""
    merged: dict[str, dict[str, Any]] = {}
    for source in sources:
        for pass_name, values in source.items():
            if not isinstance(values, Mapping):
                raise OptionError(f"options for pass {pass_name!r} must be a table of option=value, "
                                  f"got {type(values).__name__}")
            merged.setdefault(pass_name, {}).update(values)
    return merged


def build_config(pass_name: str, config_class: type, raw: Mapping[str, Any]) -> Any:
    """Fill ``config_class`` from ``raw``, converting strings to each field's type.

    Raises OptionError naming the pass, the option, the bad value and what is allowed.
    """
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    hints = typing.get_type_hints(config_class)
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in fields:
            allowed = ", ".join(sorted(fields)) or "none"
            raise OptionError(f"{pass_name}: unknown option {name!r}; options are: {allowed}")
        values[name] = convert(pass_name, name, value, hints[name])
    try:
        return config_class(**values)
    except OptionError:
        raise
    except (TypeError, ValueError) as error:
        raise OptionError(f"{pass_name}: {error}") from None


def describe_type(annotation: Any) -> str:
    """A short human description of an option type (``float | str``, ``one of budget, blocks``)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(describe_type(a) for a in typing.get_args(annotation))
    if origin in (tuple, list):
        return f"comma-separated {describe_type(typing.get_args(annotation)[0])}s"
    return getattr(annotation, "__name__", str(annotation))


def convert(pass_name: str, option: str, value: Any, annotation: Any) -> Any:
    """Convert ``value`` (often a string from the command line) to ``annotation``'s type."""
    try:
        return _convert(value, annotation)
    except (TypeError, ValueError):
        if _is_non_finite(value):
            raise OptionError(f"{pass_name}.{option}: {value!r} is not a finite number; set a finite value, "
                              f"e.g. --set {pass_name}.{option}=<{describe_type(annotation)}>") from None
        raise OptionError(f"{pass_name}.{option}: {value!r} is not {describe_type(annotation)}; "
                          f"set e.g. --set {pass_name}.{option}=<{describe_type(annotation)}>") from None


def _is_non_finite(value: Any) -> bool:
    try:
        return not isinstance(value, bool) and not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def split_passes(text: str | None) -> list[str]:
    """``--passes a,b`` as a list of names (None or nothing given: no passes). Raises OptionError for an
    empty name (``,``, ``a,,b``, a trailing comma)."""
    if text is None:
        return []
    names = [name.strip() for name in text.split(",")]
    if "" in names:
        raise OptionError(f"--passes {text!r} has an empty pass name; list names separated by single commas, "
                          "e.g. --passes lora,remat (effcompile --list-passes lists them)")
    return names


def _convert(value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if annotation is type(None):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        raise ValueError(value)
    if origin is Literal:
        for allowed in typing.get_args(annotation):
            if value == allowed or (isinstance(value, str) and str(allowed) == value):
                return allowed
        raise ValueError(value)
    if origin in (Union, types.UnionType):
        members = sorted(typing.get_args(annotation), key=lambda t: t is str)  # try str last
        for member in members:
            try:
                return _convert(value, member)
            except (TypeError, ValueError):
                continue
        raise ValueError(value)
    if origin in (tuple, list):
        (item_type, *_) = typing.get_args(annotation) or (str,)
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
        converted = [_convert(v, item_type) for v in items]
        return tuple(converted) if origin is tuple else converted
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ValueError(value)
    if annotation is int:
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ValueError(value)
    if annotation is float:
        if isinstance(value, bool):
            raise ValueError(value)
        number = float(value)
        if not math.isfinite(number):  # no option means anything by nan or inf
            raise ValueError(value)
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    return value
