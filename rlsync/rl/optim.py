"""The trainer's optimizer, named in the config and built only from `torch.optim`.

A config names the class (`optimizer: torch.optim.AdamW`) and extra keyword
arguments (`optimizer_kwargs: {betas: [0.9, 0.95]}`); both are checked when the
config loads, before any model is built: the class through the allowlist
(`rlsync.config.allowlist`) and must be a concrete optimizer (not the abstract
`torch.optim.Optimizer`); each argument must be one the class takes, with a
value of the type its signature annotates (numbers finite, `betas` a pair of
numbers); finally the optimizer is built once on a dummy parameter, so its own
range checks (`Invalid beta parameter`) also fail at load time.

Limitations:
1. A parameter without an annotation is checked against its default's type;
   one with neither accepts any plain scalar (a finite number, bool, string or null).
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Iterable
from typing import Any

import torch

from rlsync.config.allowlist import resolve_allowed
from rlsync.errors import ConfigError

OPTIMIZER_MODULES = ("torch.optim",)
# Set from their own config fields, never through optimizer_kwargs.
_RESERVED = ("params", "lr", "weight_decay")


def _is_optimizer(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer)


def optimizer_class(name: str, section: str) -> type[torch.optim.Optimizer]:
    cls = resolve_allowed(name, key=f"{section}.optimizer", modules=OPTIMIZER_MODULES, check=_is_optimizer,
                          kind="torch.optim.Optimizer subclass")
    if cls is torch.optim.Optimizer or inspect.isabstract(cls) or cls.step is torch.optim.Optimizer.step:
        raise ConfigError(f"{section}.optimizer: {name} is an abstract base class (it cannot step); "
                          f"name a concrete optimizer such as torch.optim.AdamW")
    return cls


def check_optimizer(name: str, kwargs: dict[str, Any], section: str, weight_decay: float = 0.0, *,
                    lr: float | None = None) -> None:
    """`ConfigError` naming the key if the class is not allowed or an argument does not fit it."""
    cls = optimizer_class(name, section)
    params = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if weight_decay and "weight_decay" not in params:
        raise ConfigError(f"{section}.weight_decay: {name} has no weight decay; set it to 0")
    for arg, value in kwargs.items():
        key = f"{section}.optimizer_kwargs.{arg}"
        if arg in _RESERVED:
            raise ConfigError(f"{key}: set it with {section}.{arg}, not here" if arg != "params"
                              else f"{key}: not settable")
        if arg not in params and not takes_any:
            raise ConfigError(f"{key}: {name} takes no argument {arg!r} "
                              f"(it takes {', '.join(p for p in params if p not in _RESERVED)})")
        expected = _expected_type(params[arg]) if arg in params else _SCALAR
        if not _fits(value, expected):
            raise ConfigError(f"{key}: {name} expects {_describe(expected)}, got {value!r}")
    if lr is None:
        lr = params["lr"].default if "lr" in params and isinstance(params["lr"].default, float) else 1e-3
    dummy = [torch.nn.Parameter(torch.zeros(2, 2))]
    try:  # the class's own range checks (betas in [0, 1), eps >= 0, ...), on a throwaway parameter
        build_optimizer(dummy, name, lr=lr, weight_decay=weight_decay, kwargs=kwargs, section=section)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{section}.optimizer_kwargs: {name} refuses {kwargs}: {exc}") from exc


# Stand-in for "any plain YAML scalar" where a signature says nothing.
_SCALAR = float | int | bool | str | None


def _expected_type(param: inspect.Parameter) -> Any:
    if param.annotation is not inspect.Parameter.empty:
        return param.annotation
    default = param.default
    if default is inspect.Parameter.empty or default is None:
        return _SCALAR
    if isinstance(default, tuple):
        return tuple[tuple(_SCALAR if d is None else type(d) for d in default)]
    return type(default)


def _fits(value: Any, tp: Any) -> bool:
    """True if YAML data `value` can stand for an argument annotated `tp` (numbers must be finite)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    if tp is type(None) or tp is None:
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    return False  # tensors, callables, ...: nothing a config can give


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        names = [_describe(a) for a in args if a is not torch.Tensor]
        return " or ".join(dict.fromkeys(names))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)}: [{', '.join(_describe(a) for a in args)}]"
    return {bool: "true/false", int: "an integer", float: "a finite number", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def build_optimizer(params: Iterable[torch.nn.Parameter], name: str, *, lr: float, weight_decay: float,
                    kwargs: dict[str, Any], section: str) -> torch.optim.Optimizer:
    cls = optimizer_class(name, section)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}  # YAML lists -> betas tuples
    if "weight_decay" in inspect.signature(cls).parameters:
        kwargs["weight_decay"] = weight_decay
    return cls(params, lr=lr, **kwargs)
