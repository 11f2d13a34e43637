"""The family matrix (issue 13): every dense family RL is run on, in bf16 and `rlsync_fp8` channel; Llama also per
tensor and per block (`EVERY_SCHEME`).

For each (family, engine config), one real vLLM CPU engine is built from the family's tiny checkpoint
(`rlsync.default_model.family_spec`), the same checkpoint is loaded with transformers as the fp32 trainer, and
the trainer is perturbed and synced twice (different perturbations) with verify on. Each sync must:
- report verified, with every written tensor verified (`num_verified == num_written > 0`);
- move the engine's log-probs onto the reference: the trainer itself for bf16, the trainer with every linear
  weight replaced by its reference FP8 dequantization for FP8 (`fake_quantized`; Phi-3's checkpoint-fused
  `qkv_proj` / `gate_up_proj` are dequantized shard by shard, as the engine quantizes them);
- and the engine before the sync must be far from that reference (more than `SEPARATION` times the tolerance),
  so the test cannot pass if a sync did nothing.

Tolerances, measured on this CPU (`pytest -s` prints every figure): the engine computes in bf16 and the
reference in fp32, so bf16 and FP8 engines alike sit one bf16-compute error from their reference. Largest seen:
0.016 (bf16, OLMo 2; 0.013 for the others) and 0.018 (FP8, OLMo 2 channel; 0.020 for Qwen3 block when every
scheme ran on every family). The bf16 tolerance is the one of tests/integration/test_engine_sync.py (0.02);
FP8 gets 0.03. A sync that did nothing leaves the engine >= 0.70 from the reference (>= 0.45 for Granite,
perturbed 4x harder: see `GRANITE_PERTURB_SCALE`), over `SEPARATION` (3) tolerances.

Every case also loads a trainer before and one after building the engine: both must run and agree, and the
trainer's decoder class must be untouched. OLMo 2 runs on vLLM's Transformers modeling backend, which used to
patch transformers' `Olmo2Model` class in place (a trainer then failed either way);
`rlsync.adapters.vllm_engine.transformers_classes_untouched` prevents it, and refuses the build where vLLM
would compile the model (tested last).

Every second sync replays the sync plan the first one recorded (`rlsync.reload.plan`): `report.planned` says
so, and its verify is the replay's bit-for-bit check against the reference.

Runtime: one engine at a time, dropped after its case (vLLM's in-process state is process-global).
"""

import gc

import pytest
import torch

from rlsync.default_model import family_spec, tiny_model_path
from rlsync.errors import ConfigError
from rlsync.quant import reference as ref
from rlsync.quant.fp8_linear import Fp8Config, quantize_full
from tests.integration.support import SEQS, dequantized_trainer, hf_logprobs, make_engine, perturb

DENSE = ("llama", "qwen3", "mistral", "gemma3", "phi3", "granite", "olmo2")
CONFIGS = {
    "bf16": {"quantization": None},
    "fp8-tensor": {"quantization": "rlsync_fp8", "fp8_scheme": "tensor"},
    "fp8-channel": {"quantization": "rlsync_fp8", "fp8_scheme": "channel"},
    "fp8-block": {"quantization": "rlsync_fp8", "fp8_scheme": "block"},
}
BF16_LOGPROB_TOL = 0.02
FP8_LOGPROB_TOL = 0.03
SEPARATION = 3.0
"""The engine before a sync is more than this many tolerances away from the new reference."""
PERTURB_SCALE = 0.01
GRANITE_PERTURB_SCALE = 0.04
"""Granite divides its logits by logits_scaling = 8 (and scales residuals by 0.22): at 0.01 a sync moves its
log-probs only ~0.08, under `SEPARATION` FP8 tolerances; 0.04 moves them >= 0.45."""
MAX_MODEL_LEN = 64  # the scored sequences are 24 tokens

EVERY_SCHEME = ("llama",)
"""Families run with every FP8 scheme (the others: bf16 and channel). Every scheme ran on every family when the
matrix was built (29 cases, 2.5 minutes, all within the tolerances below); the suite's time budget keeps one
family here; tests/integration/test_plugin_fp8.py (TP 1) and tests/distributed/test_tensor_parallel.py (TP 2) run
every scheme on the tiny Qwen2."""

CASES = [
    pytest.param(family, config, id=f"{family}-{config}")
    for family in DENSE
    for config in CONFIGS
    if family in EVERY_SCHEME or config in ("bf16", "fp8-channel")
]

FUSED = ("qkv_proj", "gate_up_proj")
"""Linears a checkpoint may hold already fused (Phi-3); `support.dequantized_trainer` leaves them alone."""


def fused_widths(config, leaf: str) -> list[int]:
    """Shard widths of a checkpoint-fused linear: [q, k, v] rows or [gate, up] rows."""
    if leaf == "gate_up_proj":
        return [config.intermediate_size] * 2
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return [config.num_attention_heads * head_dim] + [config.num_key_value_heads * head_dim] * 2


def fake_quantized(trainer, scheme: str):
    """`support.dequantized_trainer`, plus checkpoint-fused linears dequantized with their shard widths
    (per-tensor FP8 keeps one scale per shard, as the engine does)."""
    model = dequantized_trainer(trainer, scheme)
    cfg = Fp8Config(scheme=scheme)
    with torch.no_grad():
        for name, module in model.named_modules():
            leaf = name.rpartition(".")[2]
            if leaf in FUSED:
                w = module.weight.to(torch.bfloat16)
                widths = fused_widths(model.config, leaf)
                q, s = quantize_full(cfg, w, widths)
                full = ref.expand_scale(s, tuple(w.shape), granularity=scheme, widths=widths, block=cfg.block)
                module.weight.copy_(ref.dequantize(q, full))
    return model


