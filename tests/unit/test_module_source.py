"""ModuleSource: layer groups in order, HF names, tied weights once, bounded casts."""

import torch

from rlsync.source import ModuleSource


def test_groups_follow_layers_with_hf_names(trainer_model):
    source = ModuleSource(trainer_model)
    groups = list(source.groups())
    names = [[n for n, _ in g] for g in groups]
    assert names[0] == ["model.embed_tokens.weight"]
    assert all(n.startswith("model.layers.0.") for n in names[1])
    assert all(n.startswith("model.layers.1.") for n in names[2])
    assert names[3] == ["model.norm.weight"]  # tied lm_head.weight is not yielded again
    flat = [n for g in names for n in g]
    assert len(flat) == len(set(flat))
    sd = {k: v for k, v in trainer_model.state_dict().items() if k != "lm_head.weight"}
    assert set(flat) == set(sd)
    assert [m.name for m in source.metadata()] == flat


def test_cast_source_counts_only_one_group(trainer_model):
    source = ModuleSource(trainer_model, dtype=torch.bfloat16)
    sizes = []
    for group in source.groups():
        assert all(t.dtype == torch.bfloat16 for _, t in group)
        sizes.append(sum(t.nbytes for _, t in group))
    assert source.stats.peak_bytes == max(sizes)
    assert source.stats.live_bytes == 0
