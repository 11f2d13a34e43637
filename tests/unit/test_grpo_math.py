"""GRPO's advantages and loss terms on hand-made numbers."""

import pytest
import torch

from rlsync.rl.grpo import GRPOHParams, group_advantages, policy_loss
from rlsync.rl.logprobs import make_batch
from rlsync.rl.tasks import TaskConfig, make_task, vowel_share


def test_group_advantages_normalize_within_each_group():
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.5, 2.0, 2.0, 4.0, 4.0])
    adv = group_advantages(rewards, group_size=4).view(2, 4)
    assert torch.allclose(adv.mean(1), torch.zeros(2), atol=1e-6)
    assert adv[0, 1] > 0 > adv[0, 0]
    assert torch.allclose(adv[1], torch.tensor([-1.0, -1.0, 1.0, 1.0]) * 0.866, atol=1e-3)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_make_batch_aligns_completion_logprobs():
    batch = make_batch([[1, 5, 6], [1, 7]], [[9, 10], [11]], [[-0.5, -0.25], [-1.0]])
    assert batch.input_ids.tolist() == [[1, 5, 6, 9, 10], [1, 7, 11, 0, 0]]
    assert batch.completion_mask.tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    assert batch.rollout_logprobs.tolist() == [[0, 0, -0.5, -0.25], [0, -1.0, 0, 0]]


def test_policy_loss_clips_and_caps_importance_weights():
    batch = make_batch([[1]], [[2, 3]], [[-3.0, -1.0]])
    adv = torch.tensor([1.0])
    old = torch.tensor([[-1.0, -1.0]])
    new = old + torch.tensor([[0.5, 0.0]])  # ratio e^0.5 = 1.65 on token 0: clipped to 1.2
    hp = GRPOHParams(clip_ratio=0.2, is_cap=None)
    loss, stats = policy_loss(new, old, adv, batch, hp)
    assert loss.item() == pytest.approx(-(1.2 + 1.0) / 2)
    assert stats["clip_fraction"] == 0.5
    # trainer p / engine p = e^2 on token 0 (capped at 2), 1 on token 1
    loss_is, _ = policy_loss(old, old, adv, batch, GRPOHParams(is_cap=2.0))
    assert loss_is.item() == pytest.approx(-(2.0 + 1.0) / 2)


def test_kl_penalty_is_zero_at_the_reference_and_positive_away():
    batch = make_batch([[1]], [[2]], [[-1.0]])
    logp = torch.tensor([[-1.0]])
    hp = GRPOHParams(kl_coef=0.5, is_cap=None)
    _, same = policy_loss(logp, logp, torch.zeros(1), batch, hp, ref_logp=logp)
    _, away = policy_loss(logp, logp, torch.zeros(1), batch, hp, ref_logp=logp - 1)
    assert same["kl"] == 0.0 and away["kl"] > 0.1


def test_vowel_reward():
    assert vowel_share(["aeiou", "abab", ""]) == [1.0, 0.5, 0.0]
    task = make_task(TaskConfig(prompt_length=5), seed=1)
    prompts = task.prompts(3)
    assert all(len(p) == 6 and p.endswith(":") for p in prompts)
    assert make_task(TaskConfig(prompt_length=5), seed=1).prompts(3) == prompts
    assert task.rewards(prompts, ["aeiou", "abab", ""]) == [1.0, 0.5, 0.0] and task.step_metrics() == {}
