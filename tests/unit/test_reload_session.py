"""The `Reload` session and `reload_weights` on hand-built toy layers (no vLLM)."""

import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rlsync.errors import ConfigError, SyncError
from rlsync.reload import ONLINE_RELOAD_QUANT_CONFIGS, Reload, reload_weights
from tests.unit.support import (
    IN,
    SHARDS,
    ToyArrivalQuant,
    ToyQuant,
    ToyRewrap,
    UnquantizedToyHandle,
    assert_bits_equal,
    build_toy,
    checkpoint_groups,
    kernel_state,
)


def run_session(model, groups):
    session = Reload(model)
    session.begin()
    for group in groups:
        session.load(group)
    session.commit()
    return session


def shuffled(groups, seed=0):
    """Every tensor in a random order, regrouped in random sizes (shards of one layer split apart)."""
    flat = [t for g in groups for t in g]
    rng = random.Random(seed)
    rng.shuffle(flat)
    out = []
    while flat:
        k = rng.randint(1, 4)
        out.append(flat[:k])
        flat = flat[k:]
    return out


@pytest.mark.parametrize("order", ["layer", "shuffled"])
def test_reload_equals_fresh_load_bits_pointers_and_memory(order):
    model = build_toy(seed=0)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    objects = {n: p for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype.is_floating_point:
                p.fill_(float("nan"))  # poison: every element must be overwritten
            else:
                p.fill_(-128)
    for seed in (1, 2, 3):
        groups = checkpoint_groups(seed)
        session = run_session(model, groups if order == "layer" else shuffled(groups, seed))
        assert_bits_equal(kernel_state(model), kernel_state(build_toy(seed=seed)))
        assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
        assert all(p is objects[n] for n, p in model.named_parameters())
        assert session.live_bytes == 0
        layer_bytes = session.layer_load_bytes()
        # embed and the norms pass through processing: loaded in place, never materialized
        assert set(layer_bytes) == {f"layers.{i}.{m}" for i in range(2) for m in ("qkv", "down")}
        if order == "layer":
            assert 0 < session.peak_live_bytes <= max(layer_bytes.values())
        else:
            assert 0 < session.peak_live_bytes <= sum(layer_bytes.values())
    assert model.head.weight is model.embed.weight


def test_each_layer_processed_once_per_sync():
    model = build_toy()
    methods = [m.quant_method for m in model.modules() if isinstance(getattr(m, "quant_method", None), ToyQuant)]
    before = [m.num_processed for m in methods]
    run_session(model, checkpoint_groups(5))
    assert [m.num_processed - b for m, b in zip(methods, before)] == [1] * len(methods)


def test_missing_tensor_fails_commit_and_abort_restores_kernel_tensors():
    model = build_toy()
    objects = {n: p for n, p in model.named_parameters()}
    loaders = {n: getattr(p, "weight_loader", None) for n, p in objects.items()}
    groups = checkpoint_groups(1)
    groups[1] = [t for t in groups[1] if t[0] != "layers.0.k.weight"]
    session = Reload(model)
    session.begin()
    for g in groups:
        session.load(g)
    with pytest.raises(SyncError, match=r"layers\.0\.qkv\.weight: \d+/512 elements"):
        session.commit()
    session.abort()
    assert all(p is objects[n] and not p.is_meta for n, p in model.named_parameters())
    assert {n: getattr(p, "weight_loader", None) for n, p in objects.items()} == loaders
    assert session.live_bytes == 0
    run_session(model, checkpoint_groups(2))  # the next full sync works
    assert_bits_equal(kernel_state(model), kernel_state(build_toy(seed=2)))


def test_abort_mid_layer_puts_every_layer_back():
    model = build_toy()
    objects = {n: p for n, p in model.named_parameters()}
    session = Reload(model)
    session.begin()
    assert model.layers[0].qkv.weight.is_meta  # swapped to load format
    session.load([("layers.0.q.weight", torch.ones(SHARDS["q"], IN))])
    assert not model.layers[0].qkv.weight.is_meta and session.live_bytes > 0
    session.abort()
    assert all(p is objects[n] for n, p in model.named_parameters())
    assert session.live_bytes == 0 and "weight_scale" in model.layers[0].qkv._parameters


@pytest.mark.parametrize("where", ["same group", "after the layer completed"])
def test_loaded_twice_raises(where):
    model = build_toy()
    session = Reload(model)
    session.begin()
    groups = checkpoint_groups(1)
    if where == "same group":
        with pytest.raises(SyncError, match="loaded twice"):
            session.load(groups[1] + [groups[1][0]])
    else:
        session.load(groups[1])
        with pytest.raises(SyncError, match="loaded twice"):
            session.load([groups[1][0]])
    session.abort()


def test_unsupported_quant_config_names_the_vllm_backend():
    model = build_toy()
    with pytest.raises(ConfigError, match=r"quantization='gptq'.*reload_backend='vllm'"):
        Reload(model, SimpleNamespace(quantization="gptq"))
    for supported in ONLINE_RELOAD_QUANT_CONFIGS:
        Reload(model, SimpleNamespace(quantization=supported))
    assert "rlsync_fp8" in ONLINE_RELOAD_QUANT_CONFIGS  # the reload package lists rlsync's own plugin itself


def test_changed_kernel_format_is_refused_before_any_swap():
    model = build_toy()
    run_session(model, checkpoint_groups(1))  # records the kernel format
    model.layers[1].down.weight_scale = nn.Parameter(torch.ones(3, 1), requires_grad=False)
    with pytest.raises(SyncError, match="differ from the kernel format"):
        Reload(model).begin()
    assert not any(p.is_meta for p in model.parameters())


# ------------------------------------------------------- pass-through layers
def test_pass_through_layer_loads_in_place_and_rebuilds_its_handle_without_overlap():
    """An embedding whose processing keeps `weight` and derives a handle (vLLM's CPU embedding/LM head):
    no load-format copy (zero live bytes), same tensor and storage, values and handle exact, the old
    handle freed before the new one is built, the tied head's handle rebuilt at commit."""
    model = build_toy(embed_factory=UnquantizedToyHandle)
    embed, head = model.embed, model.head
    weight, ptr = embed.weight, embed.weight.data_ptr()
    with torch.no_grad():
        weight.fill_(float("nan"))
    for seed in (1, 2):
        old_handles = [embed.quant_method.handles[-1], head.quant_method.handles[-1]]
        groups = checkpoint_groups(seed)
        session = Reload(model)
        session.begin()
        assert embed.weight is weight and not weight.is_meta  # not swapped
        session.load(groups[0])  # the embedding alone: complete, processed
        assert session.live_bytes == 0 and session.peak_live_bytes == 0
        assert embed.weight is weight and weight.data_ptr() == ptr
        assert torch.equal(weight, groups[0][0][1])
        assert all(ref() is None for ref in old_handles[:1])  # old embed handle already freed
        for group in groups[1:]:
            session.load(group)
        session.commit()
        assert all(ref() is None for ref in old_handles)
        assert embed.quant_method.saw_old_handle == 0 and head.quant_method.saw_old_handle == 0
        assert embed.quant_method.num_processed == head.quant_method.num_processed == 1 + seed
        eye = torch.eye(IN)
        for layer in (embed, head):
            assert torch.equal(layer.cpu_linear(eye), groups[0][0][1].t())
        assert "embed" not in session.layer_load_bytes() and head.weight is weight
        assert 0 < session.peak_live_bytes <= max(session.layer_load_bytes().values())  # swapped layers only
        assert_bits_equal(kernel_state(model), kernel_state(build_toy(seed=seed, embed_factory=UnquantizedToyHandle)))


def test_pass_through_processing_that_replaces_a_tensor_is_copied_back():
    model = build_toy(norm_factory=ToyRewrap)
    weight, ptr = model.norm.weight, model.norm.weight.data_ptr()
    groups = checkpoint_groups(3)
    session = run_session(model, groups)
    assert "norm" not in session.layer_load_bytes()
    assert model.norm.weight is weight and weight.data_ptr() == ptr
    assert torch.equal(weight, groups[-1][0][1])


def test_pass_through_abort_restores_loaders_and_next_sync_recovers():
    model = build_toy(embed_factory=UnquantizedToyHandle)
    objects = {n: p for n, p in model.named_parameters()}
    loaders = {n: getattr(p, "weight_loader", None) for n, p in objects.items()}
    session = Reload(model)
    session.begin()
    session.load(checkpoint_groups(1)[0])
    with pytest.raises(SyncError, match="loaded twice"):
        session.load(checkpoint_groups(1)[0])
    session.abort()
    assert all(p is objects[n] for n, p in model.named_parameters())
    assert {n: getattr(p, "weight_loader", None) for n, p in objects.items()} == loaders
    run_session(model, checkpoint_groups(2))
    assert_bits_equal(kernel_state(model), kernel_state(build_toy(seed=2, embed_factory=UnquantizedToyHandle)))
    assert torch.equal(model.head.cpu_linear(torch.eye(IN)), checkpoint_groups(2)[0][0][1].t())


def test_processing_that_does_not_rebuild_derived_state_fails():
    model = build_toy(embed_factory=UnquantizedToyHandle)
    model.embed.quant_method.process_weights_after_loading = lambda layer: None
    session = Reload(model)
    session.begin()
    with pytest.raises(RuntimeError, match=r"did not rebuild \['cpu_linear'\]"):
        session.load(checkpoint_groups(1)[0])
    session.abort()


# ------------------------------------------------------------ reload_weights
def test_reload_weights_checkpoint_format():
    model = build_toy()
    names = reload_weights(model, [t for g in checkpoint_groups(4) for t in g])
    assert "layers.1.qkv.weight" in names
    assert_bits_equal(kernel_state(model), kernel_state(build_toy(seed=4)))


def test_reload_weights_kernel_format_own_tensors_is_a_no_op():
    model = build_toy()
    before = kernel_state(model)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    names = reload_weights(model, model.named_parameters(), process_weights_after_loading=False)
    assert names == set(before)
    assert_bits_equal(kernel_state(model), before)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs


def test_reload_weights_kernel_format_wrong_shape_writes_nothing():
    model = build_toy()
    before = kernel_state(model)
    weights = [
        ("norm.weight", torch.zeros(IN)),  # valid, listed first: must not be written either
        ("layers.0.qkv.weight", torch.zeros(32, IN, dtype=torch.int8)),  # load format, not kernel (IN, 32)
    ]
    with pytest.raises(ValueError, match=r"layers\.0\.qkv\.weight.*nothing written|nothing written.*layers\.0\.qkv\.weight"):
        reload_weights(model, weights, process_weights_after_loading=False)
    assert_bits_equal(kernel_state(model), before)


def test_reload_weights_argument_errors():
    model = build_toy()
    with pytest.raises(ValueError, match="kernel format"):
        reload_weights(model, None, process_weights_after_loading=False)
    with pytest.raises(ValueError, match="not built by vLLM"):
        reload_weights(model)


# ------------------------------------------------------- quantize on arrival
def arrival_methods(model):
    return [m.quant_method for m in model.modules() if isinstance(getattr(m, "quant_method", None), ToyArrivalQuant)]


def test_arrival_layers_keep_kernel_tensors_and_count():
    model = build_toy(quant_factory=ToyArrivalQuant)
    objects = {n: p for n, p in model.named_parameters()}
    methods = arrival_methods(model)
    processed = [m.num_processed for m in methods]
    for seed in (1, 2):
        session = Reload(model)
        session.begin()
        assert model.layers[0].qkv.weight is objects["layers.0.qkv.weight"]  # not swapped
        for g in checkpoint_groups(seed):
            session.load(g)
        session.commit()
        assert [m.num_processed for m in methods] == processed  # processing not re-run
        assert all(p is objects[n] for n, p in model.named_parameters())
        assert session.layer_load_bytes() == {}  # arrival and in-place layers only
        assert session.peak_live_bytes == 0
        assert_bits_equal(kernel_state(model), kernel_state(build_toy(seed=seed, quant_factory=ToyArrivalQuant)))


def test_arrival_layer_incomplete_or_twice_fails():
    model = build_toy(quant_factory=ToyArrivalQuant)
    groups = checkpoint_groups(1)
    session = Reload(model)
    session.begin()
    with pytest.raises(SyncError, match="loaded twice"):
        session.load(groups[1] + [groups[1][0]])
    session.abort()
    session.begin()
    for g in groups:
        session.load([t for t in g if t[0] != "layers.1.v.weight"])
    with pytest.raises(SyncError, match=r"layers\.1\.qkv: \d+/\d+ elements arrived"):
        session.commit()
    session.abort()
    assert all(getattr(p, "weight_loader", None) is None or "rlsync" not in p.weight_loader.__name__ for p in model.parameters())
