"""`quantization="rlsync_fp8"` on the vLLM CPU engine: per-tensor, per-channel and block FP8.

For each scheme, one engine per reload backend (`rlsync`: quantize on arrival;
`vllm`: vLLM's layerwise reload re-running the plugin's processing) is synced
with the same perturbed trainer:
- kernel tensors equal the reference quantization bit for bit (`verify=True`
  and an explicit check), over NaN-poisoned storage, `data_ptr` unchanged, and
  both backends leave identical bits (tensors arriving in a shuffled order too);
- the rlsync backend buffers no FP8 layer (quantize on arrival);
- every quantized weight's SQNR against the bf16 trainer weight is above the
  floor derived in tests/unit/test_quant_reference.py (28 dB);
- log-probs on fixed sequences match the trainer within a derived tolerance.

Log-prob tolerance, derived rather than guessed. The emulated kernel computes
with bf16(q * scale) weights. A bf16 engine synced with the trainer's
dequantized FP8 weights (`q * scale` in fp32) casts them to exactly the same
bf16 weights, so the two engines differ only in how vLLM's bf16 matmul and
`F.linear` accumulate. Each is a bf16 computation of the same weights whose
distance to the fp32 computation (`lp_deq`: HF in fp32 with the dequantized
weights) is the bf16-compute error `e` measured on the bf16 engine; two such
computations are at most `2 e` apart. So:
- max |lp_fp8 - lp_bf16engine| <= 2 e;
- against the trainer, max |lp_fp8 - lp_trainer| <= q + 3 e, where
  q = max |lp_deq - lp_trainer| is the effect of quantization alone (fp32);
- and q > 3 e, so the test can tell an FP8 model from the trainer at all.
"""

import gc

import pytest
import torch

from rlsync.adapters.vllm_layers import read_kernel_tensor
from rlsync.quant import reference as ref
from rlsync.quant.fp8_linear import Fp8Config, quantize_full
from rlsync.quant.plugin import hf_overrides
from rlsync.source import ModuleSource
from tests.integration.support import SEQS, ShuffledSource, dequantized_trainer, hf_logprobs, make_engine, perturb, vllm_warnings

SCHEMES = ["tensor", "channel", "block"]
SQNR_FLOOR_DB = 28.0


@pytest.fixture(scope="module")
def trainer(tiny_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    perturb(model, scale=0.05, seed=3)  # moves the random model away from a near-uniform output
    return model


@pytest.fixture(scope="module", params=SCHEMES)
def engines(request, tiny_path):
    """The rlsync- and vLLM-backend FP8 engines for one scheme, and a bf16 engine for the tolerance.

    All three are dropped together: dropping one in-process vLLM engine tears
    down vLLM's process-global parallel state under the others.
    """
    kw = dict(quantization="rlsync_fp8", llm_kwargs={"hf_overrides": hf_overrides(request.param)})
    ours = make_engine(tiny_path, reload_backend="rlsync", **kw)
    theirs = make_engine(tiny_path, reload_backend="vllm", **kw)
    bf16 = make_engine(tiny_path, quantization=None, reload_backend="vllm")
    yield request.param, ours, theirs, bf16
    del ours, theirs, bf16
    gc.collect()


def fp8_layers(engine):
    return {n: m for n, m in engine.model.named_modules() if type(getattr(m, "quant_method", None)).__name__ == "RLSyncFp8LinearMethod"}


def kernel_bits(engine):
    out = {}
    for module_name, module in engine.model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            t = read_kernel_tensor(module, pname)
            out[f"{module_name}.{pname}"] = t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]).clone()
    return out


def poison_fp8(engine):
    with torch.no_grad():
        for layer in fp8_layers(engine).values():
            layer.weight.view(torch.uint8).fill_(0x7F)  # e4m3 NaN
            layer.weight_scale.fill_(float("nan"))


def trainer_weight(trainer, module_name, widths):
    """The bf16 (N, K) weight a fused engine module holds, from the trainer's tensors."""
    prefix, _, leaf = module_name.rpartition(".")
    shards = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}.get(leaf, [leaf])
    params = dict(trainer.named_parameters())
    w = torch.cat([params[f"{prefix}.{s}.weight"] for s in shards]).to(torch.bfloat16)
    assert w.shape[0] == sum(widths)
    return w


