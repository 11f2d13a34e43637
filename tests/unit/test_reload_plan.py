"""Sync plans (`rlsync.reload.plan`) on the toy layers: replay equals the recording path bit for bit,
and every change that could make a replay wrong sends the sync back to recording."""

import pytest
import torch

from rlsync.errors import SyncError
from rlsync.reload import Reload
from rlsync.reload.plan import LoaderTrace, geometry, span, view_of
from rlsync.quant.layout import stacked_view
from tests.unit.support import ToyArrivalQuant, ToyQuant, assert_bits_equal, build_toy, checkpoint_groups, kernel_state
from tests.unit.test_reload_session import shuffled


def sync(session, groups):
    session.begin()
    try:
        for group in groups:
            session.load(group)
        session.commit()
    except BaseException:
        session.abort()
        raise
    return session.planned


@pytest.mark.parametrize("quant", [ToyQuant, ToyArrivalQuant], ids=["swapped", "arrival"])
@pytest.mark.parametrize("order", ["layer", "shuffled"])
def test_replay_equals_recording_bit_for_bit(quant, order):
    planned_model, plain_model = build_toy(quant_factory=quant), build_toy(quant_factory=quant)
    planned, plain = Reload(planned_model, plan=True), Reload(plain_model)
    ptrs = {n: p.data_ptr() for n, p in planned_model.named_parameters()}
    seen = []
    for seed in (1, 2, 3, 4):
        groups = checkpoint_groups(seed)
        if order == "shuffled":
            groups = shuffled(groups, seed)  # other names per group each time: the plan is per name
        seen.append(sync(planned, groups))
        sync(plain, groups)
        assert_bits_equal(kernel_state(planned_model), kernel_state(plain_model))
        assert_bits_equal(kernel_state(planned_model), kernel_state(build_toy(seed=seed, quant_factory=quant)))
        assert {n: p.data_ptr() for n, p in planned_model.named_parameters()} == ptrs
    assert seen == [False, True, True, True]
    assert plain.planned is None  # plans off


def test_replay_really_skips_the_models_load_weights(monkeypatch):
    model = build_toy()
    session = Reload(model, plan=True)
    sync(session, checkpoint_groups(1))
    calls = []
    original = type(model).load_weights
    monkeypatch.setattr(type(model), "load_weights", lambda self, w: calls.append(1) or original(self, w))
    assert sync(session, checkpoint_groups(2)) is True
    assert calls == []
    assert_bits_equal(kernel_state(model), kernel_state(build_toy(seed=2)))


def test_new_dtype_records_again_and_matches_the_recording_path():
    model, plain_model = build_toy(), build_toy()
    session, plain = Reload(model, plan=True), Reload(plain_model)
    sync(session, checkpoint_groups(1))
    for seed, planned in ((2, False), (3, True)):  # bf16 now: recorded once (another dtype), then replayed
        bf16 = [[(n, t.to(torch.bfloat16)) for n, t in g] for g in checkpoint_groups(seed)]
        assert sync(session, bf16) is planned
        sync(plain, bf16)
        assert_bits_equal(kernel_state(model), kernel_state(plain_model))
    assert session.plan_note == ""


def test_strided_incoming_tensor_is_not_replayed_with_the_wrong_layout():
    model = build_toy()
    session = Reload(model, plan=True)
    sync(session, checkpoint_groups(1))
    groups = [[(n, t.t().contiguous().t() if t.dim() == 2 else t) for n, t in g] for g in checkpoint_groups(2)]
    assert sync(session, groups) is False  # same shapes, other strides: the recorded views would not apply
    assert_bits_equal(kernel_state(model), kernel_state(build_toy(seed=2)))


def test_reallocated_engine_tensors_drop_the_plan():
    model = build_toy()
    session = Reload(model, plan=True)
    sync(session, checkpoint_groups(1))
    layer = model.layers[0].qkv
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)  # sleep level 2 / wake up
    assert sync(session, checkpoint_groups(2)) is False
    assert "engine parameters changed" in session.plan_note
    assert_bits_equal(kernel_state(model), kernel_state(build_toy(seed=2)))


