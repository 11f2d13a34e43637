"""deepspeed worker: ZeRO-2, ZeRO-3, ZeRO-3 with a byte budget, LoRA on ZeRO-3.

Each case trains one real step through `deepspeed.initialize` (a plain torch
AdamW; no compiled DeepSpeed ops), then checks on every rank that the
concatenated groups of `source_for(engine)` equal the unsharded model
(ZeRO-3: DeepSpeed's own consolidated state dict, PEFT-merged for LoRA)
exactly, and that the peak of gathered bytes stays within one group.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/distributed/worker_deepspeed.py TIED_PATH UNTIED_PATH
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
    check_source, ds_config, group_bytes, load_model, lora_bound, main_guard, reference_params, train_step,
    write_result, zero3_gathered_peak, zero_full_state, zero_local,
)

BUDGET = 600_000


def run_case(name, path, stage, *, lora=False, source_kwargs=None, expect_type=None):
    torch.manual_seed(0)
    model = load_model(path)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    if lora:
        from tests.distributed.common import add_lora

        model = add_lora(model, modules_to_save=["lm_head"])
    template = copy.deepcopy(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(stage))
    loss = train_step(None, None, seed=1, deepspeed_engine=engine)
    expected = reference_params(zero_full_state(engine), template, lora=lora)
    source = source_for(engine, **(source_kwargs or {}))
    if expect_type is not None:
        assert type(source) is expect_type, f"{name}: source_for gave {type(source).__name__}"
    if lora:
        bound = lora_bound({n: p.shape for n, p in template.named_parameters()}, expected)
    else:
        bound = max(group_bytes(expected).values())
    before = [zero_local(p).clone() for p in engine.module.parameters()]
    # ZeRO-3 leaves some parameters gathered after a forward (persistence threshold, prefetch)
    available_before = {n for n, p in engine.module.named_parameters() if p.numel() != 0}
    budget = (source_kwargs or {}).get("bucket_bytes")
    result = check_source(name, source, expected, initial, bound=bound, budget=budget)
    after = [zero_local(p) for p in engine.module.parameters()]
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if not torch.equal(a, b)]
    assert not changed, f"{name}: trainer weights changed: {[(before[i].shape, after[i].shape) for i in changed[:3]]}"
    if stage == 3:
        observed = zero3_gathered_peak(name, engine, source, available_before)
        assert 0 < observed <= min(bound, budget or bound), f"{name}: DeepSpeed saw {observed} B gathered at once"
        result["deepspeed_observed_peak"] = observed
    if stage == 3 and not lora and budget is None:
        assert result["peak"] == bound, f"{name}: ZeRO-3 peak {result['peak']} != largest group {bound}"
    if stage < 3 and not lora:
        assert result["peak"] == 0, f"{name}: a local source gathered {result['peak']} B"
    result["loss"] = loss
    dist.barrier()
    return result


def main():
    tied, untied = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    init_deepspeed("gloo")  # DeepSpeed's group, its /dev/shm buffer names removed
    results = [
        run_case("zero2", tied, 2, expect_type=ModuleSource),
        run_case("zero3", tied, 3, expect_type=Zero3Source),
        run_case("zero3-budget", tied, 3, source_kwargs={"bucket_bytes": BUDGET}),
        run_case("zero3-lora", untied, 3, lora=True, expect_type=Zero3Source),
    ]
    write_result(results)


if __name__ == "__main__":
    main_guard(main)
