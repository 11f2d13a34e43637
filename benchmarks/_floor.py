"""The memory-bandwidth floor a sync is compared against, and the checkpoint facts it needs.

A sync cannot be faster than moving its bytes once: for a bf16 engine, read
2 B and write 2 B per parameter; for an FP8 engine, read 2 B and write 1 B per
quantized parameter (the scales are negligible) and 2 + 2 B for the rest
(embeddings, norms, the LM head stay bf16). The floor is the median time of
one `torch` copy of a flat buffer that moves exactly that many bytes (a copy
of X bytes reads X and writes X), measured in the same run on the same
machine and threads.

Limitations:
1. One flat contiguous copy is the most favourable case; real tensors are
   many and strided, so no sync reaches 1.0x.
2. "Quantized" means the checkpoint's linear projection weights (`*_proj.weight`),
   which is what vLLM's online FP8 and rlsync's plugin quantize in the
   Qwen2/Llama-shaped models benchmarked here; in the Qwen3-MoE models that
   includes every expert's gate / up / down projection, not the router gate
   (`mlp.gate.weight`), which stays in the engine dtype.
3. A tiny model fits in cache, so its floor is a cache bandwidth figure.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import torch


@dataclasses.dataclass(kw_only=True, slots=True)
class CheckpointFacts:
    """Sizes that set the floor and the memory bound."""

    num_params: int
    """Elements in the checkpoint (tied weights once)."""
    num_bytes: int
    """Bytes of the checkpoint tensors (bf16: what a sync receives)."""
    num_quantized: int
    """Elements of linear projection weights (what FP8 quantizes)."""
    fp8_moved_bytes: int
    """Bytes an FP8 sync must read + write: 3 per quantized element, 4 per other bf16 element."""
    layer_bytes: int
    """Largest decoder layer's bytes (the memory bound for one layer)."""
    max_tensor_bytes: int
    """Largest single tensor's bytes (an embedding or LM head: one module of its own)."""


def checkpoint_facts(model_dir: str | Path) -> CheckpointFacts:
    from safetensors import safe_open

    from rlsync.source.names import group_key

    numel: dict[str, int] = {}
    itemsize: dict[str, int] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                numel[name] = torch.Size(piece.get_shape()).numel()
                itemsize[name] = {"BF16": 2, "F16": 2, "F32": 4}[piece.get_dtype()]
    layers: dict[str, int] = {}
    for name, n in numel.items():
        key = group_key(name)
        if key is not None:
            layers[key] = layers.get(key, 0) + n * itemsize[name]
    quantized = sum(n for name, n in numel.items() if name.endswith("_proj.weight"))
    total = sum(numel.values())
    return CheckpointFacts(
        num_params=total,
        num_bytes=sum(n * itemsize[name] for name, n in numel.items()),
        num_quantized=quantized,
        fp8_moved_bytes=3 * quantized + 4 * (total - quantized),
        layer_bytes=max(layers.values(), default=0),
        max_tensor_bytes=max(n * itemsize[name] for name, n in numel.items()),
    )


def copy_floor_s(nbytes: int, repeats: int = 9, threads: int | None = None) -> float:
    """Median seconds of one `dst.copy_(src)` of `nbytes` bytes (after two warm-up copies), on `threads` torch
    threads (None: as this process is set). A parent process that times children run with `--threads N` must
    pass N: torch parallelizes the copy over every thread it has (on this 2-core machine one thread takes about
    twice the time of two), and the floor must run as the syncs do."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        times = []
        for i in range(repeats + 2):
            start = time.perf_counter()
            dst.copy_(src)
            if i >= 2:
                times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        torch.set_num_threads(before)
