"""The trainer-side contract: full tensors, one layer group at a time.

A `WeightSource` hands the engine a model's weights as an iterator of groups,
each a sequence of `(hf_name, tensor)` (a list, or a `StackedGroup` that also names
runs of slices of one tensor: `stacked.py`). Groups follow the model's parameter order
(embeddings, each decoder layer, final norm + head), which is the order vLLM's
layerwise reload and rlsync's reload process layers in. A source never holds
more than one gathered group: it frees group g before gathering g+1, and it
counts the gathered bytes alive so tests and benchmarks can check that bound.

In a multi-process trainer every rank iterates `groups()` in lockstep (the
gathers are collectives). Ranks that own an engine consume the groups (through
`VLLMEngine.sync`); the others call `drain()`. A sync with `verify=True`
iterates a second time, so every rank must make the same calls.

What a source does not do: choose which ranks consume, or cast to the engine's
dtype unless asked (`dtype`).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator

from typing import Any

import torch

Group = list[tuple[str, torch.Tensor]]
"""What `groups()` yields: a list of pairs, or a `StackedGroup` (a tuple of them, with its stacks)."""


@dataclasses.dataclass(kw_only=True, slots=True)
class SourceConfig:
    """Options every `WeightSource` accepts."""

    dtype: torch.dtype | None = None
    """Cast yielded tensors to this dtype (one group at a time); None keeps the trainer's."""
    bucket_bytes: int | None = None
    """Split groups so one bucket gathers at most this many bytes; None yields whole groups."""
    timeout_s: float = 300.0
    """How long a rank waits for the others at a lockstep check before failing."""

    def __post_init__(self) -> None:
        if self.bucket_bytes is not None and self.bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive or None, got {self.bucket_bytes}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")


@dataclasses.dataclass(kw_only=True, slots=True, frozen=True)
class TensorMeta:
    """Name, shape and dtype of one full (unsharded) tensor, as the engine will see it."""

    name: str
    """Hugging Face checkpoint name."""
    shape: tuple[int, ...]
    """Full shape."""
    dtype: torch.dtype
    """Dtype of the yielded tensor."""

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * self.dtype.itemsize


@dataclasses.dataclass(kw_only=True, slots=True)
class GatherStats:
    """Bytes a source gathered (materialized beyond the trainer's own storage)."""

    live_bytes: int = 0
    """Gathered bytes alive right now."""
    peak_bytes: int = 0
    """Most gathered bytes alive at once since the last reset."""
    num_groups: int = 0
    """Groups (buckets, when split) yielded since the last reset."""

    def add(self, nbytes: int) -> None:
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def release(self, nbytes: int) -> None:
        self.live_bytes -= nbytes

    def reset(self) -> None:
        self.live_bytes = self.peak_bytes = self.num_groups = 0


class WeightSource(abc.ABC):
    """Yields a trainer model's full weights, one layer group at a time."""

    def __init__(self, config: SourceConfig | None = None, /, **options: Any) -> None:
        """Built from a `SourceConfig`, or from its keys (`dtype`, `bucket_bytes`, `timeout_s`)."""
        if config is not None and options:
            raise ValueError(f"pass a SourceConfig or its keys, not both ({sorted(options)})")
        self.config = config if config is not None else SourceConfig(**options)
        self.stats = GatherStats()

    @property
    def dtype(self) -> torch.dtype | None:
        return self.config.dtype

    @abc.abstractmethod
    def metadata(self) -> list[TensorMeta]:
        """Names, full shapes and dtypes, in yield order, without gathering."""

    @abc.abstractmethod
    def groups(self) -> Iterator[Group]:
        """Full tensors, one group at a time; a group is invalid after the next is requested."""

    def drain(self) -> int:
        """Iterate every group without consuming it (ranks without an engine); returns the group count."""
        count = 0
        for _ in self.groups():
            count += 1
        return count

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        return tensor if self.dtype is None else tensor.to(self.dtype)
