"""The trainer's optimizer, named in the config and built only from `torch.optim`.

A config names the class (`optimizer: torch.optim.AdamW`) and extra keyword
arguments (`optimizer_kwargs: {betas: [0.9, 0.95]}`); both are checked when the
config loads, before any model is built: the class through the allowlist
(`rlsync.config.allowlist`), the arguments against the class's signature.
"""

from __future__ import annotations

import inspect
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
    return resolve_allowed(name, key=f"{section}.optimizer", modules=OPTIMIZER_MODULES, check=_is_optimizer,
                           kind="torch.optim.Optimizer subclass")


def check_optimizer(name: str, kwargs: dict[str, Any], section: str, weight_decay: float = 0.0) -> None:
    """`ConfigError` naming the key if the class is not allowed or an argument does not fit it."""
    cls = optimizer_class(name, section)
    params = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if weight_decay and "weight_decay" not in params:
        raise ConfigError(f"{section}.weight_decay: {name} has no weight decay; set it to 0")
    for arg in kwargs:
        if arg in _RESERVED:
            raise ConfigError(f"{section}.optimizer_kwargs.{arg}: set it with {section}.{arg}, not here"
                              if arg != "params" else f"{section}.optimizer_kwargs.params: not settable")
        if arg not in params and not takes_any:
            raise ConfigError(f"{section}.optimizer_kwargs.{arg}: {name} takes no argument {arg!r} "
                              f"(it takes {', '.join(p for p in params if p not in _RESERVED)})")


def build_optimizer(params: Iterable[torch.nn.Parameter], name: str, *, lr: float, weight_decay: float,
                    kwargs: dict[str, Any], section: str) -> torch.optim.Optimizer:
    cls = optimizer_class(name, section)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}  # YAML lists -> betas tuples
    if "weight_decay" in inspect.signature(cls).parameters:
        kwargs["weight_decay"] = weight_decay
    return cls(params, lr=lr, **kwargs)
