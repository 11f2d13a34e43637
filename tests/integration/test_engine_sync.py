"""VLLMEngine.sync on the real vLLM CPU engine: exact weights, stable storage, fail closed."""

import gc

import pytest
import torch

from rlsync.adapters import vllm_engine, vllm_layers
from rlsync.engine import EngineState
from rlsync.errors import EngineNotReady, SyncError
from rlsync.quant import reference
from rlsync.source import ModuleSource
from tests.integration.support import make_engine, perturb

# bf16 engine vs fp32 trainer on the tiny model: measured max |d logp| ~0.005
# (bf16 rounding of weights and activations); 0.02 leaves 4x headroom.
BF16_LOGPROB_TOL = 0.02
SEQ = [1, 11, 8, 15, 15, 18, 42, 40, 26, 18, 21, 15, 7, 30, 31, 12]


@pytest.fixture(scope="module", params=[None, "fp8_per_channel"], ids=["bf16", "fp8_per_channel"])
def engine(request, tiny_path):
    eng = make_engine(tiny_path, quantization=request.param, reload_backend="vllm")
    yield eng
    del eng
    gc.collect()


def trainer_logprobs(model, seq):
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]


def poison(engine):
    """NaN into every kernel tensor we can address (oneDNN-packed bf16 linears are opaque on CPU)."""
    with torch.no_grad():
        for _, p in engine.named_kernel_tensors():
            if p.numel() == 0:
                continue
            if p.dtype == torch.float8_e4m3fn:
                p.view(torch.uint8).fill_(0x7F)  # e4m3fn NaN
            else:
                p.fill_(float("nan"))