def test_failed_replay_fails_closed_and_the_next_sync_records_and_recovers():
    model = build_toy()
    session = Reload(model, plan=True)
    sync(session, checkpoint_groups(1))
    groups = checkpoint_groups(2)
    with pytest.raises(SyncError, match="loaded twice"):
        sync(session, [groups[1] + [groups[1][0]]] + groups[2:])
    assert not session.plan.entries  # dropped with the abort
    with pytest.raises(SyncError, match="not fully loaded"):
        sync(session, groups[:-1])  # records; the last group never arrives
    assert sync(session, checkpoint_groups(3)) is False
    assert sync(session, checkpoint_groups(4)) is True
    assert_bits_equal(kernel_state(model), kernel_state(build_toy(seed=4)))


def test_a_loaded_weight_vllm_computed_is_never_planned(monkeypatch):
    """A model whose `load_weights` hands loaders a new tensor (not a view of the incoming one) cannot be replayed
    from views: every sync records, and stays correct."""
    model = build_toy()
    original = type(model).load_weights
    monkeypatch.setattr(type(model), "load_weights", lambda self, w: original(self, ((n, t * 1.0) for n, t in w)))
    session = Reload(model, plan=True)
    for seed in (1, 2, 3):
        assert sync(session, checkpoint_groups(seed)) is False
        assert_bits_equal(kernel_state(model), kernel_state(build_toy(seed=seed)))


def test_a_mutation_outside_the_loaders_is_never_planned(monkeypatch):
    model = build_toy()
    original = type(model).load_weights
    counter = torch.zeros(1)

    def load_weights(self, weights):
        counter.add_(1)  # state vLLM's code changes itself, outside any loader: a replay would skip it
        return original(self, weights)

    monkeypatch.setattr(type(model), "load_weights", load_weights)
    session = Reload(model, plan=True)
    assert sync(session, checkpoint_groups(1)) is False
    assert sync(session, checkpoint_groups(2)) is False
    assert_bits_equal(kernel_state(model), kernel_state(build_toy(seed=2)))


def test_geometry_and_stacked_views():
    base = torch.arange(24.0).reshape(4, 6)
    view = base[1:3, 2:5]
    g = geometry(view, base)
    assert g == ((2, 3), (6, 1), 8) and torch.equal(view_of(base, g), view)
    assert geometry(view, base[2:]) is None  # starts before that base
    assert geometry(torch.zeros(2, 3), base) is None  # another storage
    assert span(view) == (8, 17)
    assert geometry(view.view(torch.int32), base) is None  # same bytes, another dtype
    alias = torch.from_numpy(base.numpy())  # another storage object over the same bytes: its elements all the same
    assert alias.untyped_storage()._cdata != base.untyped_storage()._cdata and geometry(view, alias) == g
    assert torch.equal(view_of(alias, g), view)
    raw = bytearray(100)  # two float views of one buffer, 2 bytes apart: inside, but not on an element boundary
    a = torch.frombuffer(memoryview(raw)[0:96], dtype=torch.float32)
    b = torch.frombuffer(memoryview(raw)[2:94], dtype=torch.float32)
    assert geometry(b, a) is None and geometry(a[1:5], a) == ((4,), (1,), 1)
    rows = [base[i] for i in range(4)]
    assert torch.equal(stacked_view(rows), base)
    assert torch.equal(stacked_view([base[0, :2], base[1, :2], base[2, :2]]), base[:3, :2])
    assert stacked_view([base[0], base[2], base[1]]) is None  # not evenly spaced in order
    assert stacked_view([base[0, :4], base[0, 2:6]]) is None  # overlapping
    assert stacked_view([base[0], torch.zeros(6)]) is None