def test_engine_uses_the_plugin(engines):
    scheme, ours, *_ = engines
    layers = fp8_layers(ours)
    assert len(layers) == 2 * 4  # qkv, o, gate_up, down per decoder layer
    qkv = layers["model.layers.0.self_attn.qkv_proj"]
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight.shape == (512, 256)
    assert tuple(qkv.weight_scale.shape) == {"tensor": (3,), "channel": (512, 1), "block": (4, 2)}[scheme]
    assert type(qkv.quant_method.kernel).__name__ == "EmulatedKernel"  # CPU priority: emulated first


def test_the_build_quantizes_the_checkpoint_on_arrival(engines, tiny_path):
    """Bounded build: each FP8 layer's bf16 weight never existed (its build-time weight was a meta tensor that the
    checkpoint shards were quantized through), and the freshly built kernel tensors are the reference quantization
    of the checkpoint, as a bf16 build quantized afterwards would give; vLLM's layerwise reload restores the
    checkpoint format and quantizes it whole (the `vllm` backend's engine, built the same way, has the same bits)."""
    from safetensors.torch import load_file

    scheme, ours, theirs, _ = engines
    checkpoint = {}
    for f in sorted(tiny_path.glob("*.safetensors")):
        checkpoint.update(load_file(f))
    cfg = Fp8Config(scheme=scheme)
    for name, layer in fp8_layers(ours).items():
        assert layer.quant_method.built_on_arrival and layer.quant_method.building is None, name
        prefix, _, leaf = name.rpartition(".")
        shards = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}.get(leaf, [leaf])
        w = torch.cat([checkpoint[f"{prefix}.{s}.weight"] for s in shards]).to(torch.bfloat16)
        want_q, want_s = quantize_full(cfg, w, layer.quant_method.widths)
        assert torch.equal(layer.weight.view(torch.uint8), want_q.view(torch.uint8)), name
        assert torch.equal(layer.weight_scale.view(torch.int32), want_s.view(torch.int32)), name
    a, b = kernel_bits(ours), kernel_bits(theirs)
    assert not [n for n in a if not torch.equal(a[n], b[n])]


@pytest.mark.parametrize("order", ["layer", "shuffled"])
def test_sync_writes_reference_bits_in_place_and_backends_agree(engines, trainer, order):
    scheme, ours, theirs, _ = engines
    cfg = Fp8Config(scheme=scheme)
    ptrs = {n: p.data_ptr() for n, p in ours.named_kernel_tensors()}
    fp8_bytes = min(m.weight.shape[0] * m.weight.shape[1] * 2 for m in fp8_layers(ours).values())
    for i in range(2):
        perturb(trainer, scale=0.01, seed=100 + i)
        source = (lambda: ModuleSource(trainer)) if order == "layer" else (lambda: ShuffledSource(trainer, seed=i))
        poison_fp8(ours)
        poison_fp8(theirs)
        with vllm_warnings() as warned:
            report = ours.sync(source(), step=i + 1, verify=order == "layer")
            theirs.sync(source(), step=i + 1)
        # The arrival loaders sit behind load-format stand-ins: vLLM never sees a checkpoint tensor go into an
        # e4m3 parameter, so it logs no dtype-mismatch warning for a correct FP8 sync. (This fp32 source still
        # draws vLLM's fp32 -> bf16 warnings; `engine.sync(model)` casts to the engine dtype first.)
        assert not [r.getMessage() for r in warned if "into parameter with dtype torch.float8_e4m3fn" in r.getMessage()]
        assert report.verified or order == "shuffled"  # verify reads whole layers per group
        assert {n: p.data_ptr() for n, p in ours.named_kernel_tensors()} == ptrs
        # Quantize on arrival: no FP8 layer was ever buffered in load format.
        assert report.peak_load_bytes < fp8_bytes
        for name, layer in fp8_layers(ours).items():
            widths = layer.quant_method.widths
            want_q, want_s = quantize_full(cfg, trainer_weight(trainer, name, widths), widths)
            assert torch.equal(layer.weight.view(torch.uint8), want_q.view(torch.uint8)), name
            assert torch.equal(layer.weight_scale.view(torch.int32), want_s.view(torch.int32)), name
        a, b = kernel_bits(ours), kernel_bits(theirs)
        differ = [n for n in a if not torch.equal(a[n], b[n])]
        assert a.keys() == b.keys() and not differ, f"backends differ: {differ}"


