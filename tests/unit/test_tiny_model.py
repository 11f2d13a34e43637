"""rlsync.default_model builds the same checkpoint every time, locally, loadable by transformers, for every family."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open

from rlsync.default_model import FAMILIES, MOE_FAMILIES, TinyModelSpec, build_tokenizer, family_spec, tiny_model_path


def digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_checkpoint_is_deterministic_and_cached(tmp_path, monkeypatch):
    spec = TinyModelSpec(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)
    monkeypatch.setenv("RLSYNC_CACHE_DIR", str(tmp_path / "a"))
    a = tiny_model_path(spec)
    assert tiny_model_path(spec) == a  # cached: same directory, not rebuilt
    monkeypatch.setenv("RLSYNC_CACHE_DIR", str(tmp_path / "b"))
    b = tiny_model_path(spec)
    assert a != b and digest(a) == digest(b)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in a.iterdir()}
    other = tiny_model_path(TinyModelSpec(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, seed=1))
    assert digest(other) != digest(b)


def test_tokenizer_round_trips_text_one_token_per_char():
    tok = build_tokenizer()
    assert len(tok) == 64
    ids = tok("abc: 12!")["input_ids"]
    assert len(ids) == 8 and tok.decode(ids) == "abc: 12!"


def test_default_is_the_qwen2_model_it_always_was():
    """Families came later: the default spec, its cache key (hence cached checkpoints) and directory stay."""
    spec = TinyModelSpec()
    assert spec.family == "qwen2" and spec.tied() and FAMILIES[0] == "qwen2"
    assert spec.key() == "21b7760b38a6"  # the key before families existed; MoE fields do not enter a dense key
    assert TinyModelSpec(tie_word_embeddings=True).key() == spec.key()  # None resolves to the family's choice
    assert tiny_model_path(spec).name == f"tiny-qwen2-{spec.key()}"


# Per family: transformers class, tied head, checkpoint tensors of layer 0 that mark the family's layout,
# and the config keys its quirks need.
EXPECTED = {
    "qwen2": ("Qwen2ForCausalLM", True, ["self_attn.q_proj.bias"], {}),
    "llama": ("LlamaForCausalLM", True, ["self_attn.q_proj.weight", "mlp.gate_proj.weight"], {"head_dim": 64}),
    "qwen3": ("Qwen3ForCausalLM", True, ["self_attn.q_norm.weight", "self_attn.k_norm.weight"], {"head_dim": 64}),
    "mistral": ("MistralForCausalLM", False, ["self_attn.q_proj.weight"], {"head_dim": 64, "sliding_window": None}),
    "gemma3": ("Gemma3ForCausalLM", True, ["pre_feedforward_layernorm.weight", "self_attn.q_norm.weight"], {
        "head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("Phi3ForCausalLM", False, ["self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"], {
        "original_max_position_embeddings": 512, "pad_token_id": 0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}}),
    "granite": ("GraniteForCausalLM", True, ["self_attn.q_proj.weight"], {
        "embedding_multiplier": 12.0, "logits_scaling": 8.0, "residual_multiplier": 0.22, "attention_multiplier": 1 / 64}),
    "olmo2": ("Olmo2ForCausalLM", False, ["self_attn.q_norm.weight", "post_feedforward_layernorm.weight"], {}),
    "qwen3_moe": ("Qwen3MoeForCausalLM", False, ["mlp.gate.weight", "mlp.experts.7.down_proj.weight"], {
        "num_local_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "norm_topk_prob": True}),
    "mixtral": ("MixtralForCausalLM", False, ["block_sparse_moe.gate.weight", "block_sparse_moe.experts.7.w2.weight"], {
        "num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 128}),
    "qwen2_moe": ("Qwen2MoeForCausalLM", False, ["mlp.shared_expert.gate_proj.weight", "mlp.shared_expert_gate.weight",
                                                 "mlp.experts.7.up_proj.weight"], {
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
        "shared_expert_intermediate_size": 512}),
}


def test_every_family_is_listed_once():
    assert sorted(EXPECTED) == sorted(FAMILIES)
    assert set(MOE_FAMILIES) == {"qwen3_moe", "mixtral", "qwen2_moe"}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_builds_and_loads_with_transformers(family, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("RLSYNC_CACHE_DIR", str(tmp_path))
    path = tiny_model_path(family_spec(family))
    assert path.name.startswith(f"tiny-{family}-")
    cls_name, tied, marks, quirks = EXPECTED[family]
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [cls_name] and config["tie_word_embeddings"] is tied
    assert {k: config.get(k, "missing") for k in quirks} == quirks
    assert config["hidden_size"] == 256 and config["num_hidden_layers"] == 2 and config["vocab_size"] == 64
    with safe_open(path / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.layers.0.input_layernorm.weight" if family != "olmo2"
                           else "model.layers.0.post_attention_layernorm.weight").get_dtype() == "BF16"
    assert {f"model.layers.0.{m}" for m in marks} <= names, sorted(names)
    assert ("lm_head.weight" in names) is not tied
    if family in MOE_FAMILIES:
        assert sum(".layers.0." in n and ".experts." in n for n in names) == 8 * 3  # 8 experts, 3 projections each

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert type(model).__name__ == cls_name
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    assert head_dim == 64
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 6, 7, 8]])).logits
    assert logits.shape == (1, 5, 64) and torch.isfinite(logits).all()


def test_tie_follows_the_family_unless_set():
    assert family_spec("llama").tied() and family_spec("gemma3").tied() and not family_spec("mistral").tied()
    assert family_spec("llama", tie_word_embeddings=False).tied() is False
    assert family_spec("llama", tie_word_embeddings=False).key() != family_spec("llama").key()


def test_unknown_family_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model family 'gpt5'.*qwen2, llama, .*qwen2_moe"):
        TinyModelSpec(family="gpt5")
    with pytest.raises(ValueError, match="unknown model family"):
        family_spec("Llama")


def test_moe_fields_on_a_dense_family_warn_and_change_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RLSYNC_CACHE_DIR", str(tmp_path))
    assert family_spec("llama", num_experts=4).key() == family_spec("llama").key()
    with pytest.warns(UserWarning, match="num_experts ignored by the dense family 'llama'"):
        tiny_model_path(family_spec("llama", num_experts=4))
