"""Quantized layouts, kernels and reference quantizers, separated from checkpoint format.

- `reference`: FP8 e4m3 quantizers (per tensor / channel / block), bit-identical
  to vLLM's where vLLM has the scheme; the definition every sync is verified against.
- `layout`: `Layout` (dtype, `Fraction` pack factor, scale granularity,
  transposition) with `to_standard_layout()` / `from_standard_layout()`.
- `kernels`: `LinearDescriptor`, the kernel registry and `choose_kernel`
  (emulated, `torch._scaled_mm`, vLLM's FP8 kernels).
- `fp8_linear`: the `rlsync_fp8` scheme config and quantize-on-arrival.
- `plugin` / `vllm_plugin`: the vLLM quantization plugin `quantization="rlsync_fp8"`
  (`vllm_plugin` is the only module here that imports vLLM).

Importing this package imports no vLLM.
"""
