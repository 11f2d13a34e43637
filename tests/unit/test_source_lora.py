"""LoRA: merged per group, equal to PEFT's own merge_and_unload bit for bit, trainer weights untouched."""

import copy

import pytest
import torch

from rlsync.errors import ConfigError
from rlsync.source import ModuleSource, group_key, hf_name, is_trainer_only, source_for

peft = pytest.importorskip("peft")


def lora_model(model, **kwargs):
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, **kwargs)
    return peft.get_peft_model(model, config)


@pytest.fixture
def untied_model():
    from transformers import AutoModelForCausalLM

    from rlsync.default_model import TinyModelSpec, tiny_model_path

    path = tiny_model_path(TinyModelSpec(tie_word_embeddings=False))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def collect(source):
    out = {}
    for group in source.groups():
        assert len({group_key(n) for n, _ in group}) == 1
        for name, tensor in group:
            assert name not in out
            out[name] = tensor.clone()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_groups_equal_merge_and_unload(untied_model, dtype):
    model = lora_model(untied_model.to(dtype), target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                       modules_to_save=["lm_head"])
    with torch.no_grad():  # make the trained copy differ from the frozen original
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    source = source_for(model)
    assert isinstance(source, ModuleSource)
    got = collect(source)
    want = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])
    assert torch.equal(got["lm_head.weight"], before["base_model.model.lm_head.modules_to_save.default.weight"])
    for name, p in model.named_parameters():  # bit-identical trainer afterwards
        assert torch.equal(p, before[name]), name
    total = sum(t.nbytes for t in got.values())
    assert 0 < source.stats.peak_bytes < total / 2  # one group's merged copies, never the model


def test_disabled_adapters_yield_the_base_weights(untied_model):
    model = lora_model(untied_model, target_modules=["q_proj"])
    base = {hf_name(n): p for n, p in model.named_parameters() if not is_trainer_only(n)}
    with model.disable_adapter():
        got = collect(source_for(model))
    assert got.keys() == base.keys()
    assert all(torch.equal(got[n], base[n]) for n in got)
    assert not torch.equal(collect(source_for(model))["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])  # enabled again: merged


@pytest.mark.parametrize("kwargs, needle", [
    ({"use_dora": True}, "DoRA"),
    ({"lora_bias": True}, "lora_bias"),
])
def test_unsupported_lora_kinds_raise(untied_model, kwargs, needle):
    model = lora_model(untied_model, target_modules=["q_proj"], **kwargs)
    with pytest.raises(ConfigError, match=needle):
        source_for(model)


def test_source_for_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        source_for(object())


def test_importing_rlsync_source_stays_lean():
    import subprocess
    import sys

    code = "import sys, rlsync.source; print(sorted(m for m in ('deepspeed', 'peft', 'vllm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
