"""Fault matrix on the real vLLM CPU engine: every way a sync can go wrong, bf16 and `rlsync_fp8`.

For each fault: what is raised (interrupts as themselves, everything else as a
`SyncError` naming the cause), the state after (FAILED, never SYNCING), that
`generate` refuses, and that the next good sync recovers READY and verifies
bit-exact with compared == written. Threaded cases run with a forced short
switch interval so the threads really interleave.
"""

import gc
import math
import sys
import threading

import pytest
import torch

from rlsync.engine import EngineState
from rlsync.engine import engine as engine_module
from rlsync.errors import EngineNotReady, NonFiniteError, SyncError
from rlsync.reload import layer as layer_module
from rlsync.source import ModuleSource, WeightSource
from tests.integration.support import make_engine, perturb

QUANTS = {"bf16": {}, "rlsync_fp8": {"quantization": "rlsync_fp8", "fp8_scheme": "block", "fp8_options": {"block": [32, 32]}}}
LINEAR = "model.layers.0.self_attn.q_proj.weight"
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def engines(tiny_path):
    """One engine per layout, alive together for the module (vLLM's global state is shared)."""
    built = {key: make_engine(tiny_path, **kwargs) for key, kwargs in QUANTS.items()}
    yield built
    built.clear()
    gc.collect()


@pytest.fixture(scope="module")
def trainer(tiny_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    perturb(model, seed=7)
    return model


@pytest.fixture(params=list(QUANTS))
def engine(request, engines, trainer):
    eng = engines[request.param]
    eng.sync(trainer, step=1)  # every case starts READY
    return eng


class EditedSource(WeightSource):
    """The trainer's groups, each passed through `edit(index, group) -> group` (which may raise)."""

    def __init__(self, model, edit):
        super().__init__()
        self.inner, self.edit = ModuleSource(model, dtype=torch.bfloat16), edit

    def metadata(self):
        return self.inner.metadata()

    def groups(self):
        for i, group in enumerate(self.inner.groups()):
            yield self.edit(i, list(group))


def replaced(name, make):
    """An edit that swaps tensor `name` for `make(tensor)`."""
    return lambda i, group: [(n, make(t) if n == name else t) for n, t in group]


def raising(exc, at=1):
    def edit(i, group):
        if i == at:
            raise exc
        return group

    return edit


def poisoned(value):
    def make(t):
        t = t.clone()
        t.view(-1)[3] = value
        return t

    return make


# (id, edit, expected exception type, message pattern)
SOURCE_FAULTS = [
    ("iterator-error", raising(RuntimeError("gather failed")), SyncError, "RuntimeError: gather failed"),
    ("keyboard-interrupt", raising(KeyboardInterrupt()), KeyboardInterrupt, None),
    ("system-exit", raising(SystemExit(3)), SystemExit, None),
    ("unknown-name", lambda i, g: g + [("model.layers.0.nope.weight", g[0][1])] if i == 1 else g, SyncError, "no parameter"),
    ("wrong-shape", replaced(LINEAR, lambda t: t[:-1]), SyncError, "shape"),
    ("duplicate", lambda i, g: g + [g[0]] if i == 1 else g, SyncError, "arrived twice"),
    ("missing", lambda i, g: [(n, t) for n, t in g if n != LINEAR], SyncError, "never arrived"),
    ("meta", replaced(LINEAR, lambda t: torch.empty_like(t, device="meta")), SyncError, "meta"),
    ("int8", replaced(LINEAR, lambda t: t.to(torch.int8)), SyncError, "dtype torch.int8 is not a floating type"),
    ("bool", replaced(EMBED, lambda t: t > 0), SyncError, "dtype torch.bool is not a floating type"),
    ("nan-linear", replaced(LINEAR, poisoned(float("nan"))), SyncError, "non-finite"),
    ("inf-linear", replaced(LINEAR, poisoned(float("inf"))), SyncError, "non-finite"),
    ("nan-embedding", replaced(EMBED, poisoned(float("nan"))), SyncError, "non-finite"),
    ("inf-embedding", replaced(EMBED, poisoned(-float("inf"))), SyncError, "non-finite"),
]


def assert_failed_then_recovers(engine, trainer, step):
    assert engine.state is EngineState.FAILED
    with pytest.raises(EngineNotReady):
        engine.generate(["abc:"], max_tokens=2)
    report = engine.sync(trainer, step=step, verify=True)
    assert engine.state is EngineState.READY and engine.step == step
    assert report.verified and report.num_verified == report.num_written > 0


@pytest.mark.parametrize("fault", SOURCE_FAULTS, ids=[f[0] for f in SOURCE_FAULTS])
def test_source_fault_fails_closed_and_recovers(engine, trainer, fault):
    _, edit, exc_type, pattern = fault
    with pytest.raises(exc_type, match=pattern) as info:
        engine.sync(EditedSource(trainer, edit), step=2)
    if exc_type is SyncError:
        assert not isinstance(info.value, (KeyboardInterrupt, SystemExit))
    assert_failed_then_recovers(engine, trainer, step=3)


@pytest.mark.parametrize("bad", [float("nan"), -float("inf")], ids=["nan", "inf"])
def test_a_planned_copy_finds_non_finite_values_while_it_writes(engine, trainer, monkeypatch, bad):
    """Replayed from the sync plan, the embedding is one plain copy: that copy checks it for NaN / Inf (the engine
    makes no pass of its own over it), and the sync fails closed as when the engine checks first."""
    engine.sync(trainer, step=2)
    assert engine.sync(trainer, step=3).planned is True
    copies: list[bool] = []
    checked_first: list[str] = []
    copy_finite, first_nonfinite = layer_module.copy_finite, engine_module._first_nonfinite
    monkeypatch.setattr(layer_module, "copy_finite", lambda d, s: copies.append(copy_finite(d, s)) or copies[-1])
    monkeypatch.setattr(engine_module, "_first_nonfinite",
                        lambda items: checked_first.extend(n for n, _ in items) or first_nonfinite(items))
    with pytest.raises(NonFiniteError, match=EMBED):
        engine.sync(EditedSource(trainer, replaced(EMBED, poisoned(bad))), step=4)
    assert False in copies and EMBED not in checked_first
    monkeypatch.undo()
    assert_failed_then_recovers(engine, trainer, step=5)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), AttributeError("reader bug")], ids=["interrupt", "bug"])
