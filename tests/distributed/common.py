"""Worker-side helpers for the 2-process tests: models, one training step, references, checks.

Imported by the worker scripts that torchrun / deepspeed start (never by pytest
itself), so it may initialise torch.distributed.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

from rlsync.source import group_key, source_for

LORA_TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def log(msg: str) -> None:
    print(f"[rank {dist.get_rank() if dist.is_initialized() else '?'}] {msg}", flush=True)


def load_model(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def add_lora(model: torch.nn.Module, *, modules_to_save: list[str] | None = None) -> torch.nn.Module:
    """A PEFT LoRA model with random (non-zero) B, so the merge is not a no-op from step 0."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False,
        modules_to_save=modules_to_save,
    )
    return get_peft_model(model, config)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    return [m for m in model.modules() if isinstance(m, Qwen2DecoderLayer)]


def batch(seed: int, vocab: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (2, 24), generator=gen)


def train_step(model, optimizer, *, seed: int, deepspeed_engine=None) -> float:
    """One real optimizer step on a rank-specific batch."""
    ids = batch(seed * 100 + dist.get_rank())
    if deepspeed_engine is not None:
        loss = deepspeed_engine(input_ids=ids, labels=ids).loss
        deepspeed_engine.backward(loss)
        deepspeed_engine.step()
        return float(loss)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(loss)


def reference_params(full_state: dict[str, torch.Tensor], template: torch.nn.Module, *, lora: bool) -> dict:
    """The unsharded model's parameters (tied ones once), merged with PEFT's own merge when LoRA."""
    model = copy.deepcopy(template)
    missing, unexpected = model.load_state_dict(full_state, strict=False)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    assert not unexpected, unexpected
    assert set(missing) <= tied, f"reference state dict lacks {sorted(set(missing) - tied)}"
    if lora:
        model = model.merge_and_unload()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def check_source(label: str, source, expected: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], *,
                 bound: int, consume: bool = True, budget: int | None = None) -> dict:
    """Iterate the source once; on consuming ranks compare with `expected` exactly. Returns measurements."""
    total = sum(t.nbytes for t in expected.values())
    if not consume:
        num = source.drain()
        log(f"{label}: drained {num} groups, peak gathered {source.stats.peak_bytes} B")
        return {"label": label, "drained": num, "peak": source.stats.peak_bytes}
    got: dict[str, torch.Tensor] = {}
    order: list[str] = []
    group_keys: list[list] = []
    for group in source.groups():
        group_keys.append(sorted({group_key(n) for n, _ in group}, key=str))
        for name, tensor in group:
            assert name not in got, f"{label}: {name} yielded twice"
            got[name] = tensor.detach().clone()
            order.append(name)
    assert all(len(keys) == 1 for keys in group_keys), f"{label}: a group mixes layers: {group_keys}"
    assert set(got) == set(expected), f"{label}: names differ: {sorted(set(got) ^ set(expected))}"
    for name, want in expected.items():
        assert got[name].shape == want.shape, f"{label}: {name} shape {got[name].shape} != {want.shape}"
        assert got[name].dtype == want.dtype, f"{label}: {name} dtype {got[name].dtype} != {want.dtype}"
        assert torch.equal(got[name], want), f"{label}: {name} differs by {(got[name] - want).abs().max()}"
    assert [m.name for m in source.metadata()] == order, f"{label}: metadata order != yield order"
    changed = [n for n in got if n in initial and not torch.equal(got[n], initial[n])]
    assert changed, f"{label}: no parameter changed after the optimizer step"
    peak = source.stats.peak_bytes
    assert source.stats.live_bytes == 0, f"{label}: {source.stats.live_bytes} B still counted alive"
    assert peak <= bound, f"{label}: peak gathered {peak} B > bound {bound} B"
    assert peak < total, f"{label}: peak gathered {peak} B is the whole model ({total} B)"
    if budget is not None:
        assert peak <= budget, f"{label}: peak gathered {peak} B > budget {budget} B"
    log(f"{label}: {len(got)} tensors in {source.stats.num_groups} groups equal the reference; "
        f"peak gathered {peak} B (bound {bound} B, model {total} B, {len(changed)} changed by the step)")
    return {"label": label, "tensors": len(got), "groups": source.stats.num_groups, "peak": peak,
            "bound": bound, "model_bytes": total}


