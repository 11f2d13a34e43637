"""rlsync's reload system: new weights into a processed vLLM model, memory bounded by one layer.

Owns: the reload backend interface (`ReloadBackend`, `backend.py`), both
backends (`Reload`, rlsync's, and `VLLMLayerwiseBackend`, vLLM's layerwise
reload), `make_backend`, the capture, and `ONLINE_RELOAD_QUANT_CONFIGS`.
May import: `rlsync.adapters` (vLLM internals), `rlsync.quant`, `rlsync.errors`.
Groups are plain `(name, tensor)` sequences; nothing here knows trainers,
sources or the engine (which imports this package).

Why it exists: after `process_weights_after_loading`, a vLLM layer's parameters
are in kernel format (FP8 transposed with per-channel scales, repacked for a
CPU GEMM, ...) and its weight loaders no longer apply. vLLM 0.32 has one way
back (its layerwise reload, backend "vllm"); this is rlsync's own (backend
"rlsync", the engine default), because weight sync is the core of rlsync and
must not break when vLLM internals move, because it lets a quantization plugin
quantize on arrival into kernel storage, and because two implementations
checked against each other bit for bit catch bugs in both.

The design:
1. `capture(model)` (in `capture.py`), run where vLLM records its own reload
   metadata (after construction, before loading and processing), records each
   layer's load format: shape, stride, dtype, tensor class, attributes
   (`weight_loader`, `output_dim`, `input_dim`, `packed_dim`, ...), as specs
   holding no memory. The first reload records the kernel format processing
   produced, hence which tensors processing creates (a reload deletes them)
   and which layers pass through processing unchanged. A kernel tensor that
   processing left as a plain attribute under a parameter's name (`del
   layer.weight; layer.weight = t`) is recorded and reloaded into its storage
   like a kernel parameter.
2. A `Reload` session (`session.py`, `layer.py`): `begin()` swaps each layer
   back to load format on the meta device, keeping references to its kernel
   tensors; `load(group)` runs vLLM's `model.load_weights` (its name mapping,
   fused `qkv_proj` / `gate_up_proj` shards) whose loaders now materialize the
   load-format tensor a shard targets and write it; the moment a layer has
   received all its load-format elements it is processed, the results are
   copied into the original kernel tensors, the kernel tensors go back on the
   layer and the temporaries are freed. Pass-through layers (every kernel
   tensor has exactly its load format: same names, shapes, strides, dtypes,
   tensor classes, nothing created by processing; embeddings, LM heads,
   norms, and on GPU unquantized linears) are not swapped: their loaders
   write straight into the kernel tensors, elements are counted the same way,
   and the complete layer is processed again in place (a no-op for layers
   without a quant method). Before any re-processing, state that processing
   derives from the weights and rebuilds (`vllm_layers.DERIVED_STATE_ATTRS`:
   on CPU the `cpu_linear` oneDNN handle, a full copy of the weight) is
   dropped, so the old and the new handle never coexist. `commit()` fails unless every layer
   was complete (nothing missing, nothing loaded twice: a second write raises
   at once), restores loaders and re-derives tied followers. `abort()` puts
   every layer back on its (old) kernel tensors; the engine stays FAILED. A
   `begin()` that fails part-way aborts itself, so no layer stays on meta.
3. `reload_weights(model, weights=None, *, process_weights_after_loading=True)`
   (`api.py`): one call; `weights=None` reloads the checkpoint from disk;
   `process_weights_after_loading=False` copies kernel-format tensors after
   checking every name, shape and dtype.
4. `ONLINE_RELOAD_QUANT_CONFIGS` (`support.py`): the configs reloaded this way;
   any other is a `ConfigError` that names `reload_backend='vllm'`.
5. Sync plans (`plan.py`; `Reload(..., plan=True)`, the engine's default): the
   first sync records, per incoming checkpoint name, the loader calls vLLM's
   `load_weights` made for it; later syncs replay them (copies, or the loader
   called directly) through the same layer sessions, skipping vLLM's name
   mapping and loader dispatch. Invalidation and limits are in `plan.py`.

Why copy into the original storage rather than swap in the new tensors:
CUDA graphs (and anything else that captured a kernel tensor, e.g. a compiled
graph) hold raw data pointers. Writing into the same storage keeps every
`data_ptr()` unchanged, so captured graphs replay with the new weights.

Memory: `Reload.peak_live_bytes` counts the load-format bytes alive at once.
Fed in layer order, at most the layers still waiting for shards are
materialized; with checkpoint-ordered tensors that is one layer.
`Reload.layer_load_bytes()` gives each swapped layer's load-format size for
that bound. Pass-through and arrival layers materialize nothing: their live
bytes are 0 and they are not listed (a model whose every layer is one of
those, e.g. with the FP8 plugin, reports a peak of 0). Out of order, layers
stay materialized until complete (the peak is reported). Beyond the counted
bytes, re-processing a swapped layer builds its new kernel state (on CPU a
oneDNN handle the size of the layer's weights) after the old one is dropped,
so it replaces rather than adds to it.

Quantize-on-arrival protocol (the FP8 plugin implements the other side):
a layer whose `quant_method` class sets `rlsync_arrival = True` is not
swapped. It keeps its kernel tensors, whose `weight_loader`s (set by the
plugin) quantize each incoming shard straight into kernel storage. Reload only
(1) lets `model.load_weights` call those loaders as usual, (2) counts each
shard's `loaded_weight.numel()` against the layer's load-format element count
from the capture (so completeness and loaded-twice checks still hold; a
captured tensor that receives no checkpoint data, such as a scale created in
`create_weights`, must declare `weight_loader_numel = 0`), and (3) when the
layer is complete it is done. `process_weights_after_loading` is not re-run
for such layers. `ONLINE_RELOAD_QUANT_CONFIGS` lists the plugin's config.

Limitations:
1. Tied parameters: only the owner (the embedding) is loaded; followers (a tied
   LM head) keep the shared tensor and are re-processed at commit, which
   `vllm_layers.refresh_tied_followers` supports for unquantized followers only.
2. Padded layers: a layer whose load format has elements the checkpoint never
   fills completes only if the creator declares `weight_loader_numel` (vLLM's
   convention); otherwise commit reports it as not fully loaded (fail closed).
3. Processing must reproduce the kernel format recorded at load (names, shapes,
   strides, dtypes, tensor classes, parameter or plain attribute); a method
   whose output shape depends on the values is refused.
4. Quantization configs outside `ONLINE_RELOAD_QUANT_CONFIGS` are refused, as
   are attention layers with checkpoint parameters (KV-cache scales). Use the
   `vllm` backend for those.
5. Only parameters are reloaded; buffers (rotary caches, attention scales) are
   not checkpoint data in the supported models and are left as they are.
6. On CPU, unquantized linear weights live in oneDNN handles that processing
   rebuilds, so for those layers "same storage" holds for the (empty) tensor
   only; kernel-format reloads cannot update them at all. Derived state other
   than `DERIVED_STATE_ATTRS` is not dropped early: a method that keeps
   another weight copy outside its parameters briefly holds old and new.
7. In-process (colocated) engines only (the capture hook patches vLLM in this
   process); tested with tensor parallel size 1 only.
8. After an abort, pass-through layers (like arrival layers) hold partly new
   weights in their kernel tensors, and a layer aborted mid-processing may
   have lost its derived state; the engine stays FAILED until a full sync,
   which rebuilds both.
9. Uninitialized (lazy) parameters and buffers (`torch.nn.UninitializedParameter`,
   `UninitializedBuffer`) have no shape: like vLLM's reload, the capture skips
   them, so they are never reloaded and stay on their layer untouched.
"""

