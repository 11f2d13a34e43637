"""Fused (torch.compile) versions of the reference FP8 quantizers, for the sync hot path.

Why: eager torch runs a quantizer as four or five separate passes over the
weight with fp32 temporaries the size of the chunk; on a ~250M-parameter model
that is most of an FP8 sync. Compiled by TorchInductor, the same operations
become one loop over the data. The operations and their order are those of
`rlsync.quant.reference`, and the output is bit-identical to it, so the verify
contract (engine tensors == reference, bit for bit) is unchanged.

Two compiler behaviours would break the bits, and are undone here:
1. CPU: Inductor casts fp32 -> e4m3 one element at a time (2.3 ns per element
   on an AVX2 core, most of the kernel); on CPU the compiled functions cast
   with `rlsync.quant.e4m3.from_fp32`, the same rounding in vectorized integer
   arithmetic.
2. GPU: Triton's `/` is an approximate division, and Inductor turns a division
   by a constant into a multiply by its rounded reciprocal. Off the CPU the
   functions compile with Inductor's `eager_numerics.division_rounding` and
   receive 448 as a runtime tensor. Per-tensor quantization (a multiply by
   the scale's reciprocal) runs eager off the CPU: torch 2.11's Triton code
   writes the reciprocal as `int32 1 / scale`, which the rounding option does
   not cover, so the reciprocal can be one ulp off (seen on an H200: 4 of
   128 weights of the bench model differed in one element each).

Checked, not trusted: the first call of each function for each device type and
input dtypes also runs the eager reference on the same inputs and compares
every output bit; on any difference (another torch, another backend) that
combination runs eager from then on, with one warning. `tests/unit/test_quant_fused.py`
checks the compiled functions on random shapes and special values.

What it does not do: define correctness (that is `reference`), or compile
anything at import time. The first call of each function compiles it
(seconds; cached on disk by Inductor for later processes).

Fallback: where compilation fails (no C++ compiler, an unsupported backend) the
eager reference runs instead, with one warning naming the error; the bits are
the same, only slower. `RLSYNC_FUSED_QUANT=0` turns the fused path off.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlsync.quant import e4m3, reference


def enabled() -> bool:
    """False when `RLSYNC_FUSED_QUANT=0` (use the eager reference)."""
    return os.environ.get("RLSYNC_FUSED_QUANT", "1") != "0"


def _device_and_kind(args: Sequence[Any]) -> tuple[str, tuple]:
    """The device type, and what a compiled graph is specialised on: tensor dtypes, other arguments."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return tensors[0].device.type, tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args)


def _same_bits(a: Any, b: Any) -> bool:
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(_same_bits(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return (a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))
    return a == b


@functools.cache
def _fp8_max(device: torch.device) -> torch.Tensor:
    return torch.tensor(reference.FP8_MAX, dtype=torch.float32, device=device)


class _Fused:
    """One reference function, compiled per device type, checked against eager on first use."""

    def __init__(self, fn: Callable[..., Any], *, writes: tuple[int, ...] = (), casts: bool = True,
                 runtime_max: bool = False, compile_if: Callable[[str, Sequence[Any]], bool] | None = None) -> None:
        self.eager = fn
        self.compile_if = compile_if  # (device type, args) -> whether the compiled code is the reference's there
        self.writes = writes  # positional arguments the function writes into (instead of returning)
        self.casts = casts  # takes `cast=` (ends in an e4m3 cast)
        self.runtime_max = runtime_max  # takes `fp8_max=` (a division by 448 inside)
        self.compiled: dict[str, Callable[..., Any]] = {}
        self.checked: dict[tuple, bool] = {}  # (device type, input kind) -> the compiled output matched eager
        self.failures: list[str] = []  # a compile error (then eager runs everywhere)
        self.mismatches: list[str] = []  # (device type, input kind) whose compiled bits differed (then eager runs there)
        functools.update_wrapper(self, fn)

    def _compiled_for(self, device: str) -> Callable[..., Any]:
        if device not in self.compiled:
            if device == "cpu":
                fn, options = functools.partial(self.eager, cast=e4m3.from_fp32) if self.casts else self.eager, {}
            else:
                fn, options = self.eager, {"eager_numerics.division_rounding": True}
            self.compiled[device] = torch.compile(fn, dynamic=True, options=options)
        return self.compiled[device]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not enabled() or self.failures:
            return self.eager(*args, **kwargs)
        device, kind = _device_and_kind(args)
        key = (device, kind)
        if self.checked.get(key) is False or (self.compile_if is not None and not self.compile_if(device, args)):
            return self.eager(*args, **kwargs)
        run_kwargs = dict(kwargs)
        if self.runtime_max and device != "cpu":
            run_kwargs.setdefault("fp8_max", _fp8_max(next(a for a in args if isinstance(a, torch.Tensor)).device))
        try:
            out = self._compiled_for(device)(*args, **run_kwargs)
        except Exception as exc:  # a compile/codegen failure: same bits from the eager reference
            self.failures.append(f"{type(exc).__name__}: {exc}")
            warnings.warn(f"rlsync: torch.compile of {self.__name__} failed ({self.failures[0][:300]}); "
                          "using the eager reference quantizer (same bits, slower)", RuntimeWarning, stacklevel=2)
            return self.eager(*args, **kwargs)
        if key not in self.checked:
            self.checked[key] = self._matches_eager(args, kwargs, out)
            if not self.checked[key]:
                self.mismatches.append(f"{device} {kind}")
                warnings.warn(f"rlsync: the compiled {self.__name__} on {device} (inputs {kind}) differs from the "
                              "eager reference in some bits; using the eager reference there (same bits, slower)",
                              RuntimeWarning, stacklevel=2)
                return self.eager(*args, **kwargs)
        return out

    def _matches_eager(self, args: Sequence[Any], kwargs: dict[str, Any], out: Any) -> bool:
        if not self.writes:
            return _same_bits(out, self.eager(*args, **kwargs))
        fresh = [torch.empty_like(a) if i in self.writes else a for i, a in enumerate(args)]
        self.eager(*fresh, **kwargs)
        return all(_same_bits(args[i], fresh[i]) for i in self.writes)


def _cpu_only(device: str, args: Sequence[Any]) -> bool:
    return device == "cpu"


fp8_per_channel = _Fused(reference.fp8_per_channel, runtime_max=True)
quantize_with_tensor_scale = _Fused(reference.quantize_with_tensor_scale, compile_if=_cpu_only)
stacked_fp8_into = _Fused(reference.stacked_fp8_into, writes=(2, 3), runtime_max=True,
                          compile_if=lambda device, args: device == "cpu" or args[0] == "channel")
abs_max = _Fused(reference.abs_max, casts=False)
