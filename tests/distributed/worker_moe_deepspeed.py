"""deepspeed worker: MoE models (transformers 5 fused experts) through ZeRO-2 and ZeRO-3 sources.

Each case loads a tiny MoE checkpoint (Qwen3-MoE, Mixtral), trains one real
step through `deepspeed.initialize` (a plain torch AdamW), and checks on every
rank that the concatenated groups of `source_for(engine)` equal what
`save_pretrained` writes for the unsharded model (DeepSpeed's consolidated
state dict, loaded into an unwrapped copy and saved): per-expert names, shapes,
dtypes and bits. Groups hold one decoder layer each; ZeRO-3's peak of gathered
bytes is exactly the largest layer group (splitting its fused `gate_up_proj`
makes views, no copy), and DeepSpeed's own view (parameters available at each
yield) never exceeds one layer group. ZeRO-2 holds full parameters: nothing.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/distributed/worker_moe_deepspeed.py QWEN3_MOE_PATH MIXTRAL_PATH
"""

import copy
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from rlsync.source import ModuleSource, Zero3Source, source_for  # noqa: E402
from rlsync.trainer import init_deepspeed  # noqa: E402
from tests.distributed.common import (  # noqa: E402
    check_source, checkpoint_of, ds_config, group_bytes, load_model, main_guard, moe_copy_bytes, train_step,
    write_result, zero3_gathered_peak, zero_full_state, zero_local,
)

OUT = os.environ["RLSYNC_TEST_OUT"]


def run_case(name: str, path: str, stage: int, initial: dict) -> dict:
    torch.manual_seed(0)
    model = load_model(path)
    template = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(stage))
    loss = train_step(None, None, seed=1, deepspeed_engine=engine)
    expected = checkpoint_of(zero_full_state(engine), template, os.path.join(OUT, name))
    assert any(".experts.0." in n for n in expected), f"{name}: the checkpoint has no per-expert tensors"
    source = source_for(engine)
    expect_type = Zero3Source if stage == 3 else ModuleSource
    assert type(source) is expect_type, f"{name}: source_for gave {type(source).__name__}"
    copies = moe_copy_bytes(template)
    layers = group_bytes(expected) if stage == 3 else {}  # ZeRO-2 modules hold every tensor already
    bound = max(layers.get(key, 0) + copies.get(key, 0) for key in layers.keys() | copies.keys())
    before = [zero_local(p).clone() for p in engine.module.parameters()]
    available_before = {n for n, p in engine.module.named_parameters() if p.numel() != 0}
    result = check_source(name, source, expected, initial, bound=bound)
    after = [zero_local(p) for p in engine.module.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), f"{name}: trainer weights changed"
    assert result["peak"] == bound, f"{name}: peak gathered {result['peak']} B != one layer group's {bound} B"
    num_layers = len(template.model.layers)
    assert result["groups"] == num_layers + 2, f"{name}: {result['groups']} groups for {num_layers} layers"
    if stage == 3:
        observed = zero3_gathered_peak(name, engine, source, available_before)
        assert observed == max(layers.values()), f"{name}: DeepSpeed saw {observed} B gathered at once"
        result["deepspeed_observed_peak"] = observed
    result["loss"] = loss
    dist.barrier()
    return result


def main():
    qwen3_moe, mixtral = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    init_deepspeed("gloo")  # DeepSpeed's group, its /dev/shm buffer names removed
    results = []
    for family, path in (("qwen3_moe", qwen3_moe), ("mixtral", mixtral)):
        initial = checkpoint_of(load_model(path).state_dict(), load_model(path), os.path.join(OUT, f"{family}-initial"))
        for stage in (2, 3):
            results.append(run_case(f"{family}-zero{stage}", path, stage, initial))
    write_result(results)


if __name__ == "__main__":
    main_guard(main)