from typing import Any

from torch import nn

from rlsync.reload.api import copy_kernel_format, reload_weights
from rlsync.reload.backend import RELOAD_BACKENDS, ReloadBackend, Weights
from rlsync.reload.capture import LayerCapture, ModelCapture, TensorSpec, capture, get_capture, record_kernel_format
from rlsync.reload.session import Reload
from rlsync.reload.support import ONLINE_RELOAD_QUANT_CONFIGS, check_supported
from rlsync.reload.vllm_backend import VLLMLayerwiseBackend

__all__ = [
    "ONLINE_RELOAD_QUANT_CONFIGS",
    "RELOAD_BACKENDS",
    "LayerCapture",
    "ModelCapture",
    "Reload",
    "ReloadBackend",
    "TensorSpec",
    "VLLMLayerwiseBackend",
    "Weights",
    "capture",
    "check_supported",
    "copy_kernel_format",
    "get_capture",
    "make_backend",
    "record_kernel_format",
    "reload_weights",
]


def make_backend(name: str, model: nn.Module, model_config: Any, *, plan: bool = True) -> ReloadBackend:
    """Build the reload backend called `name` (one of `RELOAD_BACKENDS`) for this engine model.

    `plan`: rlsync's backend records a sync plan on its first sync and replays it after (`plan.py`).
    """
    if name == "vllm":
        return VLLMLayerwiseBackend(model, model_config)
    if name == "rlsync":
        return Reload(model, model_config, plan=plan)
    raise ValueError(f"unknown reload_backend {name!r}; choose one of {', '.join(RELOAD_BACKENDS)}")
