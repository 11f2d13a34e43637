"""Checkpoint format from transformers' in-memory layout, with transformers' own conversion mapping.

Why: transformers 5 keeps some weights in a layout its checkpoints do not use
(MoE experts fused into 3-D `experts.gate_up_proj` / `experts.down_proj`,
Mixtral's `block_sparse_moe` renamed `mlp`). `from_pretrained` converts with a
per-model list of `WeightRenaming` / `WeightConverter` transforms
(`conversion_mapping.get_model_conversion_mapping`), and `save_pretrained`
writes the checkpoint back with their reverses (`revert_weight_conversion`).
The engine loads checkpoint names, so a source must yield what
`save_pretrained` would write. `CheckpointFormat` is `revert_weight_conversion`
taken apart so it runs on one layer group at a time: the reversed transforms
are built once per source, `plan` tells which in-memory tensors one reverse
converter consumes together (they must travel in one bucket), and
`Conversion.apply` runs that converter on gathered tensors or on meta tensors
(for `metadata()`, without gathering).

What this module deliberately does not do: keep its own per-architecture
table. Whatever transformers' mapping says is what is yielded, with one
difference of layout, not of values: transformers' `Chunk` op runs as views
(`_view_chunk`), so a fused `gate_up_proj` is not copied whole every sync.

Limitations:
1. Needs transformers >= 5 (its `core_model_loading` module); older versions
   keep checkpoint layout in memory, so `checkpoint_format` returns None.
2. A transform transformers cannot reverse (an op without `reverse_op`, or a
   mapping carrying a quantization op from a quantized `from_pretrained`)
   raises `ConfigError` naming the in-memory tensor it applies to; it is only
   an error when some yielded tensor matches it.
3. Only the outermost `PreTrainedModel` is looked at (as `save_pretrained`
   does); its mapping covers nested sub-models through scope prefixes.
4. Reverse converters run on whole in-memory tensors: a group never splits a
   converter's inputs across buckets, so `bucket_bytes` cannot split one fused
   expert tensor (see `gather.py`, limitation 1).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import sys
from typing import Any

import torch
from torch import nn

from rlsync.errors import ConfigError
from rlsync.source.names import hf_name
from rlsync.source.stacked import Stack

_MIN_TRANSFORMERS_MAJOR = 5


@dataclasses.dataclass(kw_only=True, slots=True, eq=False)
class Conversion:
    """In-memory tensors that become checkpoint tensors together (one reverse transform instance)."""

    key: str
    """The first checkpoint name (transformers' key for this converter instance)."""
    sources: list[tuple[str, str | None]] = dataclasses.field(default_factory=list)
    """(in-memory name, the converter source pattern it matched), in model order."""
    converter: Any = None
    """transformers' reversed `WeightConverter` (a template, copied per apply); None for a rename."""
    model: Any = None
    """The `PreTrainedModel` whose config the converter may read."""
    prefix: str = ""
    """Names of the `PreTrainedModel` inside the yielded names start with this."""

    @property
    def input_names(self) -> list[str]:
        """Yielded (in-memory) names of the tensors `apply` takes, in order."""
        return [self.prefix + name for name, _ in self.sources]

    @property
    def output_name(self) -> str:
        """The checkpoint name of a rename (the first one, for a converter)."""
        return self.prefix + self.key

    def apply(self, tensors: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        """Checkpoint `(name, tensor)`s from the tensors of `sources`, in order (meta tensors allowed)."""
        if self.converter is None:
            (tensor,) = tensors
            return [(self.prefix + self.key, tensor)]
        return self._apply(tensors, [])

    def _apply(self, tensors: list[torch.Tensor], runs: list) -> list[tuple[str, torch.Tensor]]:
        converter = copy.deepcopy(self.converter)  # transformers keeps one instance per target key
        for op in converter.operations:
            if isinstance(op, _stack_split()):
                op.runs = runs  # it appends each (targets, tensor, slices) it splits
        for (name, pattern), tensor in zip(self.sources, tensors, strict=True):
            converter.add_tensor(self.key, name, pattern, tensor)
        try:
            out = converter.convert(self.key, model=self.model, config=self.model.config)
        except (ValueError, RuntimeError, NotImplementedError, KeyError, IndexError) as exc:
            names = [self.prefix + name for name, _ in self.sources]
            raise ConfigError(
                f"transformers could not convert {names} to checkpoint format with {self.converter!r}: {exc}"
            ) from exc
        return [(self.prefix + name, value[0] if isinstance(value, list) else value) for name, value in out.items()]

    def apply_stacked(self, tensors: list[torch.Tensor]) -> list[tuple[str, torch.Tensor] | Stack]:
        """`apply`, with each run of outputs that are one tensor's slices (`_stack_split`) as one `Stack`."""
        if self.converter is None:
            return self.apply(tensors)
        runs: list[tuple[tuple[str, ...], torch.Tensor, tuple[torch.Tensor, ...]]] = []
        pairs = self._apply(tensors, runs)
        index = {id(value): i for i, (_, value) in enumerate(pairs)}
        starts: dict[int, Stack] = {}
        for _, tensor, slices in runs:
            first = index.get(id(slices[0])) if slices else None
            run = pairs[first:first + len(slices)] if first is not None else []
            # the run stands only if a later op changed none of its outputs and they come out in order
            if len(run) == len(slices) and all(value is s for (_, value), s in zip(run, slices, strict=True)):
                starts[first] = Stack(tuple(name for name, _ in run), tensor)
        out: list[tuple[str, torch.Tensor] | Stack] = []
        i = 0
        while i < len(pairs):
            stack = starts.get(i)
            out.append(pairs[i] if stack is None else stack)
            i += 1 if stack is None else len(stack.names)
        return out


class CheckpointFormat:
    """transformers' reversed weight conversions for one model, applied a few tensors at a time."""

    def __init__(self, model: nn.Module, prefix: str, transforms: list[Any]) -> None:
        from transformers.core_model_loading import WeightConverter, WeightRenaming, WeightTransform

        self.model = model
        self.prefix = prefix
        # as revert_weight_conversion: sub-model transforms first, each reversed
        reversed_: list[Any] = []
        self.irreversible: list[tuple[Any, Any, str]] = []  # (matcher of in-memory names, transform, why)
        for transform in transforms[::-1]:
            try:
                reversed_.append(transform.reverse_transform())
            except (NotImplementedError, ValueError) as exc:
                matcher = WeightTransform(list(transform._original_target_patterns),
                                          list(transform._original_source_patterns))
                matcher.scope_prefix, matcher.base_model_prefix = transform.scope_prefix, transform.base_model_prefix
                self.irreversible.append((matcher, transform, f"{type(exc).__name__}: {exc}"))
        self.signature = tuple((repr(t), [(type(op).__name__, repr(vars(op))) for op in getattr(t, "operations", ())])
                               for t in reversed_)
        """What the conversion does (transforms, their ops and settings): equal signatures, equal outputs."""
        self.renamings = [t for t in reversed_ if isinstance(t, WeightRenaming)]
        self.converters = [t for t in reversed_ if isinstance(t, WeightConverter)]
        for converter in self.converters:
            converter.operations = [_as_views(op) for op in converter.operations]
        self._by_pattern = {pattern: c for c in self.converters for pattern in c.source_patterns}

    def plan(self, names: list[str]) -> dict[str, Conversion]:
        """For each (yielded, in-memory) name, its `Conversion`; names that share one convert together."""
        from transformers.core_model_loading import rename_source_key

        out: dict[str, Conversion] = {}
        by_key: dict[str, Conversion] = {}
        for name in names:
            if not name.startswith(self.prefix):
                out[name] = Conversion(key=name, sources=[(name, None)], model=self.model)  # outside the model
                continue
            local = name[len(self.prefix):]
            for matcher, transform, why in self.irreversible:
                if matcher._scoped_match(local) is not None:
                    raise ConfigError(
                        f"{name}: transformers cannot reverse its weight conversion {transform!r} ({why}), so "
                        f"rlsync cannot yield this tensor in checkpoint format"
                    )
            key, pattern = rename_source_key(local, self.renamings, self.converters, reverse=True)
            if pattern is None:
                out[name] = Conversion(key=key, sources=[(local, None)], model=self.model, prefix=self.prefix)
                continue
            conversion = by_key.get(key)
            if conversion is None:
                conversion = by_key[key] = Conversion(
                    key=key, converter=self._by_pattern[pattern], model=self.model, prefix=self.prefix,
                )
            conversion.sources.append((local, pattern))
            out[name] = conversion
        return out


@functools.cache
def _view_chunk() -> type:
    """transformers' `Chunk` op (the reverse of `Concatenate`: a fused `gate_up_proj` split into gate and up)
    returning views of its input where `Chunk` copies each chunk into contiguous memory.

    Why: that copy was the largest single cost of an MoE sync (about a third of a 256-expert FP8 replay) and a
    temporary as large as the layer's fused gate and up projections. Every consumer of a source's tensors (the
    engine's loaders, rlsync's copies and quantizers) reads strided rows; the values, shapes and names are
    `Chunk`'s (`tests/unit/test_source_moe.py` compares them with transformers' own op and checkpoint).
    """
    from transformers.core_model_loading import Chunk

    class ViewChunk(Chunk):
        @torch.no_grad()
        def convert(self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str],
                    **kwargs: Any) -> dict[str, torch.Tensor]:
            if len(input_dict) > 1:
                raise ValueError("Undefined Operation encountered")  # as Chunk
            tensors = next(iter(input_dict.values()))
            tensor = tensors[0] if isinstance(tensors, list) else tensors
            targets = self.get_target_patterns(target_patterns, **kwargs)
            return dict(zip(targets, torch.chunk(tensor, len(targets), dim=self.dim), strict=False))

    return ViewChunk


@functools.cache
def _stack_split() -> type:
    """transformers' `SplitModulelist` (the reverse of `MergeModulelist`: fused experts split into one tensor
    each) that also records each split whose slices form a `Stack` (`stacked.py`: the engine then takes the
    run of experts as one tensor). Same outputs, same views: a split along dim 0 with no other dimension of
    size 1 is `tensor.unbind(0)`, which is what `chunk(...).squeeze()` gives there; anything else runs
    `SplitModulelist` itself and forms no stack."""
    from transformers.core_model_loading import SplitModulelist

    class StackSplit(SplitModulelist):
        runs: list | None = None

        @torch.no_grad()
        def convert(self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str],
                    **kwargs: Any) -> dict[str, torch.Tensor]:
            out: dict[str, torch.Tensor] = {}
            for source_pattern, tensors in input_dict.items():  # SplitModulelist.convert, with unbind where it may
                tensor = tensors[0] if isinstance(tensors, list) else tensors
                sizes = tensor.size(self.dim)
                targets = self.get_target_patterns(input_dict, source_pattern, target_patterns, sizes)
                if self.dim == 0 and tensor.dim() >= 2 and 1 not in tensor.shape[1:] and self.runs is not None:
                    slices = tensor.unbind(0)
                    self.runs.append((tuple(targets), tensor, slices))
                else:
                    slices = tuple(chunk.squeeze() for chunk in torch.chunk(tensor, sizes, dim=self.dim))
                out.update(zip(targets, slices, strict=False))
            return out

    return StackSplit


