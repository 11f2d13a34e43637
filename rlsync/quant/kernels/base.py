"""The kernel interface: what a linear layer needs computed, and one way to compute it.

A `LinearDescriptor` states what a linear layer needs (weight layout, shapes,
shards, bias, activation handling, dtypes, device). A `Kernel` answers
`is_supported(device_type)` and `can_implement(descriptor)` with `(ok,
reason)`, owns `prep_weights_for_execution` (standard layout -> its own) and
`apply`. `register_kernel` adds a kernel class to `KERNELS`; the chooser and
the per-platform priority list live in the package `__init__`.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

import torch

from rlsync.errors import ConfigError
from rlsync.quant.layout import Layout, QuantizedTensor

KERNEL_ENV = "RLSYNC_FP8_KERNEL"
"""Environment variable naming a kernel to force (the config key wins when both are set)."""
ACTIVATIONS = ("auto", "bf16", "fp8_dynamic")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class LinearDescriptor:
    """The computation a quantized linear layer needs: y = x W^T + b."""

    weight_layout: Layout
    """Layout the weights are stored in (the plugin stores the standard layout)."""
    shape: tuple[int, int]
    """(N, K): output and input features."""
    shard_widths: tuple[int, ...] = ()
    """Output rows of each fused shard; empty means one shard."""
    has_bias: bool = False
    """Whether a bias is added."""
    activation: str = "auto"
    """`bf16` (weight-only), `fp8_dynamic` (activations quantized per call) or `auto`."""
    act_dtype: torch.dtype = torch.bfloat16
    """Activation (input) dtype."""
    out_dtype: torch.dtype = torch.bfloat16
    """Output dtype."""
    device: str = "cpu"
    """Device type the layer runs on (`cpu`, `cuda`)."""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation {self.activation!r}: choose one of {', '.join(ACTIVATIONS)}")

    @property
    def num_shards(self) -> int:
        return max(1, len(self.shard_widths))


class KernelDispatchError(ConfigError):
    """No kernel (or not the forced one) can run a descriptor; `reasons` maps kernel -> why."""

    def __init__(self, message: str, reasons: dict[str, str]) -> None:
        super().__init__(message + "; " + "; ".join(f"{k}: {v}" for k, v in reasons.items()))
        self.reasons = reasons


class Kernel(abc.ABC):
    """One way to run a quantized linear layer."""

    name: ClassVar[str] = ""

    def __init__(self, desc: LinearDescriptor) -> None:
        self.desc = desc

    @classmethod
    @abc.abstractmethod
    def is_supported(cls, device_type: str) -> tuple[bool, str]:
        """Whether this kernel runs on `device_type` here at all."""

    @classmethod
    @abc.abstractmethod
    def can_implement(cls, desc: LinearDescriptor) -> tuple[bool, str]:
        """Whether this kernel computes `desc` (assuming it is supported)."""

    @abc.abstractmethod
    def exec_layout(self) -> Layout:
        """The layout `apply` reads."""

    @abc.abstractmethod
    def apply(self, weight: QuantizedTensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`x @ W^T + bias` with `weight` in `exec_layout()`."""

    def adapt_standard(self, std: QuantizedTensor) -> QuantizedTensor:
        """Granularity changes this kernel needs on standard-layout weights (default: none)."""
        return std

    def prep_weights_for_execution(self, weight: QuantizedTensor) -> QuantizedTensor:
        """Standard (or any) layout -> this kernel's; a matching layout passes straight through."""
        target = self.exec_layout()
        if weight.layout == target:
            return weight
        std = weight if weight.layout.is_standard() else weight.layout.to_standard_layout(weight)
        return target.from_standard_layout(self.adapt_standard(std))


KERNELS: dict[str, type[Kernel]] = {}
"""Registered kernels by name."""


def register_kernel(cls: type[Kernel]) -> type[Kernel]:
    KERNELS[cls.name] = cls
    return cls


def check_kernel(cls: type[Kernel], desc: LinearDescriptor) -> tuple[bool, str]:
    ok, reason = cls.is_supported(desc.device)
    if not ok:
        return False, reason
    return cls.can_implement(desc)


