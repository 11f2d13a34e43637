"""A vLLM-shaped Qwen2 model in plain torch, for reloading where vLLM is not installed.

The GPU machine has torch but no vLLM, so `gpu_reload.py` cannot build a real
engine. This module builds what rlsync's reload sees of one: fused
`qkv_proj` / `gate_up_proj` linears whose weight loaders place checkpoint
shards (`q`/`k`/`v`, `0`/`1`) in their rows, a `load_weights` that maps
Hugging Face names onto them, and, for FP8, a quant method that mirrors
rlsync's `rlsync_fp8` plugin (`rlsync.quant.vllm_plugin`): bf16 `weight` at
load, quantized by `process_weights_after_loading` with
`fp8_linear.quantize_full`, then an arrival loader that quantizes each shard
straight into kernel storage with `fp8_linear.quantize_shard_into` (the
plugin's own math, `rlsync_arrival = True`). Without FP8 the layers are plain
bf16 and reload through rlsync's swap path (restore load format, load, copy
back).

It is not a model that runs: no forward pass, only parameters and loaders.

Limitations:
1. No attention layers, rotary buffers or tied heads (the shape here is
   untied, like `rlsync.default_model.BENCH_SPEC`).
2. Tensor parallel size 1.
"""

from __future__ import annotations

import dataclasses
import re
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from rlsync.quant.fp8_linear import Fp8Config, PendingRows, check_shards, quantize_full, quantize_shard_into, shard_index


@dataclasses.dataclass(kw_only=True, slots=True, frozen=True)
class ToyShape:
    """Qwen2 dimensions."""

    hidden: int = 1024
    intermediate: int = 2816
    num_layers: int = 16
    num_heads: int = 16
    num_kv_heads: int = 4
    vocab: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads


SHAPES = {
    "bench": ToyShape(),  # rlsync.default_model.BENCH_SPEC
    "1.5b": ToyShape(hidden=1536, intermediate=8960, num_layers=28, num_heads=12, num_kv_heads=2, vocab=151936),
    "tiny": ToyShape(hidden=256, intermediate=512, num_layers=2, num_heads=4, num_kv_heads=2, vocab=128),
}


def _copy_loader(param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    if param.shape != loaded_weight.shape:
        raise ValueError(f"shape {tuple(loaded_weight.shape)} != parameter {tuple(param.shape)}")
    param.data.copy_(loaded_weight)


class ArrivalFp8Method:
    """Mirror of `RLSyncFp8LinearMethod`'s weight handling (no `apply`)."""

    rlsync_arrival = True

    def __init__(self, config: Fp8Config, widths: tuple[int, ...]) -> None:
        check_shards(config, widths)
        self.config, self.widths = config, widths
        self.pending = PendingRows()  # rows of blocks that straddle two shards, until both have arrived

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        q_NK, scale = quantize_full(self.config, layer.weight.data, self.widths)
        del layer.weight
        layer.register_parameter("weight", nn.Parameter(q_NK, requires_grad=False))
        layer.register_parameter("weight_scale", nn.Parameter(scale, requires_grad=False))
        layer_ref, config, widths, pending = weakref.ref(layer), self.config, self.widths, self.pending

        def rlsync_arrival_loader(param: torch.Tensor, loaded_weight: torch.Tensor, loaded_shard_id: Any = None) -> None:
            owner = layer_ref()
            index = shard_index(loaded_shard_id, len(widths))
            quantize_shard_into(config, param.data, owner.weight_scale.data, widths, index, loaded_weight, torch.bfloat16,
                                pending=pending)

        layer.weight.weight_loader = rlsync_arrival_loader


class FusedLinear(nn.Module):
    """A linear whose weight rows hold one or more checkpoint shards (vLLM's merged / QKV linears)."""

    def __init__(self, widths: tuple[int, ...], k: int, *, bias: bool, fp8: Fp8Config | None, device: str) -> None:
        super().__init__()
        self.widths = widths
        self.quant_method = ArrivalFp8Method(fp8, widths) if fp8 is not None else None
        weight = nn.Parameter(torch.empty(sum(widths), k, dtype=torch.bfloat16, device=device), requires_grad=False)
        weight.weight_loader = self.weight_loader
        self.register_parameter("weight", weight)
        if bias:
            b = nn.Parameter(torch.empty(sum(widths), dtype=torch.bfloat16, device=device), requires_grad=False)
            b.weight_loader = self.weight_loader
            self.register_parameter("bias", b)

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, loaded_shard_id: Any = None) -> None:
        index = shard_index(loaded_shard_id, len(self.widths))
        start = sum(self.widths[:index])
        param.data.narrow(0, start, self.widths[index]).copy_(loaded_weight)


