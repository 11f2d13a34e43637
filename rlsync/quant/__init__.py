"""Quantized layouts, kernels and reference quantizers (see docs/architecture.md)."""
