"""Sources yield MoE models in checkpoint format: what `save_pretrained` writes, name, shape and bit.

transformers 5 fuses MoE experts in memory (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`, Mixtral's `block_sparse_moe` renamed `mlp`); the
checkpoint and vLLM's loaders use one tensor per expert. Each case builds a
tiny random model locally, saves it, and compares the source against the
safetensors file on disk.
"""

import contextlib
import os

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from rlsync.errors import ConfigError  # noqa: E402
from rlsync.source import FSDP1Source, FSDP2Source, ModuleSource, group_key  # noqa: E402

NUM_LAYERS = 2
NUM_EXPERTS = 4


def _qwen3_moe():
    config = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=NUM_EXPERTS, num_experts_per_tok=2,
    )
    return transformers.Qwen3MoeForCausalLM(config)


def _mixtral():
    config = transformers.MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=NUM_EXPERTS, num_experts_per_tok=2,
    )
    return transformers.MixtralForCausalLM(config)


def _qwen2_moe():  # routed experts plus a shared expert and its gate
    config = transformers.Qwen2MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=2,
        num_experts=NUM_EXPERTS, num_experts_per_tok=2,
    )
    return transformers.Qwen2MoeForCausalLM(config)


BUILDERS = {"qwen3_moe": _qwen3_moe, "mixtral": _mixtral, "qwen2_moe": _qwen2_moe}


def _build(kind):
    torch.manual_seed(0)
    model = BUILDERS[kind]()
    with torch.no_grad():  # random norms too, so a mix-up between tensors cannot pass
        for p in model.parameters():
            p.normal_()
    return model.eval()


def _checkpoint(model, path):
    model.save_pretrained(path)
    return load_file(os.path.join(path, "model.safetensors"))


def _collect(source):
    """Every yielded (name, tensor) copied out, and the group keys of each group."""
    tensors, keys = {}, []
    for group in source.groups():
        keys.append({group_key(name) for name, _ in group})
        for name, tensor in group:
            assert name not in tensors, f"{name} yielded twice"
            tensors[name] = tensor.detach().to("cpu", copy=True)
    return tensors, keys


def _assert_is_checkpoint(tensors, checkpoint):
    assert {(n, tuple(t.shape)) for n, t in tensors.items()} == {(n, tuple(t.shape)) for n, t in checkpoint.items()}
    for name, expected in checkpoint.items():
        assert tensors[name].dtype == expected.dtype, name
        assert torch.equal(tensors[name], expected), name


def _assert_one_layer_per_group(keys):
    layer_keys = [k for k in keys if k != {None}]
    assert all(len(k) == 1 for k in keys), keys
    assert [next(iter(k)) for k in layer_keys] == [f"model.layers.{i}" for i in range(NUM_LAYERS)]


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_module_source_yields_the_checkpoint(kind, tmp_path):
    model = _build(kind)
    checkpoint = _checkpoint(model, tmp_path)
    assert any(".experts.0." in name for name in checkpoint)  # the case is about per-expert names
    source = ModuleSource(model)
    tensors, keys = _collect(source)
    _assert_is_checkpoint(tensors, checkpoint)
    _assert_one_layer_per_group(keys)
    metadata = source.metadata()
    assert [(m.name, m.shape, m.dtype) for m in metadata] == [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    assert source.stats.live_bytes == 0


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_trainer_weights_untouched_and_bound_is_one_layer(kind, tmp_path):
    model = _build(kind)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    source = ModuleSource(model)
    for _ in source.groups():
        pass
    for name, p in model.named_parameters():
        assert p.data_ptr() == before[name][0] and torch.equal(p, before[name][1]), name
    # nothing alive beyond the trainer's storage: the per-expert gate and up tensors are views of the fused
    # gate_up (rlsync's view form of transformers' Chunk; transformers' own copies it whole, per layer)
    assert source.stats.peak_bytes == 0
    gate_up = model.model.layers[0].mlp.experts.gate_up_proj
    layer0 = next(g for g in source.groups() if any(".layers.0." in n for n, _ in g))
    experts = [t for n, t in layer0 if ".experts.0." in n and any(p in n for p in ("gate_proj", "up_proj", ".w1.", ".w3."))]
    assert experts and all(t.untyped_storage().data_ptr() == gate_up.untyped_storage().data_ptr() for t in experts)


def test_the_view_chunk_gives_transformers_chunks_values_and_names():
    from transformers.core_model_loading import Chunk

    from rlsync.source.convert import _as_views

    fused = torch.randn(4, 6, 5)
    for dim in (0, 1, 2):
        ours, theirs = _as_views(Chunk(dim=dim)), Chunk(dim=dim)
        assert type(ours) is not Chunk and isinstance(ours, Chunk) and ours.dim == dim
        targets = ["a.*", "b.*"] if fused.shape[dim] % 2 == 0 else ["a.*"]
        got = ours.convert({"x": [fused]}, source_patterns=["x"], target_patterns=targets)
        want = theirs.convert({"x": [fused]}, source_patterns=["x"], target_patterns=targets)
        assert list(got) == list(want)
        for name in want:
            assert got[name].shape == want[name].shape and torch.equal(got[name], want[name])
            assert got[name].untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()  # a view, no copy
    other = object()
    assert _as_views(other) is other


def test_mixtral_names_are_the_checkpoint_names(tmp_path):
    tensors, _ = _collect(ModuleSource(_build("mixtral")))
    layer0 = sorted(n for n in tensors if n.startswith("model.layers.0.block_sparse_moe."))
    assert "model.layers.0.block_sparse_moe.gate.weight" in layer0
    assert {f"model.layers.0.block_sparse_moe.experts.{e}.w{k}.weight" for e in range(NUM_EXPERTS) for k in (1, 2, 3)} \
        <= set(layer0)
    assert not any(".mlp." in n for n in tensors)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_small_buckets_keep_a_conversion_together(kind, tmp_path):
    model = _build(kind)
    checkpoint = _checkpoint(model, tmp_path)
    source = ModuleSource(model, bucket_bytes=4096)  # smaller than one fused expert tensor
    tensors, keys = _collect(source)
    _assert_is_checkpoint(tensors, checkpoint)
    assert source.stats.num_groups > len(keys) // 2
    assert [(m.name, m.shape) for m in source.metadata()] == [(n, tuple(t.shape)) for n, t in tensors.items()]


def test_cast_then_convert_equals_the_cast_checkpoint(tmp_path):
    model = _build("qwen3_moe")
    checkpoint = {n: t.to(torch.bfloat16) for n, t in _checkpoint(model, tmp_path).items()}
    source = ModuleSource(model, dtype=torch.bfloat16)
    tensors, _ = _collect(source)
    _assert_is_checkpoint(tensors, checkpoint)
    assert all(m.dtype == torch.bfloat16 for m in source.metadata())


def test_lora_on_attention_merges_then_converts(tmp_path):
    peft = pytest.importorskip("peft")
    model = _build("qwen3_moe")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()
    tensors, keys = _collect(ModuleSource(lora))
    _assert_one_layer_per_group(keys)
    merged = lora.merge_and_unload()
    _assert_is_checkpoint(tensors, _checkpoint(merged, tmp_path))


def test_dense_model_is_yielded_as_is():
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
    )
    model = transformers.Qwen3ForCausalLM(config)
    params = dict(model.named_parameters())
    yielded = [(n, t) for g in ModuleSource(model).groups() for n, t in g]
    assert [n for n, _ in yielded] == list(params)
    assert all(t.data_ptr() == params[n].data_ptr() for n, t in yielded)  # views of the trainer's own storage


