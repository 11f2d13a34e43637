"""The `rlsync_fp8` plugin's method for fused MoE experts: FP8 `w13` / `w2`, quantized per expert shard.

vLLM's classes come from `rlsync.adapters.vllm_quant`; importing this module
imports vLLM. The math (scales, quantize-on-arrival, the forward) is in
`rlsync.quant.fp8_moe`.

- `create_weights` makes the checkpoint format vLLM's unquantized experts
  use, `w13_weight` (E, 2I, H) and `w2_weight` (E, H, I) in the engine dtype,
  on the meta device (no storage), with a build loader, and allocates the
  e4m3 kernel storage and scales. The first load hands each expert's gate /
  up / down checkpoint tensor to that loader, which quantizes it on arrival
  into its rows (`fp8_moe.quantize_expert_shard_into`): a build holds one
  expert shard's temporaries, never the engine-dtype experts.
- `process_weights_after_loading` registers the kernel tensors
  (`w13_weight` / `w2_weight` with `w13_weight_scale` / `w2_weight_scale`;
  `built_on_arrival` names them) and puts an arrival loader on the new
  weights: with `rlsync_arrival = True`, rlsync's reload backend keeps the
  kernel tensors and vLLM's `load_weights` hands each expert shard to that
  loader, which quantizes it straight into its rows. vLLM's layerwise reload
  instead restores the engine-dtype format (the build loader then loads as
  vLLM's unquantized experts do) and processes the layer again, quantizing
  every expert (`fp8_moe.quantize_experts`); every path gives the same bits.
- `apply` routes tokens (`fp8_moe.experts_forward`) and runs each expert's
  two linears with kernels chosen by the linear dispatch
  (`rlsync.quant.kernels.choose_kernel` on the per-expert `LinearDescriptor`s):
  the emulated kernel on any CPU, vLLM's FP8 scaled-mm kernels where the
  platform has them, or the `kernel` the config forces.

The router gate (`GateLinear`, and Qwen2-MoE's `shared_expert_gate`) stays in
the engine dtype in every scheme (`RLSyncFp8Config.get_quant_method`); shared
experts are ordinary linears and are quantized like any other.

Tensor parallelism: each rank holds every expert's part of the intermediate
size (gate / up rows, down columns), quantizes that part on arrival from the
full checkpoint tensors (`rlsync.adapters.vllm_tp.local_expert_shard`), and
computes partial outputs that vLLM's MoE runner all-reduces after `apply`.

Limitations (refused with `ConfigError` at engine build, naming the layer):
gated SiLU experts only, no expert biases, no router weights on the input,
no expert parallelism (see `fp8_moe`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

from rlsync.adapters import vllm_quant as vq
from rlsync.adapters import vllm_tp
from rlsync.errors import ConfigError
from rlsync.quant.fp8_linear import Fp8Config, PendingRows, empty_kernel
from rlsync.quant.fp8_moe import (
    W2,
    W13,
    ExpertShapes,
    experts_forward,
    quantize_expert_shard_into,
    quantize_expert_shards_into,
    quantize_experts,
)
from rlsync.quant.kernels import Kernel, LinearDescriptor, choose_kernel
from rlsync.quant.layout import QuantizedTensor


def _arrival_result(arguments: dict[str, Any]) -> bool | None:
    """What the arrival loader returns for a call with these bound arguments, without making it: lets a
    recording sync make the calls later, as a stack (`rlsync.reload.recording.Deferred`)."""
    return True if arguments.get("return_success") else None


class RLSyncFp8ExpertsMethod(vq.FusedMoEMethodBase):
    """Engine-dtype experts in, per-expert standard-layout FP8 stored, dispatched linear kernels to run them."""

    rlsync_arrival = True
    """rlsync's reload backend quantizes arriving expert shards through the weights' `weight_loader`."""

    def __init__(self, config: Fp8Config, moe: Any) -> None:
        super().__init__(moe)
        self.config = config
        self.layout = config.layout()
        self.shapes: ExpertShapes | None = None
        self.kernels: dict[str, Kernel] = {}
        self.pending: dict[str, list[PendingRows]] = {}
        """Block scheme: per weight, per expert, rows of block rows straddling the gate / up boundary."""
        self.building: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        """During the engine's first load, per weight: the kernel storage arriving expert shards quantize into."""
        self.arrived: dict[str, int] = {}
        self.built_on_arrival: set[str] = set()
        """Weights the first load quantized shard by shard on arrival (their engine-dtype form never existed)."""
        self.build_weights: dict[str, torch.Tensor] = {}
        """The meta-device checkpoint-format weights of the first load (see the linear method's `build_weight`)."""

    def create_weights(self, layer: torch.nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        problems = vq.expert_problems(layer)
        if problems:
            raise ConfigError(f"rlsync_fp8 cannot quantize the experts of {getattr(layer, 'layer_name', layer)}: "
                              + "; ".join(problems))
        self.shapes = shapes = ExpertShapes(num_experts=num_experts, hidden=hidden_size,
                                            intermediate=intermediate_size_per_partition)
        vllm_loader = extra_weight_attrs.pop("weight_loader")
        for name in (W13, W2):
            # checkpoint format on the meta device; the first load quantizes each expert shard into `building`
            weight = torch.nn.Parameter(torch.empty(num_experts, *shapes.shape(name), dtype=params_dtype, device="meta"),
                                        requires_grad=False)
            layer.register_parameter(name, weight)
            vq.set_weight_attrs(weight, extra_weight_attrs)
            weight.weight_loader = self._build_loader(layer, name, vllm_loader)
            self.build_weights[name] = weight
            self.building[name] = empty_kernel(self.config, (num_experts, *shapes.shape(name)), shapes.widths(name))
            self.arrived[name] = 0
            desc = LinearDescriptor(weight_layout=self.layout, shape=shapes.shape(name), shard_widths=shapes.widths(name),
                                    activation=self.config.activation, act_dtype=params_dtype, out_dtype=params_dtype,
                                    device=vq.device_type())
            self.kernels[name] = choose_kernel(desc, self.config.kernel)
            self.pending[name] = [PendingRows() for _ in range(num_experts)]
        layer.orig_dtype = params_dtype

    def _build_loader(self, layer: torch.nn.Module, name: str, vllm_loader):
        layer_ref = weakref.ref(layer)

        def rlsync_expert_build_loader(param: torch.Tensor, loaded_weight: torch.Tensor, weight_name: str,
                                       shard_id: str, expert_id: int, return_success: bool = False) -> bool | None:
            """First load: quantize the expert shard into the kernel storage. Any other `param` is vLLM's layerwise
            reload restoring the checkpoint format (on meta to count, then materialized): that loads as unquantized
            experts do."""
            if param is not self.build_weights.get(name):
                return vllm_loader(param, loaded_weight, weight_name, shard_id=shard_id, expert_id=expert_id,
                                   return_success=return_success)
            if name not in self.building:
                raise RuntimeError(f"rlsync_fp8: an expert shard arrived for already processed {name}")
            q, scale = self.building[name]
            owner = layer_ref()
            part = vllm_tp.local_expert_shard(owner, loaded_weight, shard_id)  # this rank's part under TP
            quantize_expert_shard_into(self.config, q, scale, self.shapes.widths(name), int(expert_id), shard_id,
                                       part, owner.orig_dtype, pending=self.pending[name])
            self.arrived[name] += part.numel()
            return True if return_success else None

        return rlsync_expert_build_loader

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        assert self.shapes is not None, "create_weights sets the shapes"
        for name in (W13, W2):
            current = getattr(layer, name)
            if current is self.build_weights.get(name):  # the first load: every expert shard was quantized on arrival
                expected = current.numel()
                if name not in self.building or self.arrived[name] != expected:
                    raise RuntimeError(f"rlsync_fp8: {getattr(layer, 'layer_name', layer)}.{name} received "
                                       f"{self.arrived.get(name, 0)} of {expected} elements at load")
                q, scale = self.building.pop(name)
                del self.build_weights[name]
                self.built_on_arrival.add(name)
            else:  # vLLM's layerwise reload restored and loaded the engine-dtype checkpoint format
                q, scale = quantize_experts(self.config, current.data, self.shapes.widths(name))
            delattr(layer, name)
            layer.register_parameter(name, torch.nn.Parameter(q, requires_grad=False))
            layer.register_parameter(f"{name}_scale", torch.nn.Parameter(scale, requires_grad=False))
            getattr(layer, name).weight_loader = self._arrival_loader(layer, name)
            for rows in self.pending[name]:
                rows.clear()  # every expert was just quantized whole

    def expected_expert_tensors(self, layer: torch.nn.Module, w13: torch.Tensor, w2: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the layer's kernel tensors must hold for stacked engine-dtype experts (verify)."""
        assert self.shapes is not None
        out = {}
        for name, w in ((W13, w13), (W2, w2)):
            out[name], out[f"{name}_scale"] = quantize_experts(self.config, w, self.shapes.widths(name))
        return out

    def _arrival_loader(self, layer: torch.nn.Module, name: str):
        layer_ref = weakref.ref(layer)
        config, widths, pending = self.config, self.shapes.widths(name), self.pending[name]

        def rlsync_expert_arrival_loader(param: torch.Tensor, loaded_weight: torch.Tensor, weight_name: str,
                                         shard_id: str, expert_id: int, return_success: bool = False) -> bool | None:
            """One expert's gate (`w1`), up (`w3`) or down (`w2`) projection, quantized into its rows."""
            owner = layer_ref()
            part = vllm_tp.local_expert_shard(owner, loaded_weight, shard_id)  # this rank's part under TP
            quantize_expert_shard_into(config, param.data, getattr(owner, f"{name}_scale").data, widths, int(expert_id),
                                       shard_id, part, owner.orig_dtype, pending=pending)
            return True if return_success else None

        def rlsync_batch(param: torch.Tensor, items: list[tuple[torch.Tensor, dict[str, Any]]]) -> None:
            """Many shards at once (a replayed sync plan): runs of one shard id quantized together."""
            owner = layer_ref()
            run: list[tuple[torch.Tensor, dict[str, Any]]] = []

            def flush() -> None:
                if run:
                    shard_id = run[0][1]["shard_id"]
                    quantize_expert_shards_into(config, param.data, getattr(owner, f"{name}_scale").data, widths,
                                                shard_id, [int(a["expert_id"]) for _, a in run],
                                                [vllm_tp.local_expert_shard(owner, t, shard_id) for t, _ in run],
                                                owner.orig_dtype, pending=pending)
                    run.clear()

            for loaded, named in items:
                if run and named["shard_id"] != run[0][1]["shard_id"]:
                    flush()
                run.append((loaded, named))
            flush()

        def rlsync_stacked(param: torch.Tensor, stack: torch.Tensor, shard_id: str, experts: Sequence[int]) -> None:
            """Consecutive experts' shards as one (E, ...) tensor (a replayed stack, `rlsync.reload.stacked`)."""
            owner = layer_ref()
            quantize_expert_shards_into(config, param.data, getattr(owner, f"{name}_scale").data, widths, shard_id,
                                        list(experts), vllm_tp.local_expert_shard(owner, stack, shard_id, stacked=True),
                                        owner.orig_dtype, pending=pending)

        rlsync_expert_arrival_loader.rlsync_batch = rlsync_batch
        rlsync_expert_arrival_loader.rlsync_deferred = _arrival_result
        rlsync_expert_arrival_loader.rlsync_stacked = rlsync_stacked
        return rlsync_expert_arrival_loader

    def get_fused_moe_quant_config(self, layer: torch.nn.Module):
        return vq.FUSED_MOE_UNQUANTIZED_CONFIG  # activations stay in the engine dtype; the kernels hold the scales

    def _linear(self, layer: torch.nn.Module, name: str):
        kernel, (n, k), widths = self.kernels[name], self.shapes.shape(name), self.shapes.widths(name)
        weight, scale = getattr(layer, name), getattr(layer, f"{name}_scale")

        def run(expert: int, x: torch.Tensor) -> torch.Tensor:
            qt = QuantizedTensor(data=weight[expert], scale=scale[expert], layout=self.layout, shape=(n, k),
                                 shard_widths=widths)
            return kernel.apply(kernel.prep_weights_for_execution(qt), x, None)

        return run

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts: Any = None, shared_experts_input: torch.Tensor | None = None) -> torch.Tensor:
        return experts_forward(x, topk_weights, topk_ids, self._linear(layer, W13), self._linear(layer, W2))