def group_bytes(expected: dict[str, torch.Tensor]) -> dict:
    sizes: dict = {}
    for name, t in expected.items():
        key = group_key(name) or "outer"
        sizes[key] = sizes.get(key, 0) + t.nbytes
    return sizes


def lora_bound(trainer_named: dict[str, torch.Size], expected: dict[str, torch.Tensor], itemsize: int = 4) -> int:
    """Largest group's gather when LoRA is merged: its tensors + factors + one merged copy per target."""
    from rlsync.source.names import hf_name, is_trainer_only

    extra: dict = {}
    for raw, shape in trainer_named.items():
        if not is_trainer_only(raw) or "original_module" in raw:
            continue
        key = group_key(hf_name(raw)) or "outer"
        extra[key] = extra.get(key, 0) + torch.Size(shape).numel() * itemsize
    for raw in trainer_named:
        if raw.endswith("base_layer.weight") and any(t in raw for t in LORA_TARGETS):
            name = hf_name(raw)
            key = group_key(name) or "outer"
            extra[key] = extra.get(key, 0) + expected[name].nbytes
    sizes = group_bytes(expected)
    return max(sizes[k] + extra.get(k, 0) for k in sizes)


def ds_config(stage: int) -> dict:
    """A DeepSpeed config for one micro-batch of 2 sequences per rank at ZeRO `stage` (a plain torch optimizer)."""
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }


def zero_full_state(engine) -> dict:
    """The unsharded model's state dict on every rank (ZeRO-3: DeepSpeed's consolidated one, built on rank 0)."""
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # rank 0 only
        box = [state]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def zero3_gathered_peak(name: str, engine, source, available_before: set[str]) -> int:
    """ZeRO-3 after a sync: no parameter left gathered that was not before; then DeepSpeed's own view of the
    bytes gathered at each yield over one more pass, independent of the source's counter (the most at once)."""
    gathered = [n for n, p in engine.module.named_parameters() if p.numel() != 0 and n not in available_before]
    assert not gathered, f"{name}: parameters left gathered after the sync: {gathered[:5]}"
    observed = 0
    for _ in source.groups():
        observed = max(observed, sum(p.ds_numel * p.dtype.itemsize for p in engine.module.parameters() if p.numel() != 0))
    return observed


def zero_local(p: torch.nn.Parameter) -> torch.Tensor:
    """This rank's own storage of `p` (ZeRO-3: its partition)."""
    return (p.ds_tensor if hasattr(p, "ds_tensor") else p).detach()


def checkpoint_of(full_state: dict[str, torch.Tensor], template: torch.nn.Module, path: str) -> dict:
    """What `save_pretrained` writes for the unsharded model holding `full_state` (its in-memory layout), read
    back from the safetensors file: the checkpoint format a source must yield (MoE experts one tensor each).

    Collective: transformers writes on rank 0 only, so every rank calls this and reads rank 0's file.
    """
    from safetensors.torch import load_file

    model = copy.deepcopy(template)  # from_pretrained's weight conversions come along: save_pretrained reverses them
    missing, unexpected = model.load_state_dict(full_state, strict=False)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    assert not unexpected and set(missing) <= tied, (missing, unexpected)
    model.save_pretrained(path)
    dist.barrier()
    return load_file(os.path.join(path, "model.safetensors"))


def moe_copy_bytes(model: torch.nn.Module) -> dict:
    """Bytes per layer group that a source's checkpoint conversion copies: none. transformers' own `Chunk` copies
    each fused `experts.gate_up_proj` into gate and up; rlsync runs it as views (`rlsync.source.convert`), and
    `down_proj` splits into views anyway."""
    sizes = {group_key(name): 0 for name, _ in model.named_parameters() if name.endswith("experts.gate_up_proj")}
    assert sizes, f"{type(model).__name__} has no fused experts"
    return sizes


def write_result(results: list[dict]) -> None:
    out = os.environ.get("RLSYNC_TEST_OUT")
    if out:
        with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
            json.dump(results, f)


def main_guard(fn) -> None:
    """Run `fn`; on failure print the error and exit non-zero (the launcher then fails)."""
    try:
        fn()
    except BaseException as exc:
        log(f"FAILED: {type(exc).__name__}: {exc}")
        raise
    sys.exit(0)


__all__ = ["source_for"]
