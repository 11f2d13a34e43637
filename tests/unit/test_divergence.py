"""A NaN or infinite loss or gradient stops the update with DivergenceError naming the step, and no weight
(nor optimizer state) is touched: the optimizer never steps on a non-finite gradient."""

import pytest
import torch

from rlsync.errors import DivergenceError
from rlsync.rl import grpo, ppo
from rlsync.rl.grpo import GRPOHParams, grpo_update
from rlsync.rl.logprobs import make_batch
from rlsync.rl.ppo import PPOHParams, ValueHead, ppo_update
from rlsync.trainer.stepper import TorchStepper, check_loss


def infinite_gradient(x: torch.Tensor) -> torch.Tensor:
    """0 in value, but d/dx sqrt(x - x) at 0 is infinite: a finite loss whose gradient is not."""
    return torch.sqrt(x.sum() - x.sum().detach())


def tiny_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return Qwen2ForCausalLM(config).float()


def batch():
    return make_batch([[1, 2], [3, 1]], [[4, 5, 6], [7, 8]], [[-2.0] * 3, [-2.0] * 2])


def snapshot(*modules):
    return [(p.data_ptr(), p.detach().clone()) for m in modules for p in m.parameters()]


def unchanged(before, *modules):
    params = [p for m in modules for p in m.parameters()]
    return all(ptr == p.data_ptr() and torch.equal(old, p) for (ptr, old), p in zip(before, params, strict=True))


def test_stepper_refuses_an_infinite_gradient_before_stepping():
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stepper = TorchStepper(model, [opt], max_grad_norm=1.0)
    before = snapshot(model)
    loss = model(torch.randn(2, 4)).sum() * 0 + infinite_gradient(model.weight)
    assert torch.isfinite(loss)
    stepper.backward(loss)
    with pytest.raises(DivergenceError, match=r"step 7: the gradient norm is (nan|inf)"):
        stepper.step(train_step=7)
    assert unchanged(before, model) and opt.state == {}  # no Adam moments either


def test_stepper_still_steps_on_a_finite_gradient():
    model = torch.nn.Linear(4, 4)
    stepper = TorchStepper(model, [torch.optim.SGD(model.parameters(), lr=0.1)], max_grad_norm=1.0)
    before = snapshot(model)
    stepper.backward(model(torch.randn(2, 4)).pow(2).sum())
    assert stepper.step(train_step=1) > 0
    assert not unchanged(before, model)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_check_loss_names_the_step(value):
    with pytest.raises(DivergenceError, match=f"step 3: the loss is {value}"):
        check_loss(torch.tensor(value), 3)
    assert check_loss(torch.tensor(0.5), 3) == 0.5


@pytest.mark.parametrize("poison", ["nan_loss", "infinite_gradient"])
def test_grpo_update_stops_on_divergence_without_touching_the_policy(monkeypatch, poison):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    real_loss = grpo.policy_loss

    def poisoned(logp, *args, **kwargs):
        loss, stats = real_loss(logp, *args, **kwargs)
        return (loss * float("nan") if poison == "nan_loss" else loss + infinite_gradient(logp)), stats

    monkeypatch.setattr(grpo, "policy_loss", poisoned)
    before = snapshot(model)
    what = "loss" if poison == "nan_loss" else "gradient norm"
    with pytest.raises(DivergenceError, match=f"step 5: the {what} is"):
        grpo_update(model, opt, batch(), torch.tensor([1.0, -1.0]), GRPOHParams(is_cap=None), step=5)
    assert unchanged(before, model)


def test_ppo_update_stops_on_a_nan_value_loss_without_touching_policy_or_head(monkeypatch):
    model, head = tiny_model(), ValueHead(32)
    opts = [torch.optim.AdamW(model.parameters(), lr=1e-2), torch.optim.AdamW(head.parameters(), lr=1e-2)]
    real_value_loss = ppo.value_loss
    monkeypatch.setattr(ppo, "value_loss", lambda *a, **k: real_value_loss(*a, **k) * float("nan"))
    before = snapshot(model, head)
    with pytest.raises(DivergenceError, match="step 9: the loss is nan"):
        ppo_update(model, head, opts, batch(), torch.tensor([1.0, 0.0]),
                   PPOHParams(epochs=1, num_minibatches=1, is_cap=None), step=9)
    assert unchanged(before, model, head)
