"""Binding a weight loader's call to its arguments by name, fast, for the reload's counting wrappers.

Why: every loader call a reload sees is bound to find `param`, `loaded_weight` and the shard key, then the
loader is called (and, while recording a sync plan, the call stored). `inspect.Signature.bind` plus
`BoundArguments.args` / `.kwargs` cost tens of microseconds a call, which a 256-expert layer pays 768 times.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Any

import torch

from rlsync.errors import SyncError

_SIMPLE = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
_BINDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def binder_for(fn: Callable) -> Binder:
    """A `Binder` for loader `fn`, cached per function (a bound method: per its function, signed without `self`).

    Every sync re-binds each layer's loader (a new bound method each time); signing 179 loaders was about
    4 ms of a 157 ms FP8 sync. Functions are held weakly (closures die with their engine)."""
    func = getattr(fn, "__func__", None)
    target, bound = (fn, False) if func is None else (func, True)
    try:
        cached = _BINDERS.get(target)
        if cached is None:
            cached = _BINDERS[target] = {}
    except TypeError:  # not weak-referenceable: sign it each time
        return Binder(inspect.signature(fn), fn)
    binder = cached.get(bound)
    if binder is None:
        binder = cached[bound] = Binder(inspect.signature(fn), fn)
    return binder


class Bound:
    """One loader call's arguments by name (`arguments`, in signature order, as `inspect.BoundArguments`
    holds them: only those passed) and how to call the loader with them (`split`).

    `arguments` may be changed before `split` (rlsync hands the loader its own `param`)."""

    __slots__ = ("arguments", "_inspect")

    def __init__(self, arguments: dict[str, Any], inspected: inspect.BoundArguments | None = None) -> None:
        self.arguments, self._inspect = arguments, inspected

    def split(self) -> tuple[tuple, dict[str, Any]]:
        """(args, kwargs) for calling the loader with `arguments`."""
        if self._inspect is None:
            return (), self.arguments
        return self._inspect.args, self._inspect.kwargs


class Binder:
    """`inspect.Signature.bind` for a loader, fast where the signature has no positional-only or variadic
    parameters (vLLM's loaders): a dictionary built from the names, no `BoundArguments`.

    Why: binding, then reading `BoundArguments.args` / `.kwargs` twice (to call, to record) was about a tenth
    of a recording sync of 256-expert layers (768 loader calls each; cProfile). Anything
    else (an unknown or repeated name, a missing required argument, other parameter kinds) goes through
    `inspect`, which raises its usual TypeError.
    """

    def __init__(self, sig: inspect.Signature, loader: Callable) -> None:
        # not repr(loader) as the fallback: a bound method's repr is its module's, which fails while the layer's
        # parameters are swapped out (vLLM's `extra_repr` reads them)
        self.sig, self.name = sig, getattr(loader, "__qualname__", None) or type(loader).__qualname__
        params = list(sig.parameters.values())
        self.simple = all(p.kind in _SIMPLE for p in params)
        self.names = [p.name for p in params]
        self.known = set(self.names)
        self.positional = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        self.required = {p.name for p in params if p.default is inspect.Parameter.empty}

    def bind(self, args: tuple, kwargs: dict[str, Any]) -> Bound:
        bound = self._fast(args, kwargs)
        if bound is None:
            inspected = self.sig.bind(*args, **kwargs)
            bound = Bound(inspected.arguments, inspected)
        if "param" not in bound.arguments or "loaded_weight" not in bound.arguments:
            raise SyncError(
                f"weight loader {self.name} has no `param` / `loaded_weight` arguments"
            )
        return bound

    def _fast(self, args: tuple, kwargs: dict[str, Any]) -> Bound | None:
        if not self.simple or len(args) > len(self.positional):
            return None
        passed = dict(zip(self.positional, args))
        for k, v in kwargs.items():
            if k in passed or k not in self.known:
                return None
            passed[k] = v
        if not self.required <= passed.keys():
            return None
        return Bound({n: passed[n] for n in self.names if n in passed})


def shard_key(bound: Bound) -> tuple:
    """What distinguishes one shard of a tensor from another (`loaded_shard_id`, expert id, ...)."""
    return tuple(
        (k, repr(v)) for k, v in bound.arguments.items() if k not in ("param", "loaded_weight") and not isinstance(v, torch.Tensor)
    )