def test_sync_writes_exact_values_in_place(engine, trainer_model):
    perturb(trainer_model, seed=1)
    ptrs = {n: p.data_ptr() for n, p in engine.named_kernel_tensors()}
    poison(engine)
    report = engine.sync(trainer_model, step=1, verify=True)
    assert report.verified and report.num_verified > 0
    assert report.num_groups == 4  # embed, layer 0, layer 1, norm (+ tied head)
    assert {n: p.data_ptr() for n, p in engine.named_kernel_tensors()} == ptrs
    for name, p in engine.named_kernel_tensors():
        if p.numel() and p.dtype != torch.float8_e4m3fn:
            assert not torch.isnan(p).any(), name
        if p.dtype == torch.float8_e4m3fn:
            assert not (p.view(torch.uint8) & 0x7F == 0x7F).any(), name

    # An explicit look at one fused tensor, independent of the verify module.
    attn = trainer_model.model.layers[1].self_attn
    qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach().to(torch.bfloat16)
    module = engine.model.model.layers[1].self_attn.qkv_proj
    if engine.config.quantization is None:
        assert torch.equal(vllm_layers.read_kernel_tensor(module, "weight"), qkv)
    else:
        q, scale = reference.fp8_per_channel(qkv)
        assert torch.equal(module.weight.t().view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(module.weight_scale, scale)


def test_logprobs_follow_the_weights(engine, trainer_model):
    engine.sync(trainer_model, step=2)
    before = engine.score([SEQ])[0]
    perturb(trainer_model, scale=0.02, seed=2)
    engine.sync(trainer_model, step=3)
    after = engine.score([SEQ])[0]
    assert (after - before).abs().max() > 0.05, "log-probs did not move with the weights"
    if engine.config.quantization is None:
        diff = (after - trainer_logprobs(trainer_model, SEQ)).abs().max()
        assert diff < BF16_LOGPROB_TOL, f"engine vs trainer max |d logp| = {diff:.4f}"


class FailingSource(ModuleSource):
    """Yields `good` groups, then raises or yields a bad tensor."""

    def __init__(self, model, *, good, bad):
        super().__init__(model, dtype=torch.bfloat16)
        self.good, self.bad = good, bad

    def groups(self):
        for i, group in enumerate(super().groups()):
            if i == self.good:
                if self.bad == "raise":
                    raise RuntimeError("trainer fell over mid-stream")
                name, t = group[0]
                if self.bad == "shape":
                    group = [(name, t[:-1])] + group[1:]
                elif self.bad == "name":
                    group = [("model.layers.1.mlp.not_a_proj.weight", t)] + group[1:]
            yield group


@pytest.mark.parametrize("bad, needle", [
    ("raise", "trainer fell over mid-stream"),
    ("shape", "model.layers.0.self_attn.q_proj.weight"),
    ("name", "model.layers.1.mlp.not_a_proj.weight"),
])
def test_failed_sync_fails_closed_and_recovers(engine, trainer_model, bad, needle):
    perturb(trainer_model, seed=3)
    with pytest.raises(SyncError, match=needle.replace(".", r"\.")):
        engine.sync(FailingSource(trainer_model, good=1, bad=bad), step=10)
    assert engine.state is EngineState.FAILED
    with pytest.raises(EngineNotReady, match="Run a full sync"):
        engine.generate(["abc:"], max_tokens=2)
    report = engine.sync(trainer_model, step=11, verify=True)
    assert report.verified and engine.state is EngineState.READY and engine.step == 11
    assert len(engine.generate(["abc:"], max_tokens=2)[0].completions) == 1


def test_incomplete_sync_is_an_error(engine, trainer_model):
    class FirstGroupOnly(ModuleSource):
        def groups(self):
            yield next(iter(super().groups()))

    with pytest.raises(SyncError, match="never arrived"):
        engine.sync(FirstGroupOnly(trainer_model), step=20)
    assert engine.state is EngineState.FAILED
    engine.sync(trainer_model, step=21)
    assert engine.state is EngineState.READY


def test_verify_catches_a_stale_tied_head(engine, trainer_model, monkeypatch):
    """Without re-deriving the tied LM head's kernel state, verify must fail (it is not a rubber stamp).

    Where oneDNN runs bf16 (AVX-512) vLLM packs the head into its own handle, a copy of the weight; on AVX2 CPUs
    it falls back to torch's linear over the shared weight. The handle installed here is that copy on any CPU.
    """
    head = engine.model.lm_head
    head.cpu_linear = lambda x, weight, bias, stale=head.weight.detach().clone(): torch.nn.functional.linear(x, stale, bias)
    monkeypatch.setattr(vllm_layers, "refresh_tied_followers", lambda model: None)
    perturb(trainer_model, seed=4)
    with pytest.raises(SyncError, match="lm_head"):
        engine.sync(trainer_model, step=30, verify=True)
    monkeypatch.undo()
    assert engine.sync(trainer_model, step=31, verify=True).verified


def test_verify_accepts_layers_split_across_groups(engine, trainer_model):
    """A byte-budgeted source splits a layer's shards over several groups; verify still proves them."""

    class OneTensorPerGroup(ModuleSource):
        def groups(self):
            for group in super().groups():
                for item in group:
                    yield [item]

    perturb(trainer_model, seed=5)
    report = engine.sync(OneTensorPerGroup(trainer_model, dtype=torch.bfloat16), step=40, verify=True)
    assert report.verified and report.num_groups == 26


def test_sync_drops_prefix_kv_computed_with_old_weights(engine, trainer_model):
    """vLLM caches KV blocks of a prompt prefix (128-token blocks on CPU); after a sync the
    rollouts must not reuse KV computed with the old weights. Without the cache reset the
    sampled tokens' log-probs are off by ~0.5 here; with it, ~0.01."""
    prompt = SEQ * 17  # 272 tokens: two full cacheable blocks
    engine.sync(trainer_model, step=50)
    engine.generate([prompt], max_tokens=4, seed=0)
    engine.generate([prompt], max_tokens=4, seed=0)  # the prefix is now cached
    perturb(trainer_model, scale=0.02, seed=6)
    engine.sync(trainer_model, step=51)
    completion = engine.generate([prompt], max_tokens=4, seed=0)[0].completions[0]
    want = trainer_logprobs(trainer_model, prompt + completion.token_ids)[-4:]
    tol = BF16_LOGPROB_TOL if engine.config.quantization is None else 0.1
    diff = (torch.tensor(completion.logprobs) - want).abs().max()
    assert diff < tol, f"rollout used stale prefix KV: max |d logp| = {diff:.4f}"


def test_sleep_level_2_discards_until_a_full_sync(engine, trainer_model, monkeypatch):
    """Level-2 sleep drops the weights: the engine must refuse to sample until a sync.

    vLLM's CPU build refuses sleep mode itself ("not supported on current
    platform"), so the vLLM call is recorded instead; the state logic is ours.
    """
    calls = []
    monkeypatch.setattr(vllm_engine, "sleep", lambda llm, level: calls.append(level))
    engine.sync(trainer_model, step=60)
    engine.sleep(level=1)
    assert engine.state is EngineState.READY  # level 1 keeps (offloads) the weights
    engine.sleep(level=2)
    assert calls == [1, 2] and engine.state is EngineState.DISCARDED
    with pytest.raises(EngineNotReady, match="discarded"):
        engine.generate(["abc:"], max_tokens=2)
    engine.sync(trainer_model, step=61)
    assert engine.state is EngineState.READY


def test_per_prompt_seeds_are_independent_and_reproducible(engine, trainer_model):
    engine.sync(trainer_model, step=70)
    prompts = ["abc:", "abc:"]
    shared = engine.generate(prompts, max_tokens=8, seed=3)
    assert shared[0].completions[0].token_ids == shared[1].completions[0].token_ids  # one stream for both
    own = engine.generate(prompts, max_tokens=8, seed=[3, 4])
    assert own[0].completions[0].token_ids == shared[0].completions[0].token_ids
    assert own[1].completions[0].token_ids != own[0].completions[0].token_ids
    assert engine.generate(prompts, max_tokens=8, seed=[3, 4])[1].completions[0].token_ids == own[1].completions[0].token_ids
    with pytest.raises(ValueError, match="3 seeds for 2 prompts"):
        engine.generate(prompts, seed=[1, 2, 3])
