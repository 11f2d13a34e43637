"""Proof that a sync wrote every engine tensor with the right bits.

For each engine parameter we derive, from the trainer's checkpoint-named
tensors, exactly what the engine must hold: fused parameters (`qkv_proj`,
`gate_up_proj`) are the concatenation of their shards; unquantized tensors are
the cast to the engine dtype; FP8 tensors are the reference quantization
(`rlsync.quant.reference`) of the bf16 cast. The comparison is on raw bits, so
NaN never passes and -0.0 differs from 0.0.

How each quantized layer is derived comes from its quant method
(`rlsync.quant.expected.kernel_reference`: the method itself, or a registry
keyed by type); a method without a reference fails verify, naming it.
The pass reads the source again group by group, so memory stays bounded.

Fused MoE experts (vLLM's `RoutedExperts`) are derived per expert: the
layer's own expert mapping names the checkpoint tensors of each expert's
`w13_weight` rows (gate, then up) and `w2_weight`; the stacked experts go
through the quant method's expert reference (`expected.expert_reference`:
rlsync's FP8 experts, or vLLM's kernel-format processing for engine-dtype
experts).

Verify is total or it fails: every parameter of every engine module the
checkpoint feeds is a tensor the sync wrote, and each is compared. A module
whose parameters verify cannot derive (a layer type it does not know, or a
kernel tensor the reference does not produce) raises `SyncError` naming the
layer type and the tensors, never a silent skip; `verify_groups` returns
(compared, written) and they are equal.

Tensor parallelism: each rank derives the part of every full tensor its own
layers hold (`rlsync.adapters.vllm_tp.local_param`: output rows, input
columns, vocabulary rows, expert slices) and compares its own kernel tensors,
so a TP group is verified rank by rank; each rank's report counts its tensors.

Limitation: parameters only (buffers such as rotary caches are not checkpoint data).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from rlsync.adapters.vllm_layers import expert_checkpoint_names, is_routed_experts, read_kernel_tensor
from rlsync.adapters.vllm_tp import local_expert_shard, local_param
from rlsync.errors import SyncError
from rlsync.quant.expected import expert_reference, kernel_reference

Weights = Iterable[tuple[str, torch.Tensor]]
"""One group of checkpoint-named full tensors."""


@dataclasses.dataclass(kw_only=True, slots=True)
class _Item:
    module_name: str
    module: nn.Module
    sources: dict[str, list[str]]
    """Engine param name ('weight', 'bias') -> checkpoint names whose concatenation it loads."""
    experts: dict[str, list[list[str]]] | None = None
    """Fused MoE experts: param ('w13_weight', 'w2_weight') -> per expert, the names its rows load."""


def weight_sources(module_name: str, packed: dict[str, list[str]], param: str = "weight") -> list[str]:
    """Checkpoint names whose concatenation an engine module's `param` loads (fused shards in order)."""
    prefix, _, leaf = module_name.rpartition(".")
    return [f"{prefix}.{s}.{param}" if prefix else f"{s}.{param}" for s in packed.get(leaf, [leaf])]


def checkpoint_sources(model: nn.Module, packed: dict[str, list[str]]) -> list[_Item]:
    """For each engine module with parameters, which checkpoint tensors feed which parameter.

    A tied follower (an LM head sharing the embedding) gets its own item with
    the owner's checkpoint names, so its kernel state is checked too.
    """
    items = []
    owner_sources: dict[int, list[str]] = {}
    unreadable = []
    for module_name, module in model.named_modules():
        names = [n for n, _ in module.named_parameters(recurse=False)]
        if is_routed_experts(module):
            experts = expert_checkpoint_names(module)
            items.append(_Item(module_name=module_name, module=module, experts=experts,
                               sources={p: [n for names in per_expert for n in names] for p, per_expert in experts.items()}))
            continue
        if names and "weight" not in names:
            unreadable.append(f"{module_name} ({type(module).__name__}: {', '.join(names)})")
            continue
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if n in ("weight", "bias")]
        if not own:
            continue
        sources = {}
        for n, p in own:
            sources[n] = owner_sources.setdefault(id(p), weight_sources(module_name, packed, n))
        items.append(_Item(module_name=module_name, module=module, sources=sources))
    if unreadable:
        raise SyncError(f"verify cannot read {len(unreadable)} layer(s) of a type it does not know, e.g. "
                        + "; ".join(unreadable[:3]))
    return items


