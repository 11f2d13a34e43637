"""The product's built-in default models: tiny, deterministic Hugging Face checkpoints built locally.

Why: the default recipe config (`model.path: null`), the README example, tests
and the benchmarks all need a real checkpoint directory (config.json,
safetensors, a fast tokenizer) that vLLM and transformers load like any other.
Downloading one is not an option here, so we build it: a character-level
tokenizer and a randomly initialised transformers CausalLM, seeded, saved in
bf16, cached on disk.

The default family is Qwen2 (`TinyModelSpec()`). `FAMILIES` lists the others RL
is run on, each built the way its real small checkpoints are (tied or untied
head, q/k norms, Gemma 3's sliding layers, Granite's multipliers, Phi-3's fused
`qkv_proj` / `gate_up_proj` tensors, MoE experts); `family_spec(name)` is the
tiny spec for one of them. A family is one row of `_FAMILIES` (data, not code).

Concurrent builders (the ranks of a `torchrun` job on a fresh machine) take a
file lock; a directory is used only when every file of a checkpoint is there,
and an incomplete one left by a killed builder is rebuilt.

What it does not do:
1. Produce a model that knows anything. The weights are random; tasks built on
   it must be learnable from scratch.
2. Reproduce a family's every option (long-context rope scaling, Gemma 3's
   multimodal wrapper, Phi-3's partial rotary variants): only what changes the
   checkpoint's tensors or how an engine must load them.
3. Check that vLLM runs a family; tests/integration/test_family_matrix.py does.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Characters of the tokenizer, after the special tokens. Order is part of the
# cache key: changing it changes every token id.
_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 .,:;?!=+-*/()\"'#%&<>[]_")  # 60 + 4 specials = 64
_FORMAT_VERSION = 1
_MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")


@dataclasses.dataclass(kw_only=True, slots=True, frozen=True)
class TinyModelSpec:
    """Shape of a locally built checkpoint of one model family."""

    family: str = "qwen2"
    """Model family, one of `FAMILIES` (`qwen2`: the default, as small Qwen2 models)."""
    hidden_size: int = 256
    """Model width; a multiple of 128 so 128x128 FP8 blocks tile every linear."""
    intermediate_size: int = 512
    """MLP width (MoE families: dense layers' and Qwen2-MoE's shared expert's width)."""
    num_hidden_layers: int = 2
    """Decoder layers."""
    num_attention_heads: int = 4
    """Query heads (head_dim = hidden_size / num_attention_heads)."""
    num_key_value_heads: int = 2
    """KV heads (grouped-query attention, like Qwen2)."""
    vocab_size: int = 64
    """Embedding rows; at least the tokenizer's size."""
    tie_word_embeddings: bool | None = None
    """Share the embedding with the LM head; None: as the family's small models do (`tied()`)."""
    max_position_embeddings: int = 512
    """Longest sequence."""
    num_experts: int = 8
    """MoE families: routed experts per layer (ignored, with a warning if changed, by dense families)."""
    num_experts_per_tok: int = 2
    """MoE families: experts each token is routed to."""
    moe_intermediate_size: int = 128
    """MoE families: each routed expert's MLP width."""
    seed: int = 0
    """Seed for the random initialisation."""

    def __post_init__(self) -> None:
        family_of(self.family)  # an unknown family fails here, naming the known ones

    def tied(self) -> bool:
        """Whether the LM head shares the embedding (`tie_word_embeddings`, else the family's usual choice)."""
        return family_of(self.family).tied if self.tie_word_embeddings is None else self.tie_word_embeddings

    @property
    def head_dim(self) -> int:
        """Per-head width, set explicitly in every family's config (64 for the default shape)."""
        return self.hidden_size // self.num_attention_heads

    def key(self) -> str:
        """Hash of every field that shapes the checkpoint, but the family, which names the directory
        (`tiny-{family}-{key}`). Fields a family ignores are left out, so a Qwen2 spec keeps the key it had
        before families existed (and its cached checkpoint)."""
        fields = {**dataclasses.asdict(self), "tie_word_embeddings": self.tied()}
        del fields["family"]
        if not family_of(self.family).moe:
            for name in _MOE_FIELDS:
                del fields[name]
        blob = json.dumps([_FORMAT_VERSION, fields, _SPECIALS, _CHARS])
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True, slots=True)
class Family:
    """How one model family's tiny checkpoint is built (a row of the family table)."""

    model_class: str
    """transformers CausalLM class; its `config_class` builds the config."""
    tied: bool
    """Whether the family's small checkpoints tie the LM head to the embedding."""
    moe: bool
    """Whether the spec's `num_experts` / `num_experts_per_tok` / `moe_intermediate_size` apply."""
    extra: Callable[[TinyModelSpec], dict[str, Any]]
    """Family-specific config keys on top of the shared shape (head_dim, norms, multipliers, experts)."""


