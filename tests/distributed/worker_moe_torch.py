"""torchrun worker: MoE models (transformers 5 fused experts) through DDP, FSDP1 and FSDP2 sources.

Each case loads a tiny MoE checkpoint (Qwen3-MoE, Mixtral), wraps it, trains
one real AdamW step, and checks on every rank that the concatenated groups of
`source_for(model)` equal what `save_pretrained` writes for the unsharded
model (torch.distributed.checkpoint's full state dict, loaded into an unwrapped
copy and saved): the checkpoint's names (per-expert `experts.{e}.gate_proj` /
`up_proj` / `down_proj`, Mixtral's `block_sparse_moe.experts.{e}.w1/w2/w3`),
shapes, dtypes and bits. Groups hold one decoder layer each, and the peak of
gathered bytes is exactly the largest layer group (splitting its fused
`gate_up_proj` makes views, no copy; DDP gathers nothing: 0).

    torchrun --nproc_per_node 2 tests/distributed/worker_moe_torch.py QWEN3_MOE_PATH MIXTRAL_PATH
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
    check_source, checkpoint_of, group_bytes, load_model, main_guard, moe_copy_bytes, train_step, write_result,
)

OUT = os.environ["RLSYNC_TEST_OUT"]


def fsdp2(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def fsdp1(model):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({type(model.model.layers[0])}), use_orig_params=True,
                device_id=torch.device("cpu"))


def ddp(model):
    return torch.nn.parallel.DistributedDataParallel(model)


def run_case(name: str, path: str, wrap, expect_type, initial: dict) -> dict:
    torch.manual_seed(0)
    model = load_model(path)
    template = copy.deepcopy(model)
    wrapped = wrap(model)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
    loss = train_step(wrapped, optimizer, seed=1)
    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True))
    expected = checkpoint_of(full, template, os.path.join(OUT, name))
    assert any(".experts.0." in n for n in expected), f"{name}: the checkpoint has no per-expert tensors"
    source = source_for(wrapped)
    assert type(source) is expect_type, f"{name}: source_for gave {type(source).__name__}"
    copies = moe_copy_bytes(template)
    gathered = {} if expect_type is ModuleSource else group_bytes(expected)  # DDP holds every tensor already
    bound = max(gathered.get(key, 0) + copies.get(key, 0) for key in gathered.keys() | copies.keys())
    before = [p.to_local().detach().clone() if hasattr(p, "to_local") else p.detach().clone()
              for p in wrapped.parameters()]
    result = check_source(name, source, expected, initial, bound=bound)
    after = [p.to_local().detach() if hasattr(p, "to_local") else p.detach() for p in wrapped.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), f"{name}: trainer weights changed"
    assert result["peak"] == bound, f"{name}: peak gathered {result['peak']} B != one layer group's {bound} B"
    num_layers = len(template.model.layers)
    assert result["groups"] == num_layers + 2, f"{name}: {result['groups']} groups for {num_layers} layers"
    result["loss"] = loss
    dist.barrier()
    return result


def main():
    paths = {"qwen3_moe": sys.argv[1], "mixtral": sys.argv[2]}
    dist.init_process_group("gloo")
    results = []
    for family, path in paths.items():
        initial = checkpoint_of(load_model(path).state_dict(), load_model(path),
                                os.path.join(OUT, f"{family}-initial"))
        for backend, wrap, expect_type in (("ddp", ddp, ModuleSource), ("fsdp1", fsdp1, FSDP1Source),
                                           ("fsdp2", fsdp2, FSDP2Source)):
            results.append(run_case(f"{family}-{backend}", path, wrap, expect_type, initial))
    write_result(results)
    dist.destroy_process_group()


if __name__ == "__main__":
    main_guard(main)
