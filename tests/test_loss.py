"""The loss algebra against values worked out by hand."""

import math

import pytest
import torch

from trainer.loss import policy_loss, reverse_kl_advantages, sanitize_logprobs, token_logprobs


def test_sanitize_clips_nan_inf_and_below_floor():
    lp = torch.tensor([-1.0, float("nan"), float("-inf"), -30.0, -20.0])
    out, n = sanitize_logprobs(lp, floor=-20.0)
    assert out.tolist() == [-1.0, -20.0, -20.0, -20.0, -20.0]
    assert n == 3  # -20.0 itself is not below the floor


def test_reverse_kl_advantage_by_hand():
    s = torch.tensor([-1.0, -2.0])
    t = torch.tensor([-1.5, -0.5])
    # A = -coef * (s - t) = -coef * [0.5, -1.5]
    assert reverse_kl_advantages(s, t, 1.0).tolist() == [-0.5, 1.5]
    assert reverse_kl_advantages(s, t, 2.0).tolist() == [-1.0, 3.0]
    assert reverse_kl_advantages(s, s, 1.0).tolist() == [0.0, 0.0]  # student == teacher: no pull


def test_token_logprobs_matches_log_softmax():
    logits = torch.tensor([[[0.0, math.log(3.0)], [2.0, 2.0]]])
    ids = torch.tensor([[1, 0]])
    out = token_logprobs(logits, ids)
    assert out[0, 0].item() == pytest.approx(math.log(3 / 4), abs=1e-6)
    assert out[0, 1].item() == pytest.approx(math.log(1 / 2), abs=1e-6)
    big = torch.randn(2, 5, 50)
    ids = torch.randint(0, 50, (2, 5))
    ref = torch.log_softmax(big, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(token_logprobs(big, ids), ref, atol=1e-6)


def test_policy_loss_on_policy_is_reinforce():
    # ratio = 1 everywhere: loss = -sum(mask * A) / N = -(1 + 2) / 2 = -1.5
    inf = torch.tensor([-1.0, -2.0, -3.0])
    logp = inf.clone().requires_grad_(True)
    adv = torch.tensor([1.0, 2.0, 3.0])
    mask = torch.tensor([1.0, 1.0, 0.0])
    loss, stats = policy_loss(logp, inf, adv, mask, 0.125, 8.0, normalizer=2.0)
    assert loss.item() == pytest.approx(-1.5)
    loss.backward()
    # d/dlogp of -(r * A)/N with r = exp(logp - inf) = 1: -A/N on kept tokens
    assert logp.grad.tolist() == pytest.approx([-0.5, -1.0, 0.0])
    assert stats == {"masked_low": 0.0, "masked_high": 0.0, "ratio_mean": 1.0, "tokens": 2.0}


def test_policy_loss_masks_extreme_ratios():
    inf = torch.zeros(3)
    logp = torch.tensor([math.log(10.0), math.log(0.1), math.log(2.0)])  # ratios 10, 0.1, 2
    adv = torch.tensor([1.0, 1.0, 3.0])
    loss, stats = policy_loss(logp, inf, adv, torch.ones(3), 0.125, 8.0, normalizer=3.0)
    # only the third token is kept: -(2 * 3) / 3 = -2
    assert loss.item() == pytest.approx(-2.0, rel=1e-6)
    assert stats["masked_high"] == 1.0 and stats["masked_low"] == 1.0
    assert stats["ratio_mean"] == pytest.approx((10 + 0.1 + 2) / 3, rel=1e-6)


def test_guarded_teacher_logprob_gives_bounded_advantage():
    s = torch.tensor([-0.5])
    t, n = sanitize_logprobs(torch.tensor([float("-inf")]), floor=-20.0)
    adv = reverse_kl_advantages(s, t, 1.0)
    assert n == 1 and adv.item() == pytest.approx(-19.5)
    loss, _ = policy_loss(s.clone().requires_grad_(True), s, adv, torch.ones(1), 0.125, 8.0, 1.0)
    assert math.isfinite(loss.item())


def test_batch_mean_baseline_by_hand():
    from trainer.loss import subtract_baseline

    a, b = torch.tensor([-1.0, -3.0]), torch.tensor([-5.0])
    # mean over all three tokens = -3
    out = subtract_baseline([a, b])
    assert out[0].tolist() == [2.0, 0.0] and out[1].tolist() == [-2.0]
    assert subtract_baseline([]) == []
