"""PPO's pieces on hand-made numbers, and one update on a tiny model."""

import pytest
import torch

from rlsync.rl.logprobs import make_batch
from rlsync.rl.ppo import (
    PPOHParams,
    ValueHead,
    gae,
    logprobs_and_values,
    explained_variance,
    ppo_update,
    token_rewards,
    value_error,
    value_loss,
    whiten,
)


def test_gae_matches_the_recursion_by_hand():
    # one row: prompt position 0, completion positions 1..3, padding at 4
    mask = torch.tensor([[0.0, 1, 1, 1, 0]])
    values = torch.tensor([[9.0, 0.5, 0.25, 1.0, 7.0]])  # 9 and 7 must not leak in
    rewards = torch.tensor([[0.0, 0.0, 0.0, 2.0, 0.0]])
    gamma, lam = 0.9, 0.8
    d3 = 2.0 - 1.0
    d2 = 0.0 + gamma * 1.0 - 0.25
    d1 = 0.0 + gamma * 0.25 - 0.5
    a3 = d3
    a2 = d2 + gamma * lam * a3
    a1 = d1 + gamma * lam * a2
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert adv.tolist()[0] == pytest.approx([0.0, a1, a2, a3, 0.0])
    assert ret.tolist()[0] == pytest.approx([0.0, a1 + 0.5, a2 + 0.25, a3 + 1.0, 0.0])


def test_gae_with_lambda_one_gives_monte_carlo_returns():
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    values = torch.rand(2, 3)
    rewards = torch.tensor([[0.0, 0, 3], [0, 5, 0]])
    _, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(ret, torch.tensor([[3.0, 3, 3], [5, 5, 0]]))


def test_token_rewards_put_the_reward_on_the_last_completion_token_minus_kl():
    batch = make_batch([[1, 2], [1]], [[3, 4], [5, 6, 7]], [[-1.0, -1.0], [-1.0, -1.0, -1.0]])
    out = token_rewards(batch, torch.tensor([1.0, 0.5]))
    assert out.tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 0.5]]  # [B, T-1]: row 0's completion sits at 1..2
    old = torch.full((2, 3), -1.0)
    ref = torch.full((2, 3), -1.5)  # policy more confident than the reference: KL estimate 0.5 per token
    shaped = token_rewards(batch, torch.tensor([1.0, 0.5]), kl_coef=0.1, old_logp=old, ref_logp=ref)
    assert torch.allclose(shaped, torch.tensor([[0, -0.05, 0.95], [-0.05, -0.05, 0.45]]))


def test_whiten_and_value_loss_clip():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, mask)
    assert float((w * mask).sum()) == pytest.approx(0.0, abs=1e-6) and w[0, 3] == 0
    assert float((w[0, :3] ** 2).mean()) == pytest.approx(1.0, abs=1e-5)
    old = torch.zeros(1, 1)
    ret = torch.ones(1, 1)
    m = torch.ones(1, 1)
    # V moved from 0 to 0.9 toward R=1: the clipped value (0.2) is farther, so it is the loss
    assert value_loss(torch.full((1, 1), 0.9), old, ret, m, clip=0.2).item() == pytest.approx(0.5 * 0.8**2)
    # V moved within the clip: plain squared error
    assert value_loss(torch.full((1, 1), 0.1), old, ret, m, clip=0.2).item() == pytest.approx(0.5 * 0.9**2)


def test_value_error_and_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.ones(1, 3)
    assert value_error(torch.zeros(1, 3), ret, mask) == 1.0  # the zero critic
    assert value_error(ret.clone(), ret, mask) == 0.0
    assert explained_variance(torch.full((1, 3), 2.0), ret, mask) == pytest.approx(0.0)  # the mean
    assert explained_variance(ret + 5, ret, mask) == pytest.approx(1.0)  # a constant offset is explained


def _tiny_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return Qwen2ForCausalLM(config).float()


def _batch():
    # distinct prompts, so the critic can tell the sequences apart from their first position on
    batch = make_batch([[1, 2], [3, 1], [2, 2], [3, 3]], [[4, 5, 6], [7, 8], [4, 4, 4, 4], [9]],
                       [[-2.0] * 3, [-2.0] * 2, [-2.0] * 4, [-2.0]])
    return batch, torch.tensor([1.0, 0.0, 1.0, 0.0])


def _run(hp, num_updates):
    model, head = _tiny_model(), ValueHead(32)
    opts = [torch.optim.AdamW(model.parameters(), lr=hp.lr), torch.optim.AdamW(head.parameters(), lr=hp.value_lr)]
    batch, rewards = _batch()
    with torch.no_grad():
        lp0, v0 = logprobs_and_values(model, head, batch, 1.0, detach_trunk=True)
    assert torch.equal(v0, torch.zeros_like(v0))  # the head starts at zero
    metrics = [ppo_update(model, head, opts, batch, rewards, hp) for _ in range(num_updates)]
    with torch.no_grad():
        lp1, _ = logprobs_and_values(model, head, batch, 1.0, detach_trunk=True)
    return metrics, ((lp1 - lp0) * batch.completion_mask).sum(1)


def test_ppo_update_fits_the_critic():
    # policy nearly frozen, Monte Carlo targets (lam=1): the critic's error on the batch falls steadily
    hp = PPOHParams(epochs=4, num_minibatches=2, lr=1e-6, value_lr=1e-2, lam=1.0, is_cap=None, value_clip=10.0)
    metrics, _ = _run(hp, 6)
    errors = [m["value_error"] for m in metrics]
    assert errors[0] == 1.0  # the head starts as the zero critic
    assert errors[-1] < 0.05 and errors[-1] < errors[2] < errors[0], errors
    assert metrics[-1]["explained_variance"] > 0.5, metrics[-1]
    for key in ("loss", "policy_loss", "value_loss", "clip_fraction", "grad_norm", "logprob_mismatch"):
        assert metrics[0][key] == metrics[0][key]  # present, not NaN


def test_ppo_update_makes_rewarded_sequences_likelier():
    hp = PPOHParams(epochs=2, num_minibatches=2, lr=1e-2, value_lr=1e-2, is_cap=None)
    _, gain = _run(hp, 2)
    assert gain[0] > 0 and gain[2] > 0 and gain[1] < 0 and gain[3] < 0, gain
