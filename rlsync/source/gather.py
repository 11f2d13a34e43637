"""The pipeline every trainer source shares: plan, bucket, gather, merge, yield, free.

A backend (plain, FSDP1, FSDP2, ZeRO-3) only says which parameters the model
has (`_entries`: raw name, full shape, dtype) and how to materialize a set of
them in full (`_gather`, plus `_scope` for backends whose unit of gathering is
coarser than a tensor). Everything else lives here once: Hugging Face names,
LoRA merging (`lora.py`), checkpoint format where transformers keeps another
layout in memory (`convert.py`: fused MoE experts back to per-expert tensors,
after the gather of the bucket that holds them), tied weights yielded once,
grouping by layer, the byte budget, lockstep checks between ranks
(`lockstep.py`) and the count of gathered bytes alive.

Conversions kept across syncs: where a backend hands over the trainer's own
tensors (`own_storage`: a plain module, DDP, ZeRO-1/2) and a bucket's
conversion yields only views of them, the converted group is kept (weakly per
model) and yielded again while every input still lies in the same memory with
the same shape, stride and dtype: the views then show the trainer's current
values, and transformers' ops need not run per expert every step. A cast, a
LoRA merge, a gathered copy or a re-allocated parameter converts again.

Byte accounting: an item costs the bytes its gather materializes (full
tensors of sharded parameters, counted by the backend) plus the bytes rlsync
derives from them (merged LoRA weights, dtype casts). A bucket's bytes are
added to `stats` when gathered and released when the consumer asks for the
next bucket, so `stats.peak_bytes` is the most that was alive at once. A
checkpoint conversion adds the bytes of outputs that are not views of its
inputs (none for MoE experts: a fused `gate_up_proj` and `down_proj` split
into views, `convert._view_chunk`).

FSDP1 gathers whole wrapped units in `_scope` and counts them there; its
items cost only their derived bytes (see `fsdp.py`, limitation 2).

Limitations:
1. A single item larger than `bucket_bytes` (one huge embedding, or a LoRA
   base weight with its factors and merged copy) forms a bucket of its own,
   which exceeds the budget; parameters are never split, nor are the inputs
   of one checkpoint conversion (a fused expert tensor, or several tensors
   transformers converts together).
2. Only parameters are yielded, not buffers (Hugging Face checkpoints of the
   supported architectures hold none that the engine loads).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from rlsync.errors import ConfigError
from rlsync.source.base import Group, SourceConfig, TensorMeta, WeightSource
from rlsync.source.convert import Conversion, checkpoint_format
from rlsync.source.lockstep import Lockstep, LockstepError, distributed_world
from rlsync.source.lora import LoraPlan, lora_plan, merged_weight
from rlsync.source.names import group_key, hf_name, is_trainer_only
from rlsync.source.stacked import Stack, StackedGroup


@dataclasses.dataclass(kw_only=True, slots=True)
class Entry:
    """One trainer parameter, possibly sharded."""

    raw: str
    """Name as the (wrapped) trainer model registers it."""
    shape: tuple[int, ...]
    """Full (unsharded) shape."""
    dtype: torch.dtype
    """The parameter's dtype."""
    param: torch.Tensor | None = None
    """The trainer's parameter object, where the backend reads it directly."""
    owner: Any = None
    """Backend-specific handle (the FSDP1 unit that owns it)."""

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


@dataclasses.dataclass(kw_only=True, slots=True)
class Item:
    """One yielded tensor and the entries needed to produce it."""

    name: str
    """Hugging Face name."""
    entries: list[Entry]
    """The parameter itself first, then LoRA factors (A, B per adapter)."""
    lora: list = dataclasses.field(default_factory=list)
    """`lora.Factor`s to merge into the first entry."""
    conversion: Conversion | None = None
    """How the tensor becomes checkpoint tensors (shared by items converted together); None: yielded as `name`."""


@dataclasses.dataclass(kw_only=True, slots=True)
class GroupPlan:
    key: str
    """Printable group name (e.g. `model.layers.3`, `model.embed_tokens`)."""
    buckets: list[list[Item]]


def split_buckets(items: Sequence[Item], costs: Sequence[int], budget: int | None,
                  units: Sequence[object] | None = None) -> list[list[Item]]:
    """Consecutive items packed greedily into buckets of at most `budget` bytes (see limitation 1).

    `units`: a key per item; consecutive items with the same (non-None) key stay in one bucket.
    """
    if budget is None:
        return [list(items)] if items else []
    units = units if units is not None else [None] * len(items)
    buckets: list[list[Item]] = []
    current: list[Item] = []
    used = 0
    previous: object = None
    for item, cost, unit in zip(items, costs, units, strict=True):
        joined = unit is not None and unit is previous
        previous = unit
        if current and used + cost > budget and not joined:
            buckets.append(current)
            current, used = [], 0
        current.append(item)
        used += cost
    if current:
        buckets.append(current)
    return buckets