def _head_dim(spec: TinyModelSpec) -> dict[str, Any]:
    """Configs whose default head_dim is not hidden / heads (Qwen3: 128, Gemma 3: 256) get it explicitly."""
    return {"head_dim": spec.head_dim}


_FAMILIES: dict[str, Family] = {
    # The default, exactly as before families existed (the checkpoint is bit for bit the same).
    "qwen2": Family("Qwen2ForCausalLM", tied=True, moe=False, extra=lambda s: {"rope_theta": 10000.0}),
    # Llama 3.2 1B / 3B tie the head.
    "llama": Family("LlamaForCausalLM", tied=True, moe=False, extra=_head_dim),
    # Qwen3: per-head q/k RMSNorm; the small ones tie the head.
    "qwen3": Family("Qwen3ForCausalLM", tied=True, moe=False, extra=_head_dim),
    # Mistral 7B v0.2+: no sliding window, untied.
    "mistral": Family("MistralForCausalLM", tied=False, moe=False,
                      extra=lambda s: {**_head_dim(s), "sliding_window": None}),
    # Gemma 3 (text): interleaved sliding / full layers (one of each here, window shorter than the test
    # sequences), queries scaled by query_pre_attn_scalar**-0.5 = head_dim**-0.5, (1 + w) norms, tied.
    "gemma3": Family("Gemma3ForCausalLM", tied=True, moe=False, extra=lambda s: {
        **_head_dim(s),
        "query_pre_attn_scalar": s.head_dim,
        "sliding_window": 16,
        "layer_types": [("full_attention" if i % 2 else "sliding_attention") for i in range(s.num_hidden_layers)],
    }),
    # Phi-3 mini: fused qkv_proj / gate_up_proj in the checkpoint, full rotary, untied. Its config's
    # pad id (32000) and original_max_position_embeddings follow the tiny shape.
    "phi3": Family("Phi3ForCausalLM", tied=False, moe=False, extra=lambda s: {
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
        "original_max_position_embeddings": s.max_position_embeddings,
        "sliding_window": None,
    }),
    # Granite 3.x: the 2B model's multipliers (attention_multiplier = 1 / head_dim there), tied.
    "granite": Family("GraniteForCausalLM", tied=True, moe=False, extra=lambda s: {
        "embedding_multiplier": 12.0,
        "logits_scaling": 8.0,
        "residual_multiplier": 0.22,
        "attention_multiplier": 1.0 / s.head_dim,
    }),
    # OLMo 2: q/k RMSNorm over the whole projection, norms after attention and MLP, untied.
    "olmo2": Family("Olmo2ForCausalLM", tied=False, moe=False, extra=lambda s: {}),
    # Qwen3-30B-A3B's layout: every layer sparse, top-k weights renormalised, untied.
    "qwen3_moe": Family("Qwen3MoeForCausalLM", tied=False, moe=True, extra=lambda s: {
        "num_experts": s.num_experts,
        "num_experts_per_tok": s.num_experts_per_tok,
        "moe_intermediate_size": s.moe_intermediate_size,
        "norm_topk_prob": True,
    }),
    # Mixtral: its intermediate_size is the expert width; untied.
    "mixtral": Family("MixtralForCausalLM", tied=False, moe=True, extra=lambda s: {
        **_head_dim(s),
        "num_local_experts": s.num_experts,
        "num_experts_per_tok": s.num_experts_per_tok,
        "intermediate_size": s.moe_intermediate_size,
    }),
    # Qwen1.5-MoE: routed experts plus a gated shared expert (intermediate_size wide), qkv bias, untied.
    "qwen2_moe": Family("Qwen2MoeForCausalLM", tied=False, moe=True, extra=lambda s: {
        "num_experts": s.num_experts,
        "num_experts_per_tok": s.num_experts_per_tok,
        "moe_intermediate_size": s.moe_intermediate_size,
        "shared_expert_intermediate_size": s.intermediate_size,
        "norm_topk_prob": False,
    }),
}

