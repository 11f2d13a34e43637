"""Helpers shared by the integration tests: engines, trainer perturbation, tensor orders, read-back.

Plain functions, classes and constants that test modules import; fixtures stay in the test
modules and tests/conftest.py, where pytest finds them.
"""

import copy
import random

import torch

from rlsync.adapters.vllm_layers import read_kernel_tensor
from rlsync.quant import reference as ref
from rlsync.quant.fp8_linear import Fp8Config, quantize_full
from rlsync.source import ModuleSource, WeightSource

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SEQS = [random.Random(s).choices(range(4, 64), k=24) for s in range(4)]


def make_engine(tiny_path, **kwargs):
    """A `VLLMEngine` on the tiny checkpoint (vLLM is imported here, not when a test module is collected)."""
    from rlsync.engine import VLLMEngine

    return VLLMEngine(tiny_path, **kwargs)


def perturb(model: torch.nn.Module, scale: float = 0.01, seed: int = 0) -> None:
    """Add seeded noise to every parameter (a stand-in for an optimizer step)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


class ShuffledSource(WeightSource):
    """Every tensor of `model` in a seeded random order, regrouped in random sizes of 1..`max_group`
    (layers split apart): the worst order a source could feed a reload."""

    def __init__(self, model, seed, max_group=4):
        super().__init__()
        self.inner, self.seed, self.max_group = ModuleSource(model), seed, max_group

    def metadata(self):
        return self.inner.metadata()

    def groups(self):
        flat = [t for g in self.inner.groups() for t in g]
        rng = random.Random(self.seed)
        rng.shuffle(flat)
        while flat:
            k = rng.randint(1, self.max_group)
            yield flat[:k]
            flat = flat[k:]


def kernel_bits(engine):
    """Every module parameter as the kernel computes with it (tied LM head included), as raw bits."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
    out = {}
    for module_name, module in engine.model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            t = read_kernel_tensor(module, pname)
            out[f"{module_name}.{pname}"] = (t.dtype, t.contiguous().view(ints[t.element_size()]).clone())
    return out


def hf_logprobs(model, seqs=SEQS):
    """Log-prob of every next token of each sequence (default `SEQS`) under an HF causal LM."""
    out = []
    with torch.no_grad():
        for seq in seqs:
            logits = model(torch.tensor([seq])).logits[0, :-1].float()
            out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0])
    return out


def dequantized_trainer(trainer, scheme):
    """The fp32 trainer with every linear weight replaced by its reference FP8 dequantization."""
    cfg = Fp8Config(scheme=scheme)
    model = copy.deepcopy(trainer)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rpartition(".")[2] in LINEARS:
                w = module.weight.to(torch.bfloat16)
                q, s = quantize_full(cfg, w, [w.shape[0]])
                full = ref.expand_scale(s, tuple(w.shape), granularity=scheme, block=cfg.block)
                module.weight.copy_(ref.dequantize(q, full))
    return model