class _NoReverse(transformers.core_model_loading.ConversionOps):
    """A loading op with no `reverse_op` (the base class raises NotImplementedError)."""

    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        return {target_patterns[0]: next(iter(input_dict.values()))}


def _with_conversions(model, transforms):
    model._weight_conversions = transforms  # what from_pretrained leaves behind
    return model


def test_irreversible_conversion_names_the_tensor():
    from transformers.core_model_loading import WeightConverter

    model = _with_conversions(_build("qwen3_moe"), [
        WeightConverter(source_patterns="mlp.experts.w_packed", target_patterns="mlp.experts.down_proj",
                        operations=[_NoReverse()]),
    ])
    source = ModuleSource(model)
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.experts\.down_proj.*cannot reverse"):
        source.metadata()
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.experts\.down_proj"):
        next(source.groups())


def test_irreversible_conversion_that_matches_nothing_is_harmless(tmp_path):
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    model = _build("qwen3_moe")
    checkpoint = _checkpoint(model, tmp_path)
    transforms = get_model_conversion_mapping(model, add_legacy=False) + [
        WeightConverter(source_patterns="vision.w_packed", target_patterns="vision.w", operations=[_NoReverse()]),
    ]
    tensors, _ = _collect(ModuleSource(_with_conversions(model, transforms)))
    _assert_is_checkpoint(tensors, checkpoint)


@contextlib.contextmanager
def _single_rank_group(tmp_path, backend="gloo"):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group(backend, init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp2_source_converts_after_the_gather(tmp_path):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = _build("mixtral")
    checkpoint = _checkpoint(model, tmp_path)
    with _single_rank_group(tmp_path):
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert isinstance(model.model.layers[0].mlp.experts.gate_up_proj, DTensor)
        source = FSDP2Source(model)
        tensors, keys = _collect(source)
        metadata = source.metadata()
    _assert_is_checkpoint(tensors, checkpoint)
    _assert_one_layer_per_group(keys)
    assert [(m.name, m.shape) for m in metadata] == [(n, tuple(t.shape)) for n, t in tensors.items()]


def test_fsdp1_source_converts_inside_the_summon(tmp_path):
    """One rank means NO_SHARD; tests/distributed covers FULL_SHARD over 2 ranks (gloo, CPU)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    model = _build("qwen3_moe")
    checkpoint = _checkpoint(model, tmp_path)
    layer_class = type(model.model.layers[0])
    with _single_rank_group(tmp_path):
        wrapped = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({layer_class}), device_id=torch.device("cpu"))
        source = FSDP1Source(wrapped)
        tensors, keys = _collect(source)
        metadata = source.metadata()
    _assert_is_checkpoint(tensors, checkpoint)
    _assert_one_layer_per_group(keys)
    assert [(m.name, m.shape) for m in metadata] == [(n, tuple(t.shape)) for n, t in tensors.items()]
