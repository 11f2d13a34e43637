"""Shared fixtures. vLLM runs in-process (colocated), with a small KV cache."""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_path():
    """The default tiny Qwen2 checkpoint (built once, cached on disk)."""
    from rlsync.testing import tiny_model_path

    return tiny_model_path()


@pytest.fixture
def trainer_model(tiny_path):
    """A fresh fp32 trainer model loaded from the tiny checkpoint."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)


def perturb(model: torch.nn.Module, scale: float = 0.01, seed: int = 0) -> None:
    """Add seeded noise to every parameter (a stand-in for an optimizer step)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