class GatheringSource(WeightSource):
    """A `WeightSource` built from a backend's entries and gather; see the module docstring."""

    #: Whether `_gather`/`_scope` run collectives (then ranks check lockstep before each).
    collective: bool = False
    #: Whether `_gather` hands over the trainer's own parameter tensors (not gathered copies): then a bucket's
    #: checkpoint conversion made only of views is kept for the next sync (`_finish`).
    own_storage: bool = False

    def __init__(self, model: torch.nn.Module, config: SourceConfig | None = None, /, *, lora: LoraPlan | None = None,
                 **options: Any) -> None:
        super().__init__(config, **options)
        self.model = model
        self.lora = lora if lora is not None else lora_plan(model)
        self.format = checkpoint_format(model)

    # ------------------------------------------------------------ backend
    @abc.abstractmethod
    def _entries(self) -> list[Entry]:
        """Every trainer parameter once (tied ones deduplicated), in model order."""

    @abc.abstractmethod
    def _gather(self, entries: list[Entry]) -> contextlib.AbstractContextManager[list[torch.Tensor]]:
        """Full tensors of `entries` (in order), valid inside the context."""

    def _gathered_nbytes(self, entries: list[Entry]) -> int:
        """Bytes `_gather(entries)` materializes beyond the trainer's storage."""
        return 0

    def _scope(self, entries: list[Entry]) -> contextlib.AbstractContextManager[int]:
        """Held around all buckets of one group; yields the bytes it gathered."""
        return contextlib.nullcontext(0)

    # ------------------------------------------------------------ planning
    def _items(self) -> list[Item]:
        entries = self._entries()
        by_raw = {e.raw: e for e in entries}
        items: list[Item] = []
        seen: dict[str, str] = {}
        for entry in entries:
            if is_trainer_only(entry.raw) or entry.raw in self.lora.skip:
                continue
            name = hf_name(entry.raw)
            if name in seen:
                raise ValueError(f"trainer parameters {seen[name]!r} and {entry.raw!r} both map to {name!r}")
            seen[name] = entry.raw
            factors = self.lora.factors.get(entry.raw, [])
            needed = [entry]
            for factor in factors:
                needed += [by_raw[factor.a], by_raw[factor.b]]
            items.append(Item(name=name, entries=needed, lora=factors))
        if self.format is not None:
            conversions = self.format.plan([item.name for item in items])
            for item in items:
                conversion = conversions[item.name]
                if conversion.converter is not None or conversion.output_name != item.name:
                    item.conversion = conversion
        return items

    def _derived_nbytes(self, item: Item) -> int:
        base = item.entries[0]
        out_dtype = self.dtype or base.dtype
        merged = base.nbytes if item.lora else 0
        cast = torch.Size(base.shape).numel() * out_dtype.itemsize if out_dtype != base.dtype else 0
        # a conversion's outputs are at most as large as its inputs (split, chunk, concatenate, transpose)
        converted = torch.Size(base.shape).numel() * out_dtype.itemsize if self._converts(item) else 0
        return merged + cast + converted

    @staticmethod
    def _converts(item: Item) -> bool:
        return item.conversion is not None and item.conversion.converter is not None

    def _item_cost(self, item: Item) -> int:
        return self._gathered_nbytes(item.entries) + self._derived_nbytes(item)

    def plan(self) -> list[GroupPlan]:
        """Groups (consecutive items with one `group_key`) split into buckets."""
        plans: list[GroupPlan] = []
        run: list[Item] = []
        for item in self._items():
            if run and group_key(item.name) != group_key(run[-1].name):
                plans.append(self._group_plan(run))
                run = []
            run.append(item)
        if run:
            plans.append(self._group_plan(run))
        return plans

    def _group_plan(self, items: list[Item]) -> GroupPlan:
        key = group_key(items[0].name) or items[0].name.rsplit(".", 1)[0]
        names = {item.name for item in items}
        for item in items:
            if self._converts(item) and not names.issuperset(item.conversion.input_names):
                raise ConfigError(
                    f"{item.name}: transformers converts it together with {item.conversion.input_names}, which "
                    f"span more than one layer group; rlsync converts one layer group at a time"
                )
        # the inputs of one conversion sit next to each other (at the first one's place), so no bucket splits them
        order: dict[int, list[Item]] = {}
        for item in items:
            order.setdefault(id(item.conversion) if self._converts(item) else id(item), []).append(item)
        items = [item for run in order.values() for item in run]
        costs = [self._item_cost(item) for item in items]
        units = [item.conversion if self._converts(item) else None for item in items]
        return GroupPlan(key=f"group {key}", buckets=split_buckets(items, costs, self.config.bucket_bytes, units))

    def metadata(self) -> list[TensorMeta]:
        metas: list[TensorMeta] = []
        for group in self.plan():
            for bucket in group.buckets:
                values = [
                    torch.empty(item.entries[0].shape, dtype=self.dtype or item.entries[0].dtype, device="meta")
                    for item in bucket
                ]
                metas += [TensorMeta(name=name, shape=tuple(t.shape), dtype=t.dtype)
                          for name, t in _checkpoint_format(bucket, values)]
        return metas

    # ------------------------------------------------------------ iteration
    def groups(self) -> Iterator[Group]:
        self.stats.reset()
        lockstep = Lockstep(self.config.timeout_s) if self.collective and distributed_world() > 1 else None
        where = "the first group"
        try:
            for group in self.plan():
                where = group.key
                if lockstep is not None:
                    lockstep.check(where)
                group_entries = [e for bucket in group.buckets for item in bucket for e in item.entries]
                with self._scope(group_entries) as scope_bytes:
                    self.stats.add(scope_bytes)
                    for index, bucket in enumerate(group.buckets):
                        if index and lockstep is not None:
                            lockstep.check(f"{where} (bucket {index})")
                        yield from self._bucket(bucket)
                    self.stats.release(scope_bytes)
            if lockstep is not None:
                lockstep.check("the end of the sync")
        except BaseException as exc:
            if lockstep is None or isinstance(exc, LockstepError):
                raise  # a LockstepError already ended the round protocol
            if isinstance(exc, GeneratorExit):
                exc = RuntimeError(f"the consumer stopped iterating at {where}")
                lockstep.fail(where, exc)
                raise
            peer_error = lockstep.fail(where, exc)
            if peer_error is not None:
                raise peer_error from exc
            raise

    def _bucket(self, bucket: list[Item]) -> Iterator[Group]:
        entries = [e for item in bucket for e in item.entries]
        gathered = self._gathered_nbytes(entries)
        with self._gather(entries) as full:
            self.stats.add(gathered)
            with torch.no_grad():
                out, derived = self._finish(bucket, full)
            del full
            self.stats.add(derived)
            self.stats.num_groups += 1
            yield out
            del out
        self.stats.release(gathered + derived)

    def _finish(self, bucket: list[Item], full: list[torch.Tensor]) -> tuple[Group, int]:
        """Merge LoRA and cast: the yielded tensors, and the bytes derived beyond the gather."""
        out: Group = []
        derived = 0
        pos = 0
        for item in bucket:
            tensors = full[pos: pos + len(item.entries)]
            pos += len(item.entries)
            value = tensors[0].detach()
            if item.lora:
                value = merged_weight(value, [(f, tensors[1 + 2 * i], tensors[2 + 2 * i]) for i, f in enumerate(item.lora)])
                derived += value.nbytes
            cast = self._cast(value)
            if cast.data_ptr() != value.data_ptr():
                derived += cast.nbytes
            out.append((item.name, cast))
        if any(item.conversion is not None for item in bucket):
            # The trainer's own tensors where the last sync found them: its conversion (views of them, so of
            # their current values) still holds, and transformers' ops need not run per expert again.
            kept = _CONVERTED.setdefault(self.model, {}) if self.own_storage and not derived else None
            names = tuple(item.name for item in bucket)
            where = (self.format.signature if self.format else None, tuple(_where(t) for _, t in out))
            cached = kept.get(names) if kept is not None else None
            if cached is not None and cached[0] == where:
                return (cached[1] if isinstance(cached[1], StackedGroup) else list(cached[1])), 0
            inputs = {t.untyped_storage().data_ptr() for _, t in out}
            parts = _checkpoint_format(bucket, [t for _, t in out], stacked=True)
            # a stack's slices share its tensor's storage: one look per stack, not per expert
            new = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                   for t in (p.tensor if isinstance(p, Stack) else p[1] for p in parts)}
            copies = sum(nbytes for ptr, nbytes in new.items() if ptr not in inputs)
            out = StackedGroup(parts) if any(isinstance(p, Stack) for p in parts) else parts
            if kept is not None and not copies:  # views only: never a stale value
                kept[names] = (where, out if isinstance(out, StackedGroup) else tuple(out))
            derived += copies
        return out, derived


_CONVERTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Per trainer model (held weakly; a sync builds a new source each step): bucket names -> (the conversion's
signature and where the bucket's inputs lie, its converted group), for `own_storage` sources (`_finish`). It
holds views of the trainer's own tensors only: no bytes of its own while those tensors stay where they are."""


def _where(t: torch.Tensor) -> tuple:
    """Which memory a tensor views, and how (a live storage's address is its own while it is alive)."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device


def _checkpoint_format(bucket: list[Item], values: list[torch.Tensor], stacked: bool = False) -> list:
    """The bucket's tensors (in item order) under checkpoint names and layout; unconverted items pass through.
    `stacked`: runs of slices of one tensor come as one `Stack` (`Conversion.apply_stacked`)."""
    by_name = {item.name: value for item, value in zip(bucket, values, strict=True)}
    out: list = []
    done: set[int] = set()
    for item, value in zip(bucket, values, strict=True):
        conversion = item.conversion
        if conversion is None:
            out.append((item.name, value))
        elif id(conversion) not in done:
            done.add(id(conversion))
            assert all(name in by_name for name in conversion.input_names), "a conversion was split across buckets"
            inputs = [by_name[name] for name in conversion.input_names]
            out += conversion.apply_stacked(inputs) if stacked else conversion.apply(inputs)
    return out
