"""The vLLM quantization plugin `quantization="rlsync_fp8"` (the only module in
`rlsync.quant` that touches vLLM, with the version check).

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
  tensors in place and vLLM's `load_weights` calls that loader per shard.
  vLLM's layerwise reload instead restores the bf16 format (with the loaders
  from `create_weights`) and re-runs `process_weights_after_loading`; both
  paths give the same bits (`fp8_linear.quantize_full` is the reference).
- `apply` runs the kernel chosen for the layer's `LinearDescriptor`
  (`rlsync.quant.kernels.choose_kernel`; config key `kernel` or
  `RLSYNC_FP8_KERNEL` to force one).

The scheme comes from a `quantization_config` dict, passed as
`hf_overrides={"quantization_config": {...}}` (`rlsync.quant.plugin.hf_overrides`)
so vLLM's worker processes see it too; without one the scheme is `channel`.

Limitations:
1. Tensor parallel size 1 (create_weights raises otherwise).
2. Linear layers only; embeddings, the LM head and MoE experts stay unquantized.
3. The first load holds the bf16 weights of all layers before quantizing
   (like an unquantized model); syncs are bounded by one shard chunk.
"""

from __future__ import annotations

import types
import weakref
from typing import Any

import torch
import vllm

from rlsync.engine.vllm_adapter import SUPPORTED_VLLM

if not vllm.__version__.startswith(SUPPORTED_VLLM):
    raise RuntimeError(f"rlsync_fp8 was written against vLLM {', '.join(v + '.x' for v in SUPPORTED_VLLM)}; "
                       f"found {vllm.__version__}")

from vllm.model_executor.kernels.linear import _POSSIBLE_FP8_KERNELS, choose_scaled_mm_linear_kernel  # noqa: E402
from vllm.model_executor.kernels.linear.scaled_mm.cutlass import CutlassFP8ScaledMMLinearKernel  # noqa: E402
from vllm.model_executor.kernels.linear.scaled_mm.ScaledMMLinearKernel import (  # noqa: E402
    FP8ScaledMMLinearKernel,
    FP8ScaledMMLinearLayerConfig,
)
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase  # noqa: E402
from vllm.model_executor.layers.quantization import register_quantization_config  # noqa: E402
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig  # noqa: E402
from vllm.model_executor.layers.quantization.utils.quant_utils import (  # noqa: E402
    kFp8DynamicTensorSym,
    kFp8DynamicTokenSym,
    kFp8StaticChannelSym,
    kFp8StaticTensorSym,
)
from vllm.model_executor.layers.quantization.utils.w8a8_utils import cutlass_fp8_supported  # noqa: E402
from vllm.model_executor.parameter import ModelWeightParameter  # noqa: E402
from vllm.model_executor.utils import set_weight_attrs  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402

from rlsync.errors import ConfigError  # noqa: E402
from rlsync.quant.fp8_linear import Fp8Config, check_shards, quantize_full, quantize_shard_into, shard_index  # noqa: E402
from rlsync.quant.kernels import Kernel, LinearDescriptor, choose_kernel  # noqa: E402
from rlsync.quant.layout import QuantizedTensor  # noqa: E402

NAME = "rlsync_fp8"


class RLSyncFp8LinearMethod(LinearMethodBase):
    """bf16 checkpoint in, standard-layout FP8 stored, a dispatched kernel to run it."""

    rlsync_arrival = True
    """rlsync's reload backend quantizes arriving shards through `weight.weight_loader`."""

    def __init__(self, config: Fp8Config) -> None:
        self.config = config
        self.layout = config.layout()
        self.widths: tuple[int, ...] = ()
        self.shape: tuple[int, int] = (0, 0)
        self.kernel: Kernel | None = None

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        if getattr(layer, "tp_size", 1) != 1:
            raise ConfigError(f"{NAME} supports tensor parallel size 1, got {layer.tp_size}")
        self.widths = tuple(int(w) for w in output_partition_sizes)
        check_shards(self.config, self.widths)
        self.shape = (sum(self.widths), input_size_per_partition)
        weight = ModelWeightParameter(
            data=torch.empty(self.shape, dtype=params_dtype),
            input_dim=1, output_dim=0, weight_loader=extra_weight_attrs.pop("weight_loader"),
        )
        layer.register_parameter("weight", weight)
        set_weight_attrs(weight, extra_weight_attrs)
        layer.logical_widths = list(self.widths)
        layer.input_size_per_partition = input_size_per_partition
        layer.output_size_per_partition = self.shape[0]
        layer.orig_dtype = params_dtype
        desc = LinearDescriptor(
            weight_layout=self.layout, shape=self.shape, shard_widths=self.widths,
            has_bias=bool(getattr(layer, "has_bias", False)), activation=self.config.activation,
            act_dtype=params_dtype, out_dtype=params_dtype, device=current_platform.device_type,
        )
        self.kernel = choose_kernel(desc, self.config.kernel)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        q_NK, scale = quantize_full(self.config, layer.weight.data, self.widths)
        del layer.weight
        layer.register_parameter("weight", torch.nn.Parameter(q_NK, requires_grad=False))
        layer.register_parameter("weight_scale", torch.nn.Parameter(scale, requires_grad=False))
        layer.weight.weight_loader = self._arrival_loader(layer)

    def _arrival_loader(self, layer: torch.nn.Module):
        layer_ref = weakref.ref(layer)
        config, widths = self.config, self.widths

        def rlsync_arrival_loader(param: torch.Tensor, loaded_weight: torch.Tensor, loaded_shard_id: Any = None) -> None:
            owner = layer_ref()
            index = shard_index(loaded_shard_id, len(widths))
            quantize_shard_into(config, param.data, owner.weight_scale.data, widths, index, loaded_weight, owner.orig_dtype)

        return rlsync_arrival_loader

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        assert self.kernel is not None, "create_weights picks the kernel"
        qt = QuantizedTensor(data=layer.weight, scale=layer.weight_scale, layout=self.layout,
                             shape=self.shape, shard_widths=self.widths)
        return self.kernel.apply(self.kernel.prep_weights_for_execution(qt), x, bias)


