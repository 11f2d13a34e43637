"""Hugging Face names from every wrapper's parameter names, in one function."""

import pytest

from rlsync.source import group_key, hf_name, is_trainer_only


@pytest.mark.parametrize("raw, want", [
    ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
    ("module.model.norm.weight", "model.norm.weight"),  # DDP / DeepSpeed engine
    ("_fsdp_wrapped_module.model.layers.1._fsdp_wrapped_module.self_attn.q_proj.weight",
     "model.layers.1.self_attn.q_proj.weight"),  # FSDP1 root + unit
    ("model.layers.2._checkpoint_wrapped_module.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"),
    ("_orig_mod.model.embed_tokens.weight", "model.embed_tokens.weight"),  # torch.compile
    ("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
     "model.layers.0.self_attn.q_proj.weight"),  # PEFT LoRA base
    ("base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias", "model.layers.0.self_attn.q_proj.bias"),
    ("base_model.model.lm_head.modules_to_save.default.weight", "lm_head.weight"),  # PEFT trained copy
    ("module.base_model.model.lm_head.modules_to_save.my_adapter.weight", "lm_head.weight"),
])
def test_hf_name_strips_every_wrapper(raw, want):
    assert hf_name(raw) == want


@pytest.mark.parametrize("raw, trainer_only", [
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", True),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight", True),
    ("base_model.model.model.embed_tokens.lora_embedding_A.default", True),
    ("base_model.model.lm_head.original_module.weight", True),
    ("base_model.model.lm_head.modules_to_save.default.weight", False),
    ("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight", False),
])
def test_trainer_only_parameters(raw, trainer_only):
    assert is_trainer_only(raw) is trainer_only


def test_group_key_is_the_outermost_layer_index():
    assert group_key("model.layers.3.mlp.experts.7.w1.weight") == "model.layers.3"
    assert group_key("model.embed_tokens.weight") is None
    assert group_key("lm_head.weight") is None
