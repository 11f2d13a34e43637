"""torchrun worker: DDP, Accelerate (DDP), FSDP1, FSDP2, FSDP2 with a byte budget, LoRA on FSDP2.

Each case trains one real AdamW step, then checks on every rank that the
concatenated groups of `source_for(model)` equal the unsharded model's state
dict (from torch.distributed.checkpoint's full state dict, PEFT-merged for
LoRA) exactly, and that the peak of gathered bytes stays within one group.

    torchrun --nproc_per_node 2 tests/distributed/worker_torch.py TIED_PATH UNTIED_PATH
"""

import copy
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402

from rlsync.source import FSDP1Source, FSDP2Source, ModuleSource, source_for  # noqa: E402
from tests.distributed.common import (  # noqa: E402
    add_lora, check_source, decoder_layers, group_bytes, load_model, log, lora_bound, main_guard,
    reference_params, train_step, write_result,
)

BUDGET = 600_000  # bytes: a third of a decoder layer, above the largest single tensor (512 KiB)


def full_state(model) -> dict:
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def initial_params(path: str) -> dict:
    return {n: p.detach().clone() for n, p in load_model(path).named_parameters()}


def run_case(name: str, path: str, wrap, *, lora: bool = False, source_kwargs=None, consume=True, expect_type=None):
    torch.manual_seed(0)
    model = load_model(path)
    if lora:
        model = add_lora(model, modules_to_save=["lm_head"])
    template = copy.deepcopy(model)
    wrapped = wrap(model)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    loss = train_step(wrapped, optimizer, seed=1)
    expected = reference_params(full_state(wrapped), template, lora=lora)
    source = source_for(wrapped, **(source_kwargs or {}))
    if expect_type is not None:
        assert type(source) is expect_type, f"{name}: source_for gave {type(source).__name__}"
    budget = (source_kwargs or {}).get("bucket_bytes")
    if lora:
        bound = lora_bound({n: p.shape for n, p in template.named_parameters()}, expected)
    else:
        bound = max(group_bytes(expected).values())
    before = [p.detach().clone() if not hasattr(p, "to_local") else p.to_local().detach().clone()
              for p in wrapped.parameters()]
    result = check_source(name, source, expected, initial_params(path), bound=bound, budget=budget,
                          consume=consume)
    after = [p.detach() if not hasattr(p, "to_local") else p.to_local().detach() for p in wrapped.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), f"{name}: trainer weights changed"
    if budget is not None and consume:
        assert result["groups"] > len(group_bytes(expected)), f"{name}: budget did not split any group"
    if name.startswith(("ddp", "accelerate")) and not lora:
        assert result["peak"] == 0, f"{name}: a local source gathered {result['peak']} B"
    result["loss"] = loss
    dist.barrier()
    return result


def fsdp2(model):
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def fsdp1(model):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({Qwen2DecoderLayer}), use_orig_params=True,
                device_id=torch.device("cpu"))


def ddp(model):
    return torch.nn.parallel.DistributedDataParallel(model)


def accelerate_prepared(model):
    from accelerate import Accelerator

    prepared = Accelerator(cpu=True).prepare(model)
    log(f"accelerate prepared a {type(prepared).__name__}")
    return prepared


def main():
    tied, untied = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    results = [
        run_case("ddp", tied, ddp, expect_type=ModuleSource),
        run_case("accelerate-ddp", tied, accelerate_prepared, expect_type=ModuleSource),
        run_case("fsdp1", tied, fsdp1, expect_type=FSDP1Source),
        run_case("fsdp2", tied, fsdp2, expect_type=FSDP2Source),
        run_case("fsdp2-budget", tied, fsdp2, source_kwargs={"bucket_bytes": BUDGET}),
        # only rank 0 owns an engine here: rank 1 drains in lockstep
        run_case("fsdp2-drain", tied, fsdp2, consume=dist.get_rank() == 0),
        run_case("fsdp2-lora", untied, fsdp2, lora=True, expect_type=FSDP2Source),
        run_case("ddp-lora", untied, ddp, lora=True),
    ]
    write_result(results)
    dist.destroy_process_group()


if __name__ == "__main__":
    main_guard(main)
