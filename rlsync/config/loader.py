"""Build typed config dataclasses from YAML, failing before any work on bad input.

Why strict: a typo in an RL config (`grpo.lr_rate`) silently running with the
default wastes hours. Every unknown key is an error with a suggestion, every
value is checked against its field's type, and errors name the full dotted key.

Supported field types: bool, int, float (ints accepted; NaN and infinities
refused), str, `X | None`, `Literal[...]`, `list[X]`, `dict[str, X]`, `Any`,
and nested dataclasses (ranges per field: `rlsync.config.bounds`).
Overrides use dotted keys with YAML-parsed values: `grpo.steps=5`,
`engine.quantization=null`. A malformed file or a `!!python/...` tag is a
`ConfigError` naming the file and line (`read_yaml`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from rlsync.errors import ConfigError


def load_config(cls: type, path: str | Path, overrides: list[str] | None = None):
    """Load `path` (YAML) into dataclass `cls`, applying `key=value` overrides first."""
    path = Path(path)
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    data = apply_overrides(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


def read_yaml(path: str | Path) -> Any:
    """The plain data in YAML file `path`; a `ConfigError` naming the file and line for anything else.

    `yaml.safe_load` never builds Python objects; a `!!python/...` tag is
    refused here with the line it is on, instead of a raw yaml traceback.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open(encoding="utf-8") as f:
            return yaml.safe_load(f)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_message(path, exc)) from exc


def _yaml_message(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc)
    if isinstance(exc, yaml.constructor.ConstructorError):
        return (f"{where}: {problem}; a config holds plain data (mappings, lists, numbers, strings), "
                f"so Python tags such as !!python/object are refused")
    context = getattr(exc, "context", None)
    return f"{where}: invalid YAML: {problem}" + (f" ({context})" if context else "")


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """`["a.b=1", "c=null"]` -> `[("a.b", 1), ("c", None)]` (values parsed as YAML)."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key=value (dotted keys, e.g. grpo.steps=5)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from exc
        out.append((key, value))
    return out


def apply_overrides(data: dict, overrides: list[tuple[str, Any]]) -> dict:
    """Set each dotted key in a copy of `data`, creating sections as needed."""
    data = _deepcopy(data)
    for key, value in overrides:
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {part} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def from_dict(cls: type, data: Any, prefix: str = ""):
    """Instantiate dataclass `cls` from a mapping, checking keys and types."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = _suggest(str(key), list(fields))
            hint = f"; did you mean {prefix}{close}?" if close else ""
            hint += f" (valid keys under {where}: {', '.join(sorted(fields))})"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
    kwargs = {name: _convert(hints[name], data[name], f"{prefix}{name}") for name in fields if name in data}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: {exc}") from exc
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def _suggest(key: str, valid: list[str]) -> str | None:
    """The valid key the user most likely meant: a shared prefix first, then spelling."""
    prefixed = [v for v in valid if key.startswith(v) or v.startswith(key)]
    if prefixed:
        return max(prefixed, key=len)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return close[0] if close else None


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:  # `X | None`: X's own message is the precise one
            return _convert(members[0], value, key)
        for arg in members:
            try:
                return _convert(arg, value, key)
            except ConfigError:
                continue  # try the next member of the union; the error below names them all
        names = [_name(a) for a in members] + (["null"] if type(None) in args else [])
        raise ConfigError(f"{key}: {value!r} is none of {', '.join(names)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        _, item = typing.get_args(tp) or (str, Any)
        return {str(k): _convert(item, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {_name(tp)} (a bug in the config class)")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def to_dict(obj: Any) -> Any:
    """A config dataclass as plain YAML-able data (for the run's resolved config)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