class RLSyncFp8Config(QuantizationConfig):
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

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> RLSyncFp8LinearMethod | None:
        return RLSyncFp8LinearMethod(self.fp8) if isinstance(layer, LinearBase) else None


def _verify_expectation(layer: torch.nn.Module, weight_NK: torch.Tensor) -> dict[str, torch.Tensor]:
    method = layer.quant_method
    q_NK, scale = quantize_full(method.config, weight_NK, method.widths)
    return {"weight": q_NK, "weight_scale": scale}


def register() -> None:
    """Register the config with vLLM, the verify reference and the rlsync reload backend (idempotent)."""
    from rlsync.engine.verify import KERNEL_EXPECTATIONS
    from rlsync.reload.support import ONLINE_RELOAD_QUANT_CONFIGS

    register_quantization_config(NAME)(RLSyncFp8Config)
    KERNEL_EXPECTATIONS[RLSyncFp8LinearMethod.__name__] = _verify_expectation
    # Checked bit for bit against vLLM's layerwise reload in tests/integration/test_plugin_fp8.py.
    ONLINE_RELOAD_QUANT_CONFIGS.add(NAME)


# ------------------------------------------------------------- vLLM's FP8 kernels
def _vllm_keys(desc: LinearDescriptor):
    if desc.weight_layout.scale.granularity == "tensor" and desc.num_shards == 1:
        return kFp8StaticTensorSym, (kFp8DynamicTokenSym if cutlass_fp8_supported() else kFp8DynamicTensorSym)
    return kFp8StaticChannelSym, kFp8DynamicTokenSym


def _layer_config(desc: LinearDescriptor) -> FP8ScaledMMLinearLayerConfig:
    weight_key, act_key = _vllm_keys(desc)
    return FP8ScaledMMLinearLayerConfig(weight_quant_key=weight_key, activation_quant_key=act_key,
                                        input_dtype=desc.act_dtype, out_dtype=desc.out_dtype, weight_shape=desc.shape)


def choose_vllm_fp8_kernel(desc: LinearDescriptor) -> tuple[type | None, str]:
    """vLLM's choice of FP8 kernel class for `desc`, or None and why not."""
    if desc.weight_layout.scale.granularity == "block":
        return None, "vLLM's block-FP8 kernels repack weights after loading; rlsync keeps standard storage for in-place syncs"
    try:
        cls = choose_scaled_mm_linear_kernel(_layer_config(desc), _POSSIBLE_FP8_KERNELS, quantization="fp8_w8a8")
    except ValueError as exc:
        return None, f"vLLM has no FP8 kernel for this layout here: {exc}"
    n, k = desc.shape
    if cls.process_weights_after_loading is not FP8ScaledMMLinearKernel.process_weights_after_loading and not (
        issubclass(cls, CutlassFP8ScaledMMLinearKernel) and n % 16 == 0 and k % 16 == 0
    ):
        return None, f"vLLM's choice {cls.__name__} repacks weights after loading (in-place syncs cannot follow)"
    return cls, ""


def make_vllm_fp8_kernel(desc: LinearDescriptor) -> FP8ScaledMMLinearKernel:
    """An instance of vLLM's kernel for `desc` (inside a vLLM config context, as in create_weights)."""
    cls, reason = choose_vllm_fp8_kernel(desc)
    if cls is None:
        raise ConfigError(f"vllm kernel: {reason}")
    return cls(_layer_config(desc), layer_param_names=["weight", "weight_scale", "input_scale", "input_scale_ub"])


def apply_vllm_fp8_kernel(impl: FP8ScaledMMLinearKernel, weight: QuantizedTensor, x: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """Run vLLM's kernel on views of rlsync's tensors ((K, N) weight, (N, 1) or (1,) scale)."""
    params = types.SimpleNamespace(weight=weight.data, weight_scale=weight.scale, input_scale=None, input_scale_ub=None)
    if not getattr(impl, "_rlsync_prepared", False):
        impl.process_weights_after_loading(params)  # a no-op for the kernels we accept (Cutlass: records N)
        impl._rlsync_prepared = True
    return impl.apply_weights(params, x, bias)