def load_trainer(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def max_diff(a, b) -> float:
    return float((torch.cat(a) - torch.cat(b)).abs().max())


def decoder_class_state(model):
    """Class, bases and attributes of a trainer's decoder class (`Olmo2Model`, `LlamaModel`, ...): what vLLM's
    Transformers backend would patch for torch.compile."""
    cls = type(model.model)
    return cls, cls.__bases__, {k: v for k, v in vars(cls).items() if k != "__weakref__"}


@pytest.fixture
def case(request):
    """{"trainer": built before the engine, "engine": for the test's (family, config)}; the engine is dropped
    when the test ends. pytest holds a fixture's value until its teardown is over, so the engine is taken out
    of it here: otherwise it would be destroyed during the next engine's build, under that engine."""
    family, config = request.node.callspec.params["family"], request.node.callspec.params["config"]
    path = tiny_model_path(family_spec(family))
    held = {"trainer": load_trainer(path)}
    held["engine"] = make_engine(path, max_model_len=MAX_MODEL_LEN, **CONFIGS[config])
    yield held
    held.clear()
    gc.collect()


@pytest.mark.parametrize("family, config", CASES)
def test_two_syncs_verify_and_match_the_reference(family, config, case):
    trainer, engine = case["trainer"], case["engine"]
    scheme = CONFIGS[config].get("fp8_scheme")
    tol = BF16_LOGPROB_TOL if scheme is None else FP8_LOGPROB_TOL
    # Colocated: trainer models built before and after the engine both work and agree (OLMo 2, on vLLM's
    # Transformers backend, broke both ways while vLLM patched transformers' Olmo2Model class).
    state = decoder_class_state(trainer)
    late = load_trainer(engine.config.model)
    assert decoder_class_state(late) == state, "building the engine changed the trainer's decoder class"
    assert max_diff(hf_logprobs(late), hf_logprobs(trainer)) == 0.0
    before = engine.score(SEQS)
    scale = GRANITE_PERTURB_SCALE if family == "granite" else PERTURB_SCALE
    for step, seed in ((1, 11), (2, 12)):
        perturb(trainer, scale=scale, seed=seed)
        report = engine.sync(trainer, step=step, verify=True)
        assert report.verified and report.num_verified == report.num_written > 0, report
        assert report.planned is (step == 2), report  # the second sync replays the plan the first recorded
        want = hf_logprobs(trainer if scheme is None else fake_quantized(trainer, scheme))
        after = engine.score(SEQS)
        diff, stale = max_diff(after, want), max_diff(before, want)
        print(f"{family} {config} step {step}: max|d logp| vs reference {diff:.4f} (tol {tol}), "
              f"before the sync {stale:.4f}")
        assert diff <= tol, f"engine vs reference max |d logp| = {diff:.4f} > {tol}"
        assert stale > SEPARATION * tol, f"the sync cannot be told from no sync: before it {stale:.4f} from the reference"
        before = after
    if family == "olmo2":
        assert type(engine.model).__name__ == "TransformersForCausalLM"  # it did run on the Transformers backend


# --- an OLMo 2 engine vLLM would compile cannot leave transformers' class alone: refused ------------------------

def test_olmo2_engine_that_would_compile_is_refused_naming_the_way_out():
    """Where vLLM would torch.compile the Transformers-backend decoder, its class patch cannot be avoided:
    the build is refused before the class is touched, and the trainer keeps working."""
    path = tiny_model_path(family_spec("olmo2"))
    trainer = load_trainer(path)
    state = decoder_class_state(trainer)
    with pytest.raises(ConfigError, match=r"Olmo2Model runs on vLLM's Transformers modeling backend.*enforce_eager=True"):
        make_engine(path, max_model_len=MAX_MODEL_LEN, enforce_eager=False)
    gc.collect()
    assert decoder_class_state(load_trainer(path)) == state
    hf_logprobs(trainer)  # still runs


def test_an_untied_embeddings_unused_gemm_handle_is_built_only_when_called():
    """With an LM head of its own (Mistral), a sync leaves the embedding's GEMM handle, which vLLM's forward
    never calls, unbuilt (`LazyHandle`); the head's is rebuilt and log-probs follow the new weights. Verify
    reads the embedding back through its handle: that builds it, bit for bit."""
    from rlsync.adapters.vllm_layers import LazyHandle

    path = tiny_model_path(family_spec("mistral"))
    engine = make_engine(str(path), max_model_len=MAX_MODEL_LEN)
    try:
        embed, head = engine.model.model.embed_tokens, engine.model.lm_head
        assert embed.weight is not head.weight and "cpu_linear" in embed.__dict__
        trainer = load_trainer(path)
        perturb(trainer, scale=PERTURB_SCALE, seed=21)
        engine.sync(trainer, step=1)
        assert isinstance(embed.__dict__["cpu_linear"], LazyHandle)
        assert not isinstance(head.__dict__["cpu_linear"], LazyHandle)
        err = max_diff(engine.score(SEQS), hf_logprobs(trainer))
        assert err < BF16_LOGPROB_TOL, err
        assert isinstance(embed.__dict__["cpu_linear"], LazyHandle)  # generation never called it
        report = engine.sync(trainer, step=2, verify=True)
        assert report.verified and report.num_verified == report.num_written > 0
        assert not isinstance(embed.__dict__["cpu_linear"], LazyHandle)
    finally:
        del engine
        gc.collect()
