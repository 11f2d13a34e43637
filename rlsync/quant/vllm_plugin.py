"""The vLLM quantization plugin `quantization="rlsync_fp8"`: its config and linear method.

vLLM's classes it builds on come from `rlsync.adapters.vllm_quant` (which holds
the version check); importing this module imports vLLM.

Why a plugin: vLLM's own online FP8 runs per-channel only on CPUs without
AMX, and quantizes whole layers. This config makes per-tensor, per-channel
and block FP8 run wherever one of rlsync's kernels does, and lets a sync
quantize each arriving shard straight into the kernel tensors.

- `RLSyncFp8LinearMethod.create_weights` makes the checkpoint-format bf16
  (N, K) `weight` on the meta device (no storage), with a build loader, and
  allocates the kernel storage itself (`weight` e4m3 (N, K), `weight_scale`
  fp32 in the standard layout; see `rlsync.quant.fp8_linear`). The engine's
  first load hands each checkpoint shard to that loader, which quantizes it on
  arrival straight into the kernel storage: a build never holds the bf16 model,
  only one shard chunk's temporaries (`CHUNK_ELEMS`) beyond the FP8 model and
  the checkpoint tensor vLLM is reading. `process_weights_after_loading` then
  registers the kernel tensors (`built_on_arrival` says so) and puts an arrival
  loader on the new `weight`: with `rlsync_arrival = True`, rlsync's reload
  backend leaves the kernel tensors in place and vLLM's `load_weights` calls
  that loader per shard (or once with the whole fused weight, as for Phi-3's
  `qkv_proj`); a recording sync makes those calls once vLLM's `load_weights` of
  the group returned (`rlsync_deferred`), as a planned sync does. vLLM's
  layerwise reload instead restores the bf16 format (the
  build loader then loads like an unquantized layer's: that tensor is not the
  build's meta weight) and re-runs `process_weights_after_loading`, which
  quantizes the whole weight; every path gives the same bits
  (`fp8_linear.quantize_full` is the reference).
- `apply` runs the kernel chosen for the layer's `LinearDescriptor`
  (`rlsync.quant.kernels.choose_kernel`; config key `kernel` or
  `RLSYNC_FP8_KERNEL` to force one).

The scheme comes from a `quantization_config` dict, passed as
`hf_overrides={"quantization_config": {...}}` (`rlsync.quant.plugin.hf_overrides`)
so vLLM's worker processes see it too; without one the scheme is `channel`.

MoE: fused experts get `rlsync.quant.vllm_experts.RLSyncFp8ExpertsMethod`
(FP8 per expert and shard, quantized on arrival); router gates (`GateLinear`,
`shared_expert_gate`) keep the engine dtype in every scheme.

Tensor parallelism: `create_weights` gets the rank's partition sizes, so the
kernel tensors hold the rank's rows (column parallel) or columns (row
parallel), and the scales are computed on that part (per tensor: one scale per
checkpoint shard's part; per channel: each row over the rank's columns; per
block: blocks tiling the rank's fused shard), at build and at every sync alike.
Every rank receives the full checkpoint tensors and quantizes its part
(`rlsync.adapters.vllm_tp`). vLLM's own online FP8 instead all-reduces
row-parallel amaxes so its shards carry the unsharded model's scales; the
two agree wherever shards do not split a scale's reduction.

Memory bounds: build and sync alike, one shard chunk's temporaries, plus, for
block scales whose block rows straddle fused shards, the rows each layer holds
until both parts arrive (`fp8_linear.PendingRows`: under one block height of
rows per such shard boundary, kept between syncs). MoE experts are built the
same way, one expert shard at a time.

Limitation: linear layers and fused experts; embeddings, the LM head and router
gates stay unquantized.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from rlsync.adapters import vllm_quant as vq
from rlsync.adapters import vllm_tp
from rlsync.quant.fp8_linear import (
    NAME,
    Fp8Config,
    PendingRows,
    check_shards,
    empty_kernel,
    quantize_full,
    quantize_shard_into,
    shard_index,
)
from rlsync.quant.kernels import Kernel, LinearDescriptor, choose_kernel
from rlsync.quant.layout import QuantizedTensor
from rlsync.quant.vllm_experts import RLSyncFp8ExpertsMethod


def _quantize_arrival(config: Fp8Config, layer: torch.nn.Module, q_NK: torch.Tensor, scale: torch.Tensor,
                      widths: tuple[int, ...], pending: PendingRows, loaded_weight: torch.Tensor,
                      loaded_shard_id: Any) -> int:
    """Quantize one arriving checkpoint tensor (this rank's part of it) into `q_NK` / `scale`; the elements written."""
    index = shard_index(loaded_shard_id, len(widths))
    if vllm_tp.tp_size(layer) == 1:
        parts = [(index, loaded_weight)]
    elif index is None:  # a whole fused weight: each full shard, then this rank's part of it
        parts = [(i, vllm_tp.local_shard(layer, full, i)) for i, full in enumerate(vllm_tp.split_fused(layer, loaded_weight))]
    else:
        parts = [(index, vllm_tp.local_shard(layer, loaded_weight, index))]
    for i, part in parts:
        quantize_shard_into(config, q_NK, scale, widths, i, part, layer.orig_dtype, pending=pending)
    return sum(part.numel() for _, part in parts)


def _returns_none(arguments: dict[str, Any]) -> None:
    """What the arrival loader returns, without making the call: a recording sync makes the calls once vLLM's
    `load_weights` of the group returned, as a planned sync does (`rlsync.reload.recording.Deferred`)."""
    return None


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
        self.building: tuple[torch.Tensor, torch.Tensor] | None = None
        """During the engine's first load: the kernel storage (e4m3 weight, scales) arriving shards quantize into."""
        self.build_weight: torch.Tensor | None = None
        """The meta-device checkpoint-format `weight` of the first load (other tensors reaching the build loader
        are vLLM's layerwise reload restoring that format: counting on meta, then loading for real)."""
        self.arrived = 0
        """Elements (of this rank's part) quantized into `building` so far."""
        self.built_on_arrival = False
        """The first load quantized every shard on arrival: this layer's engine-dtype weight never existed (the
        plugin's proof of a bounded build, for tests and benchmarks)."""

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        """The checkpoint-format `weight` (N, K) on the meta device (no storage) plus the kernel storage itself:
        the first load quantizes each checkpoint shard on arrival, so the engine never holds a bf16 weight."""
        self.widths = tuple(int(w) for w in output_partition_sizes)
        check_shards(self.config, self.widths)
        self.shape = (sum(self.widths), input_size_per_partition)
        vllm_loader = extra_weight_attrs.pop("weight_loader")
        self.building = empty_kernel(self.config, self.shape, self.widths)
        self.arrived = 0
        weight = vq.ModelWeightParameter(
            data=torch.empty(self.shape, dtype=params_dtype, device="meta"),
            input_dim=1, output_dim=0, weight_loader=self._build_loader(layer, vllm_loader),
        )
        layer.register_parameter("weight", weight)
        vq.set_weight_attrs(weight, extra_weight_attrs)
        self.build_weight = weight
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

    def _build_loader(self, layer: torch.nn.Module, vllm_loader):
        layer_ref = weakref.ref(layer)

        def rlsync_build_loader(param: torch.Tensor, loaded_weight: torch.Tensor, loaded_shard_id: Any = None) -> None:
            """First load: quantize the shard into the kernel storage. Any other `param` is vLLM's layerwise reload
            restoring the checkpoint format (on meta to count, then materialized): that loads as an unquantized
            layer does."""
            if param is not self.build_weight:
                args = (param, loaded_weight) if loaded_shard_id is None else (param, loaded_weight, loaded_shard_id)
                return vllm_loader(*args)
            if self.building is None:
                raise RuntimeError(f"{NAME}: a checkpoint shard arrived for an already processed layer")
            q, scale = self.building
            self.arrived += _quantize_arrival(self.config, layer_ref(), q, scale, self.widths, self.pending,
                                              loaded_weight, loaded_shard_id)
            return None

        return rlsync_build_loader

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self.build_weight is not None and layer.weight is self.build_weight:  # first load: quantized on arrival
            q_NK, scale = self._take_built(layer)
        else:  # vLLM's layerwise reload restored and loaded the bf16 checkpoint format
            q_NK, scale = quantize_full(self.config, layer.weight.data, self.widths)
        del layer.weight
        layer.register_parameter("weight", torch.nn.Parameter(q_NK, requires_grad=False))
        layer.register_parameter("weight_scale", torch.nn.Parameter(scale, requires_grad=False))
        layer.weight.weight_loader = self._arrival_loader(layer)
        self.pending.clear()  # the whole layer was just quantized; held rows are older than it

    def _take_built(self, layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        if self.building is None or self.arrived != self.shape[0] * self.shape[1]:
            raise RuntimeError(f"{NAME}: {getattr(layer, 'prefix', type(layer).__name__)} received "
                               f"{self.arrived} of {self.shape[0] * self.shape[1]} weight elements at load")
        built, self.building, self.build_weight = self.building, None, None
        self.built_on_arrival = True
        return built

    def expected_kernel_tensors(self, layer: torch.nn.Module, weight_NK: torch.Tensor) -> dict[str, torch.Tensor]:
        """What this layer's kernel tensors must hold for the (fused) engine-dtype weight `weight_NK` (verify)."""
        q_NK, scale = quantize_full(self.config, weight_NK, self.widths)
        return {"weight": q_NK, "weight_scale": scale}

    def _arrival_loader(self, layer: torch.nn.Module):
        layer_ref = weakref.ref(layer)
        config, widths, pending = self.config, self.widths, self.pending

        def rlsync_arrival_loader(param: torch.Tensor, loaded_weight: torch.Tensor, loaded_shard_id: Any = None) -> None:
            """One shard (`q`/`k`/`v`, 0/1), or with id None the whole (possibly fused) weight; under tensor
            parallelism the full checkpoint tensor, of which this rank quantizes its part (`vllm_tp.local_shard`)."""
            owner = layer_ref()
            _quantize_arrival(config, owner, param.data, owner.weight_scale.data, widths, pending, loaded_weight,
                              loaded_shard_id)

        rlsync_arrival_loader.rlsync_deferred = _returns_none
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