FAMILIES: tuple[str, ...] = tuple(_FAMILIES)
"""Every family `TinyModelSpec.family` accepts; `qwen2` (the default) first."""

MOE_FAMILIES: tuple[str, ...] = tuple(name for name, f in _FAMILIES.items() if f.moe)
"""The families whose checkpoints hold routed experts."""


def family_of(name: str) -> Family:
    """The family table row for `name`; `ValueError` naming the known families otherwise."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_spec(name: str, **overrides: Any) -> TinyModelSpec:
    """The tiny spec of family `name` (hidden 256, 2 layers, head_dim 64, vocab 64; MoE: 8 experts, top 2)."""
    return TinyModelSpec(family=name, **overrides)


BENCH_SHAPE: dict[str, Any] = {
    "hidden_size": 1024,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 32768,
    "tie_word_embeddings": False,
    "max_position_embeddings": 2048,
}
"""The benchmarks' model shape (hidden 1024, 16 layers, 16/4 heads, untied 32k vocabulary), dense and MoE."""

# A ~180M-parameter shape for benchmarks (hidden 1024, 16 layers, 16/4 heads).
BENCH_SPEC = TinyModelSpec(intermediate_size=2816, **BENCH_SHAPE)


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
    """Return the checkpoint directory for `spec` (default: tiny Qwen2), building it once if missing."""
    spec = spec or TinyModelSpec()
    _warn_ignored(spec)
    path = cache_dir() / f"tiny-{spec.family}-{spec.key()}"
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


def _warn_ignored(spec: TinyModelSpec) -> None:
    """Warn when a dense family's spec sets MoE fields away from their defaults (they change nothing)."""
    if family_of(spec.family).moe:
        return
    default = TinyModelSpec()
    changed = [f for f in _MOE_FIELDS if getattr(spec, f) != getattr(default, f)]
    if changed:
        warnings.warn(f"TinyModelSpec: {', '.join(changed)} ignored by the dense family {spec.family!r}", stacklevel=3)


_CHECKPOINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def _complete(path: Path) -> bool:
    """Every file a checkpoint needs is there (weights in one file or sharded with an index)."""
    weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return weights and all((path / name).is_file() for name in _CHECKPOINT_FILES)


def _write_checkpoint(path: Path, spec: TinyModelSpec) -> None:
    import torch
    import transformers

    tokenizer = build_tokenizer()
    if spec.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={spec.vocab_size} < tokenizer size {len(tokenizer)}")
    family = family_of(spec.family)
    model_class = getattr(transformers, family.model_class)
    shape = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tied(),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="bfloat16",
    )
    config = model_class.config_class(**{**shape, **family.extra(spec)})  # the family's keys win (Mixtral's width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = model_class(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="2GB")
    tokenizer.save_pretrained(path)
