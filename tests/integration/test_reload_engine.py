"""rlsync's reload backend inside a real vLLM CPU engine: capture hook, reload_weights, fail closed.

One FP8 (`fp8_per_channel`) engine with `reject_nonfinite=True` for the module;
every failure test ends with a full sync that must bring it back to READY with
verified weights, so the tests also check recovery from each other's failures.
"""

import gc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlsync.engine import EngineState
from rlsync.engine.verify import verify_groups
from rlsync.errors import EngineNotReady, SyncError
from rlsync.reload import get_capture, reload_weights
from rlsync.source import ModuleSource
from rlsync.source.base import WeightSource
from tests.integration.support import kernel_bits, make_engine, perturb


class ListSource(WeightSource):
    """Yields prepared groups; a callable instead of a group raises when reached."""

    def __init__(self, groups):
        super().__init__()
        self._groups = groups

    def metadata(self):
        return []

    def groups(self):
        for group in self._groups:
            if callable(group):
                group()
            yield group


@pytest.fixture(scope="module")
def engine(tiny_path):
    eng = make_engine(tiny_path, quantization="fp8_per_channel", reload_backend="rlsync", reject_nonfinite=True)
    yield eng
    del eng
    gc.collect()


def checkpoint_group(tiny_path):
    """The checkpoint on disk as one group (verify needs every shard of a fused layer at once)."""
    tensors = {}
    for file in sorted(Path(tiny_path).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return list(tensors.items())


def test_capture_taken_at_load_and_hook_removed(engine):
    from vllm.model_executor.model_loader import utils as loader_utils

    capture = get_capture(engine.model)
    qkv = capture.layers["model.layers.0.self_attn.qkv_proj"].params["weight"]
    assert qkv.shape == (512, 256) and qkv.dtype == torch.bfloat16  # load format, not fp8 kernel format
    assert type(engine.model.model.layers[0].self_attn.qkv_proj.weight).__name__ == "Parameter"
    assert qkv.cls.__name__ == "ModelWeightParameter"
    assert loader_utils.record_metadata_for_reloading.__module__.endswith("reload.layerwise")


def test_reload_weights_from_disk_restores_checkpoint(engine, trainer_model, tiny_path):
    perturb(trainer_model, seed=3)
    engine.sync(trainer_model, step=1, verify=True)
    ptrs = {n: p.data_ptr() for n, p in engine.named_kernel_tensors()}
    names = reload_weights(engine.model)
    assert "model.layers.1.mlp.gate_up_proj.weight" in names
    group = checkpoint_group(Path(tiny_path))
    assert len(group) > 0
    compared, written = verify_groups(engine.model, engine.packed, [group], {n for n, _ in group})
    assert compared == written > 0
    assert {n: p.data_ptr() for n, p in engine.named_kernel_tensors()} == ptrs


def test_kernel_format_reload_own_tensors_no_op_and_wrong_shape_refused(engine):
    before = kernel_bits(engine)
    names = reload_weights(engine.model, engine.model.named_parameters(), process_weights_after_loading=False)
    assert "model.layers.0.self_attn.qkv_proj.weight_scale" in names
    after = kernel_bits(engine)
    assert all(torch.equal(before[n][1], after[n][1]) for n in before)
    weights = [
        ("model.norm.weight", torch.zeros(256, dtype=torch.bfloat16)),  # valid and first: must not be written
        ("model.layers.0.mlp.down_proj.weight", torch.zeros(256, 512, dtype=torch.float8_e4m3fn)),  # load shape
    ]
    with pytest.raises(ValueError, match="nothing written"):
        reload_weights(engine.model, weights, process_weights_after_loading=False)
    after = kernel_bits(engine)
    assert all(torch.equal(before[n][1], after[n][1]) for n in before)


def _failing_source(model, kind):
    groups = list(ModuleSource(model).groups())
    if kind == "iterator raises":
        return ListSource(groups[:2] + [_raise])
    if kind == "half a layer then raises":
        return ListSource(groups[:1] + [groups[1][:3], _raise])
    if kind == "NaN tensor":
        name, t = groups[2][0]
        groups[2] = [(name, torch.full_like(t, float("nan")))] + groups[2][1:]
        return ListSource(groups)
    if kind == "unknown name":
        return ListSource(groups[:2] + [[("model.layers.9.mlp.down_proj.weight", torch.zeros(256, 512))]] + groups[2:])
    raise AssertionError(kind)


def _raise():
    raise RuntimeError("trainer died mid-stream")


@pytest.mark.parametrize("kind", ["iterator raises", "half a layer then raises", "NaN tensor", "unknown name"])
def test_failure_mid_stream_fails_closed_then_full_sync_recovers(engine, trainer_model, kind):
    objects = {n: p for n, p in engine.model.named_parameters()}
    perturb(trainer_model, seed=7)
    with pytest.raises(SyncError):
        engine.sync(_failing_source(trainer_model, kind), step=2)
    assert engine.state is EngineState.FAILED
    with pytest.raises(EngineNotReady):
        engine.generate(["hi"], max_tokens=2)
    assert all(p is objects[n] and not p.is_meta for n, p in engine.model.named_parameters())
    assert engine.backend.live_bytes == 0
    report = engine.sync(trainer_model, step=3, verify=True)
    assert engine.state is EngineState.READY and report.verified and report.backend == "rlsync"
    assert len(engine.generate(["hi"], max_tokens=2)[0].completions[0].token_ids) > 0
