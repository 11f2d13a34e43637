"""Quantized layouts, kernels and reference quantizers, separated from checkpoint format.

- `reference`: FP8 e4m3 quantizers (per tensor / channel / block), bit-identical
  to vLLM's where vLLM has the scheme; the definition every sync is verified against.
- `layout`: `Layout` (dtype, `Fraction` pack factor, scale granularity,
  transposition) with `to_standard_layout()` / `from_standard_layout()`.
- `kernels/`: `LinearDescriptor`, `Kernel` and the registry (`base.py`), one
  file per kernel (emulated, `torch._scaled_mm`, vLLM's FP8 kernels), the
  priority table and `choose_kernel` (`__init__`).
- `fp8_linear`: the `rlsync_fp8` scheme config and quantize-on-arrival.
- `expected`: what a processed layer's kernel tensors must hold (verify's
  reference), keyed by quant-method type.
- `plugin` / `vllm_plugin`: the vLLM quantization plugin `quantization="rlsync_fp8"`
  (`vllm_plugin` builds on vLLM's classes from `rlsync.adapters.vllm_quant`).

Owns: layouts, kernels and their registry, reference quantizers, the plugin.
May import: `rlsync.adapters`, `rlsync.errors`. Knows nothing of reload, the
engine or trainers. Importing this package imports no vLLM.
"""