def kernel_param_count(items: list[_Item]) -> int:
    """Engine tensors the sync writes: every parameter of every module the checkpoint feeds."""
    return sum(len(list(item.module.named_parameters(recurse=False))) for item in items)


def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()])


def expected_tensors(item: _Item, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What `item.module`'s parameters must hold, from checkpoint-named tensors."""
    method = getattr(item.module, "quant_method", None)
    try:
        ref = expert_reference(method) if item.experts is not None else kernel_reference(method)
    except SyncError as exc:
        raise type(exc)(f"verify: {exc} ({item.module_name})") from exc
    if item.experts is not None:
        dtype = getattr(item.module, "orig_dtype", None) or item.module.w13_weight.dtype
        shard_ids = {"w13_weight": ("w1", "w3"), "w2_weight": ("w2",)}
        stacked = {p: torch.stack([torch.cat([local_expert_shard(item.module, tensors[n], s)
                                              for n, s in zip(names, shard_ids[p])]) for names in per_expert]).to(dtype)
                   for p, per_expert in item.experts.items()}
        return ref(item.module, stacked["w13_weight"], stacked["w2_weight"])
    out: dict[str, torch.Tensor] = {}
    for pname, names in item.sources.items():
        current = read_kernel_tensor(item.module, pname)
        full = local_param(item.module, pname, [tensors[n] for n in names])
        if pname == "weight" and ref is not None:
            dtype = getattr(item.module, "orig_dtype", torch.bfloat16)
            out.update(ref(item.module, full.to(dtype)))
        else:
            # through the dtype vLLM's loader cast it to (`params_dtype`): on AMX CPUs processing keeps a small
            # linear's bias in float32 for vLLM's sgl GEMM, which holds bf16-rounded values, not the trainer's
            load = getattr(item.module, "params_dtype", None)
            out[pname] = (full if load is None else full.to(load)).to(current.dtype)
    return out


def verify_groups(model: nn.Module, packed: dict[str, list[str]], groups: Iterable[Weights],
                  received: set[str]) -> tuple[int, int]:
    """Compare every engine parameter with its reference; return (compared, written), which are equal.

    A fused parameter whose shards arrive in different groups (a source with a
    byte budget splits layers into buckets) is checked once all its shards have
    arrived; until then those shards are held as copies, because a source may
    free a group's storage when the next group is gathered.

    Raises `SyncError` naming the first parameters that were not written this
    sync (a source name missing from `received`) or whose bits differ.
    """
    items = checkpoint_sources(model, packed)
    written = kernel_param_count(items)
    pending = {id(it): it for it in items}
    problems: list[str] = []
    checked = 0
    held: dict[str, torch.Tensor] = {}
    for group in groups:
        held.update(group)
        for key, item in list(pending.items()):
            names = [n for ns in item.sources.values() for n in ns]
            if not all(n in held for n in names):
                continue
            del pending[key]
            missing = [n for n in names if n not in received]
            if missing:
                problems.append(f"{item.module_name}: not written this sync ({', '.join(missing)})")
                continue
            expected = expected_tensors(item, held)
            uncompared = sorted({n for n, _ in item.module.named_parameters(recurse=False)} - set(expected))
            if uncompared:
                problems.append(f"{item.module_name}: verify cannot derive {', '.join(uncompared)} "
                                f"({type(item.module).__name__} with {type(getattr(item.module, 'quant_method', None)).__name__})")
            for pname, want in expected.items():
                have = read_kernel_tensor(item.module, pname)
                checked += 1
                if have.shape != want.shape or have.dtype != want.dtype:
                    problems.append(f"{item.module_name}.{pname}: {tuple(have.shape)}/{have.dtype} != {tuple(want.shape)}/{want.dtype}")
                elif not torch.equal(_bits(have), _bits(want)):
                    problems.append(f"{item.module_name}.{pname}: bits differ from the reference")
        still_needed = {n for it in pending.values() for ns in it.sources.values() for n in ns}
        fresh = {n for n, _ in group}
        held = {n: (t.clone() if n in fresh else t) for n, t in held.items() if n in still_needed}
        del group
    for item in pending.values():
        problems.append(f"{item.module_name}: no checkpoint tensors for it in the source")
    if not problems and checked != written:
        problems.append(f"compared {checked} engine tensors but the sync wrote {written}")
    if problems:
        raise SyncError("verify failed: " + "; ".join(problems[:8]) + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""))
    return checked, written