def _as_views(op: Any) -> Any:
    """`op`, or for exactly transformers' `Chunk` a `ViewChunk` and for exactly its `SplitModulelist` a
    `StackSplit`, with the same settings."""
    from transformers.core_model_loading import Chunk, SplitModulelist

    cls = {Chunk: _view_chunk, SplitModulelist: _stack_split}.get(type(op))
    if cls is None:
        return op
    view = cls().__new__(cls())
    view.__dict__.update(op.__dict__)
    return view


def checkpoint_format(model: nn.Module) -> CheckpointFormat | None:
    """Reversed conversions of the outermost transformers model inside `model` (any wrapping); None if none apply."""
    if "transformers" not in sys.modules:  # a model cannot be a transformers model unless it was imported
        return None
    import transformers
    from transformers import PreTrainedModel

    found = next(((path, m) for path, m in model.named_modules() if isinstance(m, PreTrainedModel)), None)
    if found is None:
        return None
    major = int(transformers.__version__.split(".", 1)[0])
    if major < _MIN_TRANSFORMERS_MAJOR:
        return None  # transformers 4 keeps checkpoint layout in memory
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    path, hf_model = found
    transforms = getattr(hf_model, "_weight_conversions", None)
    if transforms is None:  # built from a config, not from_pretrained: as revert_weight_conversion
        transforms = get_model_conversion_mapping(hf_model, add_legacy=False)
        transforms = [t for t in transforms if not isinstance(t, PrefixChange)]
    if not transforms:
        return None
    prefix = hf_name(f"{path}.x")[:-1] if path else ""  # "" or "outer.": wrapper segments dropped as for every name
    return CheckpointFormat(hf_model, prefix, list(transforms))
