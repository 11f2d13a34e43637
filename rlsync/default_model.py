"""The product's built-in default model: tiny, deterministic Hugging Face checkpoints built locally.

Why: the default recipe config (`model.path: null`), the README example, tests
and the benchmarks all need a real
Qwen2-shaped checkpoint directory (config.json, safetensors, a fast tokenizer)
that vLLM and transformers load like any other. Downloading one is not an
option here, so we build it: a character-level tokenizer and a randomly
initialised `Qwen2ForCausalLM`, seeded, saved in bf16, cached on disk.

Concurrent builders (the ranks of a `torchrun` job on a fresh machine) take a
file lock; a directory is used only when every file of a checkpoint is there,
and an incomplete one left by a killed builder is rebuilt.

What it does not do: produce a model that knows anything. The weights are
random; tasks built on it must be learnable from scratch.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

# Characters of the tokenizer, after the special tokens. Order is part of the
# cache key: changing it changes every token id.
_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 .,:;?!=+-*/()\"'#%&<>[]_")  # 60 + 4 specials = 64
_FORMAT_VERSION = 1


@dataclasses.dataclass(kw_only=True, slots=True, frozen=True)
class TinyModelSpec:
    """Shape of a locally built Qwen2-style checkpoint."""

    hidden_size: int = 256
    """Model width; a multiple of 128 so 128x128 FP8 blocks tile every linear."""
    intermediate_size: int = 512
    """MLP width."""
    num_hidden_layers: int = 2
    """Decoder layers."""
    num_attention_heads: int = 4
    """Query heads (head_dim = hidden_size / num_attention_heads)."""
    num_key_value_heads: int = 2
    """KV heads (grouped-query attention, like Qwen2)."""
    vocab_size: int = 64
    """Embedding rows; at least the tokenizer's size."""
    tie_word_embeddings: bool = True
    """Share the embedding with the LM head, as small Qwen2 models do."""
    max_position_embeddings: int = 512
    """Longest sequence."""
    seed: int = 0
    """Seed for the random initialisation."""

    def key(self) -> str:
        blob = json.dumps([_FORMAT_VERSION, dataclasses.asdict(self), _SPECIALS, _CHARS])
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# A ~180M-parameter shape for benchmarks (hidden 1024, 16 layers, 16/4 heads).
BENCH_SPEC = TinyModelSpec(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32768,
    tie_word_embeddings=False,
    max_position_embeddings=2048,
)


def cache_dir() -> Path:
    """Where built checkpoints live: $RLSYNC_CACHE_DIR, else ~/.cache/rlsync."""
    return Path(os.environ.get("RLSYNC_CACHE_DIR", Path.home() / ".cache" / "rlsync"))


def build_tokenizer():
    """A character-level fast tokenizer: every listed character is one token."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS + _CHARS)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=4096,
    )


def tiny_model_path(spec: TinyModelSpec | None = None) -> Path:
    """Return the checkpoint directory for `spec`, building it once if missing."""
    spec = spec or TinyModelSpec()
    path = cache_dir() / f"tiny-qwen2-{spec.key()}"
    if _complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others find it done
        if _complete(path):
            return path
        shutil.rmtree(path, ignore_errors=True)  # an incomplete directory from a killed builder
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
        try:
            _write_checkpoint(tmp, spec)
            os.rename(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


_CHECKPOINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def _complete(path: Path) -> bool:
    """Every file a checkpoint needs is there (weights in one file or sharded with an index)."""
    weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return weights and all((path / name).is_file() for name in _CHECKPOINT_FILES)


def _write_checkpoint(path: Path, spec: TinyModelSpec) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    if spec.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={spec.vocab_size} < tokenizer size {len(tokenizer)}")
    config = Qwen2Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_theta=10000.0,
        torch_dtype="bfloat16",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="2GB")
    tokenizer.save_pretrained(path)
