"""Byte budget: groups split into buckets whose gathered bytes respect it; options are validated."""

import pytest
import torch

from rlsync.source import ModuleSource, SourceConfig, group_key
from rlsync.source.gather import Entry, Item, split_buckets


def items(sizes):
    return [Item(name=f"model.layers.0.p{i}", entries=[Entry(raw=f"p{i}", shape=(s,), dtype=torch.uint8)])
            for i, s in enumerate(sizes)]


def test_split_buckets_packs_greedily_and_isolates_oversized_items():
    its = items([40, 40, 30, 100, 10])
    buckets = split_buckets(its, [40, 40, 30, 100, 10], budget=80)
    assert [[i.name[-2:] for i in b] for b in buckets] == [["p0", "p1"], ["p2"], ["p3"], ["p4"]]
    assert split_buckets(its, [1] * 5, budget=None) == [its]
    assert split_buckets([], [], budget=10) == []


def test_budgeted_cast_source_respects_budget_and_yields_everything(trainer_model):
    whole = {n: t.to(torch.bfloat16) for g in ModuleSource(trainer_model).groups() for n, t in g}
    layer_bytes = sum(t.nbytes for n, t in whole.items() if group_key(n) == "model.layers.0")
    budget = layer_bytes // 3
    source = ModuleSource(trainer_model, dtype=torch.bfloat16, bucket_bytes=budget)
    got, sizes = {}, []
    for bucket in source.groups():
        sizes.append(sum(t.nbytes for _, t in bucket))
        assert len({group_key(n) for n, _ in bucket}) == 1  # a bucket never mixes layers
        got.update({n: t.clone() for n, t in bucket})
    assert got.keys() == whole.keys() and all(torch.equal(got[n], whole[n]) for n in whole)
    assert len(sizes) > 4  # layers were split
    assert source.stats.peak_bytes == max(sizes) <= budget
    assert [m.name for m in source.metadata()] == list(got)


def test_local_source_without_cast_gathers_nothing(trainer_model):
    # the budget bounds gathered bytes; views of local parameters cost none, so groups stay whole
    source = ModuleSource(trainer_model, bucket_bytes=1)
    assert source.drain() == 4
    assert source.stats.peak_bytes == 0


@pytest.mark.parametrize("kwargs", [{"bucket_bytes": 0}, {"bucket_bytes": -5}, {"timeout_s": 0}])
def test_bad_options_are_value_errors(kwargs):
    with pytest.raises(ValueError):
        SourceConfig(**kwargs)
