"""torchrun / deepspeed worker: each backend's wrap + Stepper equals one process stepping on both ranks' batches.

Per backend: the tiny policy (wrapped by `rlsync.trainer.wrap`) plus a PPO
value head outside the wrapper (an `extra` module) take one SGD step, each
rank on its own batch, with gradient clipping active. On every rank the
result must equal a plain one-process step on the mean of both ranks' losses:
the backend averages the policy's gradients, `average_grads` the head's, and
the clip uses the global norm (jointly with the head for torch backends,
separately under DeepSpeed: `rlsync.trainer.stepper`, limitation 1). Also
checks `mean_over_ranks`.

    torchrun --nproc_per_node 2 tests/distributed/worker_stepper.py TINY_PATH ddp,fsdp1,fsdp2
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/distributed/worker_stepper.py TINY_PATH zero2,zero3
"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from rlsync.rl.ppo import ValueHead  # noqa: E402
from rlsync.trainer import TrainerConfig, mean_over_ranks, setup_distributed, wrap  # noqa: E402
from tests.distributed.common import batch, load_model, log, main_guard, write_result  # noqa: E402

MAX_NORM = 0.5  # below the step's gradient norm (~2-4), so clipping is exercised
LR = 0.1
PARAM_ATOL = 1e-6  # SGD: a parameter moves by LR * clipped gradient; float reordering stays far below this


def loss_fn(model, head, ids) -> torch.Tensor:
    out = model(input_ids=ids, labels=ids, output_hidden_states=True)
    return out.loss + ((head(out.hidden_states[-1]) - 1.0) ** 2).mean()  # trunk shared by both losses


def reference(path: str, joint: bool) -> tuple[dict, dict, float]:
    """One process: mean of both ranks' losses, clip, SGD step."""
    model = load_model(path)
    head = ValueHead(model.config.hidden_size)
    policy_params, head_params = list(model.parameters()), list(head.parameters())
    loss = sum(loss_fn(model, head, batch(700 + r)) for r in range(2)) / 2
    loss.backward()
    if joint:
        norm = float(torch.nn.utils.clip_grad_norm_(policy_params + head_params, MAX_NORM))
    else:
        p = float(torch.nn.utils.clip_grad_norm_(policy_params, MAX_NORM))
        h = float(torch.nn.utils.clip_grad_norm_(head_params, MAX_NORM))
        norm = (p**2 + h**2) ** 0.5
    torch.optim.SGD(policy_params + head_params, lr=LR).step()
    return ({n: p.detach() for n, p in model.named_parameters()},
            {n: p.detach() for n, p in head.named_parameters()}, norm)


def full_state(model, backend: str) -> dict:
    if backend == "zero3":
        box = [model._zero3_consolidated_16bit_state_dict()]  # rank 0 only
        dist.broadcast_object_list(box, src=0)
        return box[0]
    if backend == "zero2":
        return dict(model.module.state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def run_backend(path: str, backend: str) -> dict:
    model = load_model(path)
    head = ValueHead(model.config.hidden_size)
    head_opt = torch.optim.SGD(head.parameters(), lr=LR)
    trainer = wrap(model, TrainerConfig(backend=backend), lambda ps: torch.optim.SGD(ps, lr=LR),
                   max_grad_norm=MAX_NORM, extra=[head], extra_optimizers=[head_opt])
    loss = loss_fn(trainer.model, head, batch(700 + dist.get_rank()))
    trainer.stepper.zero_grad()
    trainer.stepper.backward(loss)
    norm = trainer.stepper.step()
    got = full_state(trainer.model, backend)
    want, want_head, want_norm = reference(path, joint=not backend.startswith("zero"))
    assert abs(norm - want_norm) <= 1e-5 * want_norm, f"{backend}: grad norm {norm} != reference {want_norm}"
    assert want_norm > 2 * MAX_NORM, f"{backend}: clipping not exercised (norm {want_norm})"
    worst = 0.0
    for name, ref in want.items():
        diff = float((got[name].detach().float() - ref).abs().max())
        worst = max(worst, diff)
        assert diff <= PARAM_ATOL, f"{backend}: {name} differs from the reference by {diff}"
    for name, ref in want_head.items():
        diff = float((dict(head.named_parameters())[name].detach() - ref).abs().max())
        worst = max(worst, diff)
        assert diff <= PARAM_ATOL, f"{backend}: value head {name} differs from the reference by {diff}"
    log(f"{backend}: grad norm {norm:.6f} (reference {want_norm:.6f}), max |param - reference| {worst:.2e}")
    dist.barrier()
    return {"backend": backend, "grad_norm": norm, "reference_norm": want_norm, "max_param_diff": worst}


def main():
    path, backends = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    backends = backends.split(",")
    setup_distributed(TrainerConfig(backend=backends[0]))
    assert mean_over_ranks({"rank": float(dist.get_rank()), "one": 1.0}) == {"rank": 0.5, "one": 1.0}
    write_result([run_backend(path, b) for b in backends])


if __name__ == "__main__":
    main_guard(main)
