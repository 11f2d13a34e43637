"""Stacked groups (`rlsync.source.stacked`): a run of experts travels as one tensor and its per-expert pairs,
which are that tensor's slices whoever builds the group; the MoE source yields them for every family."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rlsync.source import ModuleSource, Stack, StackedGroup, stacks_of  # noqa: E402
from tests.unit.test_source_moe import BUILDERS, NUM_EXPERTS, NUM_LAYERS, _build  # noqa: E402


def _same_view(a, b):
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.shape == b.shape
            and a.stride() == b.stride() and a.storage_offset() == b.storage_offset())


def test_a_stacked_group_makes_the_stack_pairs_itself():
    fused = torch.randn(3, 4, 5)
    head = ("head.weight", torch.randn(2))
    group = StackedGroup([head, Stack(("e.0", "e.1", "e.2"), fused), ("tail.weight", torch.randn(4))])
    assert isinstance(group, tuple) and len(group) == 5 and group[0] is head
    (stack,) = stacks_of(group)
    assert (stack.start, stack.stop, stack.names) == (1, 4, ("e.0", "e.1", "e.2"))
    for i, (name, tensor) in enumerate(group[1:4]):
        assert name == f"e.{i}" and _same_view(tensor, fused[i])
    assert stacks_of(list(group)) == () and stacks_of(group[1:]) == ()  # rebuilt: plain pairs, always correct
    with pytest.raises(ValueError, match="a stack of 2 names needs a tensor of 2 slices"):
        StackedGroup([Stack(("a", "b"), fused)])
    with pytest.raises(TypeError):
        group[1] = head  # immutable: the pairs cannot drift from the stack


def test_the_stack_split_gives_transformers_split_values_and_names():
    from transformers.core_model_loading import SplitModulelist

    from rlsync.source.convert import _as_views

    for shape, dim, stacks in (((4, 6, 5), 0, True), ((4, 6, 5), 1, False), ((3, 1, 5), 0, False), ((1, 6, 5), 0, True)):
        fused = torch.randn(*shape)
        ours, theirs = _as_views(SplitModulelist(dim=dim)), SplitModulelist(dim=dim)
        assert type(ours) is not SplitModulelist and isinstance(ours, SplitModulelist) and ours.dim == dim
        ours.runs = []
        got = ours.convert({"x": [fused]}, source_patterns=["x"], target_patterns=["e.*.w"])
        want = theirs.convert({"x": [fused]}, source_patterns=["x"], target_patterns=["e.*.w"])
        assert list(got) == list(want)
        for name in want:
            assert _same_view(got[name], want[name]) and torch.equal(got[name], want[name])
        assert [(t, x is fused) for t, x, _ in ours.runs] == ([(tuple(want), True)] if stacks else [])


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_the_moe_source_yields_each_layers_experts_as_three_stacks(kind):
    model = _build(kind)
    groups = list(ModuleSource(model).groups())
    layers = [g for g in groups if any(".experts." in n for n, _ in g)]
    assert len(layers) == NUM_LAYERS
    for group in layers:
        stacks = stacks_of(group)
        assert len(stacks) == 3 and all(len(s.names) == NUM_EXPERTS for s in stacks)
        expert_names = {n for n, _ in group if ".experts." in n and ".shared_expert" not in n}
        assert {n for s in stacks for n in s.names} == expert_names  # every routed expert, in a stack
        for stack in stacks:
            for i, (name, tensor) in enumerate(group[stack.start:stack.stop]):
                assert name == stack.names[i] and _same_view(tensor, stack.tensor[i])


def _layer0(model, **options):
    return next(g for g in ModuleSource(model, **options).groups() if stacks_of(g))


def test_a_conversion_of_the_trainers_own_tensors_is_kept_across_syncs_and_never_stale():
    """A sync builds a new source each step; the converted layer (views of the trainer's tensors) is reused while
    those tensors stay where they are, so in-place updates show, and a re-allocated tensor converts again."""
    model = _build("qwen3_moe")
    first = _layer0(model)
    assert _layer0(model) is first  # the same group: transformers' ops did not run per expert again
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        experts.down_proj.add_(1.0)  # an optimizer step: in place
    again = _layer0(model)
    assert again is first
    name, tensor = next((n, t) for n, t in again if n.endswith("experts.1.down_proj.weight"))
    assert torch.equal(tensor, experts.down_proj[1])
    experts.down_proj.data = experts.down_proj.data * 2  # re-allocated: never the stale views
    fresh = _layer0(model)
    assert fresh is not first
    assert torch.equal(dict(fresh)[name], experts.down_proj[1]) and not torch.equal(dict(first)[name], dict(fresh)[name])


def test_a_cast_or_merged_conversion_is_never_kept():
    model = _build("qwen3_moe").to(torch.float32)
    first = _layer0(model, dtype=torch.bfloat16)  # cast per sync: a new tensor every time
    assert _layer0(model, dtype=torch.bfloat16) is not first
