"""Helpers shared by the integration tests: engines, trainer perturbation, tensor orders, read-back.

Plain functions, classes and constants that test modules import; fixtures stay in the test
modules and tests/conftest.py, where pytest finds them.
"""

import contextlib
import copy
import logging
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

    def __init__(self, model, seed, max_group=4, dtype=None):
        super().__init__()
        self.inner, self.seed, self.max_group = ModuleSource(model, dtype=dtype), seed, max_group

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


def fake_quantized_weight(cfg, w, widths):
    """`w` quantized by rlsync_fp8's reference (shards `widths`) and dequantized, in w's dtype."""
    w16 = w.to(torch.bfloat16)
    q, s = quantize_full(cfg, w16, widths)
    full = ref.expand_scale(s, tuple(w16.shape), granularity=cfg.scheme, widths=widths, block=cfg.block)
    return ref.dequantize(q, full).to(w.dtype)


def dequantized_trainer(trainer, scheme):
    """The fp32 trainer with every weight rlsync_fp8 quantizes replaced by its reference FP8 dequantization.

    Linear layers (`LINEARS`, shared experts included) one checkpoint tensor
    at a time; transformers-5 fused experts (`experts.gate_up_proj` (E, 2I, H),
    `experts.down_proj` (E, H, I)) one expert at a time, gate and up as the two
    shards of that expert's fused weight, as the engine stores them. Router
    gates stay as they are (the engine keeps them in bf16).
    """
    cfg = Fp8Config(scheme=scheme)
    model = copy.deepcopy(trainer)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rpartition(".")[2] in LINEARS:
                module.weight.copy_(fake_quantized_weight(cfg, module.weight, [module.weight.shape[0]]))
            gate_up = module._parameters.get("gate_up_proj")
            if gate_up is not None and gate_up.dim() == 3:
                i = gate_up.shape[1] // 2
                for e in range(gate_up.shape[0]):
                    gate_up[e].copy_(fake_quantized_weight(cfg, gate_up[e], [i, i]))
                    module.down_proj[e].copy_(fake_quantized_weight(cfg, module.down_proj[e], [module.down_proj.shape[1]]))
    return model


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def vllm_warnings():
    """Every WARNING (and above) vLLM logs while open, as `logging.LogRecord`s (vLLM's own handlers keep theirs)."""
    handler, logger = _Records(), logging.getLogger("vllm")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