def test_verify_pass_failure_fails_closed(engine, trainer, monkeypatch, exc):
    def broken_verify(*args, **kwargs):
        raise exc

    monkeypatch.setattr(engine_module, "verify_groups", broken_verify)
    with pytest.raises(type(exc) if isinstance(exc, KeyboardInterrupt) else SyncError):
        engine.sync(trainer, step=2, verify=True)
    assert engine.state is EngineState.FAILED  # never left SYNCING
    monkeypatch.undo()
    assert_failed_then_recovers(engine, trainer, step=3)


def test_verify_refuses_a_layer_type_it_cannot_read(engine, trainer, monkeypatch):
    """A module whose parameters verify cannot derive fails verify by name instead of being skipped."""
    layer = engine.model.model.layers[0].input_layernorm
    commit = engine.backend.commit

    def commit_then_add_a_tensor():  # a kernel tensor verify has no reference for, appearing after the load
        commit()
        layer.register_parameter("mystery_scale", torch.nn.Parameter(torch.zeros(4), requires_grad=False))

    monkeypatch.setattr(engine.backend, "commit", commit_then_add_a_tensor)
    try:
        with pytest.raises(SyncError, match=r"input_layernorm: verify cannot derive mystery_scale"):
            engine.sync(trainer, step=2, verify=True)
    finally:
        monkeypatch.undo()
        del layer._parameters["mystery_scale"]
    assert_failed_then_recovers(engine, trainer, step=3)


@pytest.fixture
def fast_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def test_concurrent_syncs_serialize(engine, trainer, fast_switching):
    errors = []

    def run(step):
        try:
            engine.sync(trainer, step=step, verify=True)
        except BaseException as exc:  # recorded and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(10 + i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert engine.state is EngineState.READY and engine.step in (10, 11, 12)


def test_sync_never_overlaps_a_generation(engine, trainer, fast_switching):
    results, errors = [], []

    def sample():
        try:
            for _ in range(3):
                results.append(engine.generate(["abc:", "xyz:"], n=2, max_tokens=6, seed=[1, 2]))
        except BaseException as exc:
            errors.append(exc)

    sampler = threading.Thread(target=sample)
    sampler.start()
    for step in (20, 21):
        engine.sync(trainer, step=step)
    sampler.join(timeout=300)
    assert not errors, errors
    assert len(results) == 3
    assert engine.sync(trainer, step=22, verify=True).verified


def all_logprobs(engine):
    out = engine.generate(["abc:", "hello:", "xyz:"], n=3, max_tokens=8, seed=[1, 2, 3])
    return [lp for r in out for c in r.completions for lp in c.logprobs]


def test_no_kv_block_from_bad_weights_survives_recovery(tiny_path, engines, trainer):
    """Opted out of the check, NaN weights are loaded and poison the KV cache; after a good sync, nothing of
    them remains: every sampled log-prob is finite again."""
    engine = engines["bf16"]
    engine.config.reject_nonfinite = False
    try:
        engine.sync(EditedSource(trainer, replaced(LINEAR, poisoned(float("nan")))), step=2)
        assert engine.state is EngineState.READY  # opted out: loaded as given
        assert not all(math.isfinite(x) for x in all_logprobs(engine))
    finally:
        engine.config.reject_nonfinite = True
    assert engine.sync(trainer, step=3, verify=True).verified
    assert all(math.isfinite(x) for x in all_logprobs(engine))
