"""rlsync's reload backend against vLLM's layerwise reload on the real vLLM CPU engine.

Two engines per quantization config, one per backend, built from the same
checkpoint and fed the same perturbed trainer weights for three consecutive
syncs, in layer order and shuffled: every kernel tensor must be bit-identical
(oneDNN-packed bf16 linears and the tied LM head are read back exactly with
`read_kernel_tensor`). Two engines rather than one engine switching backends,
so neither backend can hide a bug by repairing state the other left behind.
"""

import gc

import pytest
import torch

from rlsync.engine.verify import verify_groups
from rlsync.source import ModuleSource
from tests.integration.support import ShuffledSource, kernel_bits, make_engine, perturb





@pytest.fixture(scope="module", params=[None, "fp8_per_channel"], ids=["bf16", "fp8_per_channel"])
def engines(request, tiny_path):
    ours = make_engine(tiny_path, quantization=request.param, reload_backend="rlsync")
    theirs = make_engine(tiny_path, quantization=request.param, reload_backend="vllm")
    yield ours, theirs
    del ours, theirs
    gc.collect()


@pytest.mark.parametrize("order", ["layer", "shuffled"])
def test_backends_leave_identical_kernel_tensors(engines, trainer_model, order):
    ours, theirs = engines
    ptrs = {n: p.data_ptr() for n, p in ours.named_kernel_tensors()}
    # Which layers are swapped depends on the CPU: where oneDNN runs bf16 matmuls (AVX-512) vLLM moves an
    # unquantized linear weight into a oneDNN handle (kernel format != load format: swapped); on AVX2-only
    # CPUs it falls back to torch's linear and keeps the weight (pass-through: loaded in place, 0 bytes).
    swapped = ours.backend.layer_load_bytes()
    max_layer = max(swapped.values(), default=0)
    # the embedding (owner of the tied LM head) and the norms pass through processing: loaded in place
    assert not {"model.embed_tokens", "model.norm"} & set(ours.backend.layer_load_bytes())
    for i in range(3):
        perturb(trainer_model, scale=0.01, seed=10 * i + (order == "shuffled"))
        # bf16, as `engine.sync(module)` casts: given float32, vLLM's layerwise reload keeps float32 values in a
        # bias that processing made float32 (AMX CPUs: vLLM's sgl GEMM), where rlsync, like a fresh engine, holds
        # the bf16 load format's values
        source = ((lambda: ModuleSource(trainer_model, dtype=torch.bfloat16)) if order == "layer"
                  else (lambda: ShuffledSource(trainer_model, seed=i, max_group=5, dtype=torch.bfloat16)))
        report = ours.sync(source(), step=i + 1)
        theirs.sync(source(), step=i + 1)
        assert report.backend == "rlsync"
        if i > 0:  # syncs 2 and 3 replay the plan (the first may too: the engines are shared by both orders)
            assert report.planned is True, report.plan_note
        # and against the reference quantization (verify needs whole layers per group, so regroup by layer)
        compared, written = verify_groups(ours.model, ours.packed, ModuleSource(trainer_model).groups(), set(ours.checkpoint_shapes))
        assert compared == written > 0
        a, b = kernel_bits(ours), kernel_bits(theirs)
        assert a.keys() == b.keys() and len(a) > 0
        differ = [n for n in a if a[n][0] != b[n][0] or not torch.equal(a[n][1], b[n][1])]
        assert not differ, f"sync {i + 1}: kernel tensors differ between backends: {differ}"
        assert {n: p.data_ptr() for n, p in ours.named_kernel_tensors()} == ptrs
        assert ours.backend.live_bytes == 0
        if not swapped:
            assert report.peak_load_bytes == 0  # every layer loaded in place
        elif order == "layer":
            assert 0 < report.peak_load_bytes <= max_layer
        else:
            assert 0 < report.peak_load_bytes <= sum(swapped.values())
        print(f"{order} sync {i + 1}: peak load-format bytes {report.peak_load_bytes} (largest layer {max_layer})")