@pytest.fixture
def arrivals(monkeypatch):
    """Counts the plugin's arrival quantizations, and how many ran inside vLLM's `load_weights` of a group;
    raises instead while `fail` is set."""
    from rlsync.adapters import vllm_engine
    from rlsync.quant import vllm_plugin

    seen = {"calls": 0, "inside": 0, "depth": 0, "fail": None}
    quantize, load_weights = vllm_plugin._quantize_arrival, vllm_engine.load_weights

    def counting(*args, **kwargs):
        seen["calls"] += 1
        seen["inside"] += seen["depth"] > 0
        if seen["fail"] is not None:
            raise seen["fail"]
        return quantize(*args, **kwargs)

    def watched(*args, **kwargs):
        seen["depth"] += 1
        try:
            return load_weights(*args, **kwargs)
        finally:
            seen["depth"] -= 1

    monkeypatch.setattr(vllm_plugin, "_quantize_arrival", counting)
    monkeypatch.setattr(vllm_engine, "load_weights", watched)
    return seen


def test_a_recording_sync_quantizes_after_vllm_mapped_each_group(engines, trainer, arrivals):
    """The first (recording) sync defers the plugin's arrival loader calls until vLLM's `load_weights` of the group
    returned, then replays them from the plan it just recorded: every shard quantized once, none while vLLM
    maps the group, every tensor verified; the next sync replays the plan."""
    scheme, ours, *_ = engines
    perturb(trainer, scale=0.01, seed=31)
    ours.backend.plan.clear()  # what a first sync starts from
    shards = sum(len(layer.quant_method.widths) for layer in fp8_layers(ours).values())
    report = ours.sync(trainer, step=31, verify=True)
    assert report.planned is False and report.verified and report.num_verified == report.num_written
    assert (arrivals["calls"], arrivals["inside"]) == (shards, 0)
    assert ours.sync(trainer, step=32, verify=True).planned is True


def test_a_failing_deferred_arrival_call_fails_closed_and_the_next_sync_recovers(engines, trainer, arrivals):
    from rlsync.engine import EngineState
    from rlsync.errors import EngineNotReady, SyncError

    scheme, ours, *_ = engines
    perturb(trainer, scale=0.01, seed=33)
    ours.backend.plan.clear()
    arrivals["fail"] = RuntimeError("quantizer broke")
    with pytest.raises(SyncError, match="quantizer broke"):
        ours.sync(trainer, step=33)
    assert ours.state is EngineState.FAILED and not ours.backend.plan.entries
    with pytest.raises(EngineNotReady):
        ours.score(SEQS[:1])
    arrivals["fail"] = None
    report = ours.sync(trainer, step=34, verify=True)
    assert ours.state is EngineState.READY and report.planned is False and report.num_verified == report.num_written


def test_sqnr_of_every_quantized_weight(engines, trainer):
    scheme, ours, *_ = engines
    ours.sync(trainer, step=10)
    lowest = min(
        ref.sqnr_db(trainer_weight(trainer, name, layer.quant_method.widths).float(),
                    layer.quant_method.kernel.prep_weights_for_execution(_stored(layer)).dequantize())
        for name, layer in fp8_layers(ours).items()
    )
    print(f"{scheme}: lowest weight SQNR {lowest:.1f} dB")
    assert lowest > SQNR_FLOOR_DB


def _stored(layer):
    from rlsync.quant.layout import QuantizedTensor

    m = layer.quant_method
    return QuantizedTensor(data=layer.weight, scale=layer.weight_scale, layout=m.layout, shape=m.shape, shard_widths=m.widths)


def test_logprobs_match_trainer_within_derived_tolerance(engines, trainer):
    scheme, ours, _, bf16 = engines
    deq_model = dequantized_trainer(trainer, scheme)
    ours.sync(trainer, step=20)
    bf16.sync(deq_model, step=20)
    lp_fp8, lp_bf16 = torch.cat(ours.score(SEQS)), torch.cat(bf16.score(SEQS))
    lp_trainer, lp_deq = torch.cat(hf_logprobs(trainer)), torch.cat(hf_logprobs(deq_model))
    e = float((lp_bf16 - lp_deq).abs().max())
    q = float((lp_deq - lp_trainer).abs().max())
    vs_bf16 = float((lp_fp8 - lp_bf16).abs().max())
    vs_trainer = float((lp_fp8 - lp_trainer).abs().max())
    print(f"{scheme}: max|d logp| fp8-engine vs bf16-engine(dequantized) {vs_bf16:.4f} (tol 2e = {2 * e:.4f}); "
          f"fp8-engine vs trainer {vs_trainer:.4f} (tol q + 3e = {q + 3 * e:.4f}); q {q:.4f}, e {e:.4f}")
    assert vs_bf16 <= 2 * e
    assert vs_trainer <= q + 3 * e
    assert q > 3 * e
