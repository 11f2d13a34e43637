"""The vLLM quantization plugin `quantization="rlsync_fp8"`: its config and linear method.

vLLM's classes it builds on come from `rlsync.adapters.vllm_quant` (which holds
the version check); importing this module imports vLLM.

Why a plugin: vLLM's own online FP8 runs per-channel only on CPUs without
AMX, and quantizes whole layers. This config makes per-tensor, per-channel
and block FP8 run wherever one of rlsync's kernels does, and lets a sync
quantize each arriving shard straight into the kernel tensors.

- `RLSyncFp8Config` owns the checkpoint format: `create_weights` makes the
  bf16 (N, K) `weight` with vLLM's weight loader (fused qkv / gate_up shards
  land in their rows), exactly like an unquantized layer.
- `RLSyncFp8LinearMethod.process_weights_after_loading` quantizes it into the
  standard layout (`weight` e4m3 (N, K), `weight_scale` fp32; see
  `rlsync.quant.fp8_linear`) and puts an arrival loader on the new `weight`:
  with `rlsync_arrival = True`, rlsync's reload backend leaves the kernel
  tensors in place and vLLM's `load_weights` calls that loader per shard
  (or once with the whole fused weight, as for Phi-3's `qkv_proj`).
  vLLM's layerwise reload instead restores the bf16 format (with the loaders
  from `create_weights`) and re-runs `process_weights_after_loading`; both
  paths give the same bits (`fp8_linear.quantize_full` is the reference).
- `apply` runs the kernel chosen for the layer's `LinearDescriptor`
  (`rlsync.quant.kernels.choose_kernel`; config key `kernel` or
  `RLSYNC_FP8_KERNEL` to force one).

The scheme comes from a `quantization_config` dict, passed as
`hf_overrides={"quantization_config": {...}}` (`rlsync.quant.plugin.hf_overrides`)
so vLLM's worker processes see it too; without one the scheme is `channel`.

MoE: fused experts get `rlsync.quant.vllm_experts.RLSyncFp8ExpertsMethod`
(FP8 per expert and shard, quantized on arrival); router gates (`GateLinear`,
`shared_expert_gate`) keep the engine dtype in every scheme.

Limitations:
1. Tensor parallel size 1 (create_weights raises otherwise).
2. Linear layers and fused experts; embeddings, the LM head and router gates stay unquantized.
3. The first load holds the bf16 weights of all layers before quantizing
   (like an unquantized model); syncs are bounded by one shard chunk, plus,
   for block scales whose block rows straddle fused shards, the rows each
   layer holds until both parts arrive (`fp8_linear.PendingRows`: under one
   block height of rows per such shard boundary, kept between syncs).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from rlsync.adapters import vllm_quant as vq
from rlsync.errors import ConfigError
from rlsync.quant.fp8_linear import (
    NAME,
    Fp8Config,
    PendingRows,
    check_shards,
    quantize_full,
    quantize_shard_into,
    shard_index,
)
from rlsync.quant.kernels import Kernel, LinearDescriptor, choose_kernel
from rlsync.quant.layout import QuantizedTensor
from rlsync.quant.vllm_experts import RLSyncFp8ExpertsMethod


class RLSyncFp8LinearMethod(vq.LinearMethodBase):
    """bf16 checkpoint in, standard-layout FP8 stored, a dispatched kernel to run it."""

    rlsync_arrival = True
    """rlsync's reload backend quantizes arriving shards through `weight.weight_loader`."""

    def __init__(self, config: Fp8Config) -> None:
        self.config = config
        self.layout = config.layout()
        self.widths: tuple[int, ...] = ()
        self.shape: tuple[int, int] = (0, 0)
        self.kernel: Kernel | None = None
        self.pending = PendingRows()
        """Block scheme: rows of block rows straddling two shards, until both have arrived (one method per layer)."""

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        if getattr(layer, "tp_size", 1) != 1:
            raise ConfigError(f"{NAME} supports tensor parallel size 1, got {layer.tp_size}")
        self.widths = tuple(int(w) for w in output_partition_sizes)
        check_shards(self.config, self.widths)
        self.shape = (sum(self.widths), input_size_per_partition)
        weight = vq.ModelWeightParameter(
            data=torch.empty(self.shape, dtype=params_dtype),
            input_dim=1, output_dim=0, weight_loader=extra_weight_attrs.pop("weight_loader"),
        )
        layer.register_parameter("weight", weight)
        vq.set_weight_attrs(weight, extra_weight_attrs)
        layer.logical_widths = list(self.widths)
        layer.input_size_per_partition = input_size_per_partition
        layer.output_size_per_partition = self.shape[0]
        layer.orig_dtype = params_dtype
        desc = LinearDescriptor(
            weight_layout=self.layout, shape=self.shape, shard_widths=self.widths,
            has_bias=bool(getattr(layer, "has_bias", False)), activation=self.config.activation,
            act_dtype=params_dtype, out_dtype=params_dtype, device=vq.device_type(),
        )
        self.kernel = choose_kernel(desc, self.config.kernel)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        q_NK, scale = quantize_full(self.config, layer.weight.data, self.widths)
        del layer.weight
        layer.register_parameter("weight", torch.nn.Parameter(q_NK, requires_grad=False))
        layer.register_parameter("weight_scale", torch.nn.Parameter(scale, requires_grad=False))
        layer.weight.weight_loader = self._arrival_loader(layer)
        self.pending.clear()  # the whole layer was just quantized; held rows are older than it

    def expected_kernel_tensors(self, layer: torch.nn.Module, weight_NK: torch.Tensor) -> dict[str, torch.Tensor]:
        """What this layer's kernel tensors must hold for the (fused) engine-dtype weight `weight_NK` (verify)."""
        q_NK, scale = quantize_full(self.config, weight_NK, self.widths)
        return {"weight": q_NK, "weight_scale": scale}

    def _arrival_loader(self, layer: torch.nn.Module):
        layer_ref = weakref.ref(layer)
        config, widths, pending = self.config, self.widths, self.pending

        def rlsync_arrival_loader(param: torch.Tensor, loaded_weight: torch.Tensor, loaded_shard_id: Any = None) -> None:
            """One shard (`q`/`k`/`v`, 0/1), or with id None the whole (possibly fused) weight."""
            owner = layer_ref()
            index = shard_index(loaded_shard_id, len(widths))
            quantize_shard_into(config, param.data, owner.weight_scale.data, widths, index, loaded_weight,
                                owner.orig_dtype, pending=pending)

        return rlsync_arrival_loader

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        assert self.kernel is not None, "create_weights picks the kernel"
        qt = QuantizedTensor(data=layer.weight, scale=layer.weight_scale, layout=self.layout,
                             shape=self.shape, shard_widths=self.widths)
        return self.kernel.apply(self.kernel.prep_weights_for_execution(qt), x, bias)


class RLSyncFp8Config(vq.QuantizationConfig):
    """`quantization="rlsync_fp8"`: FP8 linears from a bf16 checkpoint (online)."""

    def __init__(self, fp8: Fp8Config | None = None) -> None:
        super().__init__()
        self.fp8 = fp8 or Fp8Config()

    @classmethod
    def get_name(cls) -> str:
        return NAME

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RLSyncFp8Config:
        return cls(Fp8Config.from_dict(config))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        """FP8 for linears and fused experts; router gates stay in the engine dtype; None for the rest."""
        if isinstance(layer, vq.RoutedExperts):
            return RLSyncFp8ExpertsMethod(self.fp8, layer.moe_config)
        if not isinstance(layer, vq.LinearBase):
            return None
        if vq.is_router_gate(layer, prefix):
            return vq.UnquantizedLinearMethod()
        return RLSyncFp8LinearMethod(self.fp8)


def register() -> None:
    """Register the config with vLLM (idempotent)."""
    vq.register_quantization_config(NAME)(RLSyncFp8Config)