class Plain(nn.Module):
    """Embedding, norm or head: one bf16 weight, a copying loader."""

    def __init__(self, *shape: int, device: str) -> None:
        super().__init__()
        weight = nn.Parameter(torch.empty(*shape, dtype=torch.bfloat16, device=device), requires_grad=False)
        weight.weight_loader = _copy_loader
        self.weight = weight


class Block(nn.Module):
    def __init__(self, s: ToyShape, fp8: Fp8Config | None, device: str) -> None:
        super().__init__()
        kv = s.num_kv_heads * s.head_dim
        self.qkv_proj = FusedLinear((s.hidden, kv, kv), s.hidden, bias=True, fp8=fp8, device=device)
        self.o_proj = FusedLinear((s.hidden,), s.hidden, bias=False, fp8=fp8, device=device)
        self.gate_up_proj = FusedLinear((s.intermediate, s.intermediate), s.hidden, bias=False, fp8=fp8, device=device)
        self.down_proj = FusedLinear((s.hidden,), s.intermediate, bias=False, fp8=fp8, device=device)
        self.input_layernorm = Plain(s.hidden, device=device)
        self.post_attention_layernorm = Plain(s.hidden, device=device)


_LAYER = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.(weight|bias)")
_FUSED = {"q": ("qkv_proj", "q"), "k": ("qkv_proj", "k"), "v": ("qkv_proj", "v"), "o": ("o_proj", None),
          "gate": ("gate_up_proj", 0), "up": ("gate_up_proj", 1), "down": ("down_proj", None)}


class ToyQwen2(nn.Module):
    """Parameters and loaders of vLLM's Qwen2ForCausalLM (fused names), nothing else."""

    def __init__(self, shape: ToyShape, fp8: Fp8Config | None, device: str) -> None:
        super().__init__()
        self.embed_tokens = Plain(shape.vocab, shape.hidden, device=device)
        self.layers = nn.ModuleList(Block(shape, fp8, device) for _ in range(shape.num_layers))
        self.norm = Plain(shape.hidden, device=device)
        self.lm_head = Plain(shape.vocab, shape.hidden, device=device)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            m = _LAYER.fullmatch(name)
            if m:
                module, shard = _FUSED[m[3]]
                target = f"layers.{m[1]}.{module}.{m[4]}"
                params[target].weight_loader(params[target], tensor, shard)
            else:
                target = name.removeprefix("model.")
                params[target].weight_loader(params[target], tensor)
            loaded.add(target)
        return loaded


def checkpoint_groups(shape: ToyShape, device: str, seed: int = 0) -> list[list[tuple[str, torch.Tensor]]]:
    """Hugging Face-named bf16 tensors, one group per layer (what a trainer's source yields)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*dims: int) -> torch.Tensor:
        return (torch.randn(*dims, generator=gen, device=device) * 0.02).to(torch.bfloat16)

    kv = shape.num_kv_heads * shape.head_dim
    groups = [[("model.embed_tokens.weight", rnd(shape.vocab, shape.hidden))]]
    for i in range(shape.num_layers):
        p = f"model.layers.{i}"
        groups.append([
            (f"{p}.input_layernorm.weight", rnd(shape.hidden)),
            (f"{p}.self_attn.q_proj.weight", rnd(shape.hidden, shape.hidden)),
            (f"{p}.self_attn.q_proj.bias", rnd(shape.hidden)),
            (f"{p}.self_attn.k_proj.weight", rnd(kv, shape.hidden)),
            (f"{p}.self_attn.k_proj.bias", rnd(kv)),
            (f"{p}.self_attn.v_proj.weight", rnd(kv, shape.hidden)),
            (f"{p}.self_attn.v_proj.bias", rnd(kv)),
            (f"{p}.self_attn.o_proj.weight", rnd(shape.hidden, shape.hidden)),
            (f"{p}.post_attention_layernorm.weight", rnd(shape.hidden)),
            (f"{p}.mlp.gate_proj.weight", rnd(shape.intermediate, shape.hidden)),
            (f"{p}.mlp.up_proj.weight", rnd(shape.intermediate, shape.hidden)),
            (f"{p}.mlp.down_proj.weight", rnd(shape.hidden, shape.intermediate)),
        ])
    groups.append([("model.norm.weight", rnd(shape.hidden)), ("lm_head.weight", rnd(shape.vocab, shape.hidden))])
    return groups


def build(shape: ToyShape, fp8: Fp8Config | None, device: str) -> ToyQwen2:
    """Construct, capture the load format, load and process: what vLLM does at startup."""
    from rlsync.reload import capture

    model = ToyQwen2(shape, fp8, device)
    capture(model)
    model.load_weights(t for g in checkpoint_groups(shape, device, seed=1) for t in g)
    for module in model.modules():
        if getattr(module, "quant_method", None) is not None:
            module.quant_method.process_weights_after_loading(module)
    return model
