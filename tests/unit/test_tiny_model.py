"""rlsync.default_model builds the same checkpoint every time, locally, loadable by transformers."""

import hashlib

from rlsync.default_model import TinyModelSpec, build_tokenizer, tiny_model_path


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