def test_a_loader_call_with_an_empty_padding_fill_is_still_one_copy():
    """vLLM's vocabulary loader copies the rows, then zero-fills the padding rows past them: with no padding
    rows that fill writes nothing and the call is one copy; with padding it is not a plain copy."""
    loaded = torch.randn(4, 3)
    for rows, plain in ((4, True), (6, False)):
        param = torch.full((rows, 3), 7.0)
        with LoaderTrace(param, loaded) as trace:
            param[:4].copy_(loaded)
            param[4:].fill_(0)
        assert (trace.copies == [(((4, 3), (3, 1), 0), ((4, 3), (3, 1), 0))]) if plain else trace.copies is None
        assert trace.numel == 12


def test_a_mutation_between_loader_calls_is_never_planned(monkeypatch):
    """The recorder's one watch tells loader calls from vLLM's own code around them: a mutation after the first
    loader call of a group (not only before any) still makes the group unplannable."""
    model = build_toy()
    original = type(model).load_weights
    counter = torch.zeros(1)

    def load_weights(self, weights):
        def tap():
            for i, item in enumerate(weights):
                if i == 1:
                    counter.add_(1)  # runs after the first tensor's loader call returned
                yield item
        return original(self, tap())

    monkeypatch.setattr(type(model), "load_weights", load_weights)
    session = Reload(model, plan=True)
    assert sync(session, checkpoint_groups(1)) is False
    assert sync(session, checkpoint_groups(2)) is False
    assert_bits_equal(kernel_state(model), kernel_state(build_toy(seed=2)))


def _loader(param, loaded_weight, shard_id=None, *, expert_id=0):
    pass


def _positional_only(param, loaded_weight, /, shard_id=None):
    pass


def _var_kwargs(param, loaded_weight, **extra):
    pass


@pytest.mark.parametrize("args, kwargs", [
    (("P", "W"), {}),
    (("P",), {"loaded_weight": "W", "shard_id": "q"}),
    ((), {"expert_id": 3, "loaded_weight": "W", "param": "P"}),
    (("P", "W", "k"), {"expert_id": 1}),
])
def test_binder_fast_path_binds_as_inspect_does(args, kwargs):
    import inspect

    from rlsync.reload.binding import Binder

    bound = Binder(inspect.signature(_loader), _loader).bind(args, kwargs)
    assert bound._inspect is None  # the fast path
    expected = inspect.signature(_loader).bind(*args, **kwargs)
    assert list(bound.arguments.items()) == list(expected.arguments.items())  # same names, same (signature) order
    call_args, call_kwargs = bound.split()
    assert inspect.signature(_loader).bind(*call_args, **call_kwargs).arguments == expected.arguments


def test_binder_leaves_other_signatures_and_bad_calls_to_inspect():
    import inspect

    from rlsync.reload.binding import Binder

    for fn in (_positional_only, _var_kwargs):
        bound = Binder(inspect.signature(fn), fn).bind(("P", "W"), {"shard_id": "q"} if fn is _positional_only else {"x": 1})
        assert bound._inspect is not None and bound.arguments["param"] == "P" and bound.split()[0][:2] == ("P", "W")
    binder = Binder(inspect.signature(_loader), _loader)
    with pytest.raises(TypeError):
        binder.bind(("P",), {})  # loaded_weight missing
    with pytest.raises(TypeError):
        binder.bind(("P", "W"), {"param": "again"})
    with pytest.raises(TypeError):
        binder.bind(("P", "W"), {"nope": 1})

    def no_param(weight, loaded_weight):
        pass

    with pytest.raises(SyncError, match="no `param` / `loaded_weight`"):
        Binder(inspect.signature(no_param), no_param).bind(("P", "W"), {})


def test_participating_layers_are_recomputed_when_the_model_changes():
    """The layer list a session works from is kept across syncs only while the model has the same modules with
    the same quant methods."""
    import copy

    model = build_toy()
    session = Reload(model, plan=True)
    first = session._plan()
    assert session._plan() is first
    name, module = next((n, m) for n, m in model.named_modules() if getattr(m, "quant_method", None) is not None)
    module.quant_method = copy.copy(module.quant_method)
    assert session._plan() is not first and session._plan() == first  # recomputed, same answer here
    assert sync(session, checkpoint_groups(2)) is False  # and a sync still works (records)
    assert_bits_equal(kernel_state(model), kernel_state(build_toy(seed=2)))
