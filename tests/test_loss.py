"""The loss algebra against values worked out by hand (the arithmetic is in the comments)."""

import math
import socket

import pytest
import torch

from shared.advantages import (
    combined_advantages,
    discounted_sum,
    group_advantages,
    reverse_kl_advantages,
    sanitize_logprobs,
    subtract_baseline,
)
from shared.config import ConfigError, LossConfig, from_dict, load, to_toml
from shared.wire import TrainBatch, TrainSample, decode, encode
from trainer.loss import CHUNK, entropy, masked_nll, policy_loss, reference_kl, token_logprobs

SQRT3 = math.sqrt(3.0)


def test_sanitize_clips_nan_inf_and_below_floor():
    lp = torch.tensor([-1.0, float("nan"), float("-inf"), -30.0, -20.0])
    out, n = sanitize_logprobs(lp, floor=-20.0)
    assert out.tolist() == [-1.0, -20.0, -20.0, -20.0, -20.0]
    assert n == 3  # -20.0 itself is not below the floor


# ----------------------------------------------------------------------------------------------
# Advantages


def test_group_advantages_by_hand():
    rewards = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    groups = [7, 9, 7, 9, 7, 7]
    # group 7 = rollouts 0, 2, 4, 5 with rewards [1, 0, 0, 0]: mean 0.25 -> [0.75, -0.25, -0.25, -0.25]
    # group 9 = rollouts 1, 3 with rewards [1, 1]: mean 1 -> [0, 0]
    assert group_advantages(rewards, groups) == [0.75, 0.0, -0.25, 0.0, -0.25, -0.25]
    # std_scale: group 7's population variance = (0.75^2 + 3 * 0.25^2) / 4 = 0.75 / 4 = 3/16, std = sqrt(3)/4;
    # 0.75 / (sqrt(3)/4) = sqrt(3), -0.25 / (sqrt(3)/4) = -1/sqrt(3).  Group 9's std is 0: 0 / 1e-6 = 0.
    scaled = group_advantages(rewards, groups, std_scale=True)
    assert scaled == pytest.approx([SQRT3, 0.0, -1 / SQRT3, 0.0, -1 / SQRT3, -1 / SQRT3], rel=1e-5)
    assert group_advantages([], []) == []
    with pytest.raises(ValueError):
        group_advantages([1.0], [0, 1])


S = torch.tensor([-1.0, -2.0, -0.5])  # student log-probs of three sampled tokens
T = torch.tensor([-1.5, -0.5, -0.5])  # teacher log-probs of the same tokens


def test_combined_token_level_discount_zero():
    # k_t = teacher_tau * T - student_tau * S; taus 1: T - S = [-0.5, 1.5, 0]
    assert combined_advantages(S, T, 0.0, 0.0, 1.0, 1.0).tolist() == [-0.5, 1.5, 0.0]
    # teacher_tau 2, student_tau 1: 2T - S = [-3 + 1, -1 + 2, -1 + 0.5] = [-2, 1, -0.5]
    assert combined_advantages(S, T, 0.0, 0.0, 2.0, 1.0).tolist() == [-2.0, 1.0, -0.5]
    # teacher_tau = student_tau = kl_coef is the skeleton's reverse-KL advantage
    assert torch.equal(combined_advantages(S, T, 0.0, 0.0, 2.0, 2.0), reverse_kl_advantages(S, T, 2.0))


def test_combined_token_level_discounted():
    # k = [-0.5, 1.5, 0], discount 0.5, from the end: A_2 = 0; A_1 = 1.5 + 0.5 * 0 = 1.5;
    # A_0 = -0.5 + 0.5 * 1.5 = 0.25
    assert combined_advantages(S, T, 0.0, 0.0, 1.0, 1.0, discount=0.5).tolist() == [0.25, 1.5, 0.0]
    # discount 1: reward-to-go, A_0 = -0.5 + 1.5 + 0 = 1.0, A_1 = 1.5, A_2 = 0
    assert combined_advantages(S, T, 0.0, 0.0, 1.0, 1.0, discount=1.0).tolist() == [1.0, 1.5, 0.0]


def test_combined_sequence_level():
    # every token gets the summed sequence term: -0.5 + 1.5 + 0 = 1
    assert combined_advantages(S, T, 0.0, 0.0, 1.0, 1.0, level="sequence").tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        combined_advantages(S, T, 0.0, 0.0, 1.0, 1.0, level="sequence", discount=0.5)
    with pytest.raises(ValueError):
        combined_advantages(S, T, 0.0, 0.0, 1.0, 1.0, level="prompt")


def test_combined_mixes_the_task_advantage():
    # adv_tau * A_task = 2 * 0.75 = 1.5 is added to every token
    # token level:    [-0.5, 1.5, 0] + 1.5 = [1.0, 3.0, 1.5]
    assert combined_advantages(S, T, 0.75, 2.0, 1.0, 1.0).tolist() == [1.0, 3.0, 1.5]
    # sequence level: [1, 1, 1] + 1.5 = [2.5, 2.5, 2.5]
    assert combined_advantages(S, T, 0.75, 2.0, 1.0, 1.0, level="sequence").tolist() == [2.5, 2.5, 2.5]
    # pure task advantage (taus 0): every token gets adv_tau * A_task = 1 * -0.25
    assert combined_advantages(S, T, -0.25, 1.0, 0.0, 0.0).tolist() == [-0.25, -0.25, -0.25]
    # a batch: rows [S, T swapped] with a per-row A_task column [[1], [-1]] and adv_tau 0.5
    # row 0: [-0.5, 1.5, 0] + 0.5 = [0, 2, 0.5]; row 1: S - T = [0.5, -1.5, 0] - 0.5 = [0, -2, -0.5]
    batch = combined_advantages(torch.stack([S, T]), torch.stack([T, S]), torch.tensor([[1.0], [-1.0]]), 0.5, 1.0, 1.0)
    assert batch.tolist() == [[0.0, 2.0, 0.5], [0.0, -2.0, -0.5]]


def test_discounted_sum_by_hand():
    x = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 4.0]])
    # row 0: 1; 1 + 0.5 * 1 = 1.5; 1 + 0.5 * 1.5 = 1.75.  row 1: 4; 0 + 0.5 * 4 = 2; 0 + 0.5 * 2 = 1
    assert discounted_sum(x, 0.5).tolist() == [[1.75, 1.5, 1.0], [1.0, 2.0, 4.0]]
    assert discounted_sum(x, 0.0).tolist() == x.tolist()


def test_reverse_kl_advantage_by_hand():
    s = torch.tensor([-1.0, -2.0])
    t = torch.tensor([-1.5, -0.5])
    # A = -coef * (s - t) = -coef * [0.5, -1.5]
    assert reverse_kl_advantages(s, t, 1.0).tolist() == [-0.5, 1.5]
    assert reverse_kl_advantages(s, t, 2.0).tolist() == [-1.0, 3.0]
    assert reverse_kl_advantages(s, s, 1.0).tolist() == [0.0, 0.0]  # student == teacher: no pull


def test_batch_mean_baseline_by_hand():
    a, b = torch.tensor([-1.0, -3.0]), torch.tensor([-5.0])
    # mean over all three tokens = -3
    out = subtract_baseline([a, b])
    assert out[0].tolist() == [2.0, 0.0] and out[1].tolist() == [-2.0]
    assert subtract_baseline([]) == []


def test_guarded_teacher_logprob_gives_bounded_advantage():
    s = torch.tensor([-0.5])
    t, n = sanitize_logprobs(torch.tensor([float("-inf")]), floor=-20.0)
    adv = reverse_kl_advantages(s, t, 1.0)
    assert n == 1 and adv.item() == pytest.approx(-19.5)
    loss, _ = policy_loss(s.clone().requires_grad_(True), s, adv, torch.ones(1), 0.125, 8.0, 1.0)
    assert math.isfinite(loss.item())


def test_guard_in_every_mode():
    s = torch.tensor([-0.5, -1.0, -2.0])
    t, n = sanitize_logprobs(torch.tensor([float("-inf"), float("nan"), -3.0]), floor=-20.0)
    assert n == 2 and t.tolist() == [-20.0, -20.0, -3.0]
    # token: t - s = [-19.5, -19, -1]; sequence: -39.5 everywhere; discount 0.5:
    # A_2 = -1, A_1 = -19 - 0.5 = -19.5, A_0 = -19.5 - 9.75 = -29.25; + adv_tau * A_task = 1 * 1
    assert combined_advantages(s, t, 0.0, 0.0, 1.0, 1.0).tolist() == [-19.5, -19.0, -1.0]
    assert combined_advantages(s, t, 0.0, 0.0, 1.0, 1.0, level="sequence").tolist() == [-39.5] * 3
    assert combined_advantages(s, t, 1.0, 1.0, 1.0, 1.0, discount=0.5).tolist() == [-28.25, -18.5, 0.0]
    unguarded = combined_advantages(s, torch.tensor([float("-inf"), float("nan"), -3.0]), 0.0, 0.0, 1.0, 1.0)
    assert not torch.isfinite(unguarded[:2]).any()  # what the guard prevents


# ----------------------------------------------------------------------------------------------
# Per-position functions of the logits


def test_token_logprobs_matches_log_softmax():
    logits = torch.tensor([[[0.0, math.log(3.0)], [2.0, 2.0]]])
    ids = torch.tensor([[1, 0]])
    out = token_logprobs(logits, ids)
    # softmax([0, ln 3]) = [1/4, 3/4]; softmax([2, 2]) = [1/2, 1/2]
    assert out[0, 0].item() == pytest.approx(math.log(3 / 4), abs=1e-6)
    assert out[0, 1].item() == pytest.approx(math.log(1 / 2), abs=1e-6)
    big = torch.randn(2, 5, 50)
    ids = torch.randint(0, 50, (2, 5))
    ref = torch.log_softmax(big, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(token_logprobs(big, ids), ref, atol=1e-6)


def test_token_logprobs_in_blocks_keeps_values_and_gradients():
    torch.manual_seed(0)
    length = CHUNK + 44  # two blocks per row
    z = torch.randn(2, length, 37, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 37, (2, length))
    out = token_logprobs(z, ids)
    ref = torch.log_softmax(z, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert out.dtype == torch.float64 and torch.allclose(out, ref, atol=1e-12)
    w = torch.randn(2, length, dtype=torch.float64)
    (g,) = torch.autograd.grad((out * w).sum(), z)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), z)
    assert torch.allclose(g, g_ref, atol=1e-12)
    # the same numbers as the unblocked formula it replaces, bit for bit in float32
    z32 = z.detach().float()
    old = z32.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z32, dim=-1)
    assert torch.equal(token_logprobs(z32, ids), old)


def test_token_logprobs_of_bf16_logits():
    torch.manual_seed(1)
    z = torch.randn(3, 20, 40).bfloat16().requires_grad_(True)
    ids = torch.randint(0, 40, (3, 19))
    out = token_logprobs(z[:, :-1], ids)  # a sliced (non-contiguous) view, as the trainer passes it
    assert out.dtype == torch.float32
    ref = torch.log_softmax(z[:, :-1].float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(out, ref, atol=1e-5)
    out.sum().backward()
    g = z.grad.clone()
    z.grad = None
    ref.sum().backward()
    assert g.dtype == torch.bfloat16 and torch.allclose(g.float(), z.grad.float(), atol=1e-2)
    assert g[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_entropy_of_known_distributions():
    z = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e4, -1e4], [30.0, 0.0, 0.0, 0.0]],
                     requires_grad=True)
    h = entropy(z)
    # uniform over 4: ln 4 = 1.3862944
    # [1/4, 3/4, 0, 0]: 1/4 ln 4 + 3/4 ln(4/3) = 0.3465736 + 0.75 * 0.2876821 = 0.5623351
    # one logit 30 above the rest: ~0 (3 e^-30 * 31 ~ 9e-12)
    assert h.tolist() == pytest.approx([1.3862944, 0.5623351, 0.0], abs=1e-6)
    h[1].backward()
    # dH/dz_v = -p_v (ln p_v + H): v0: -0.25 (-1.3862944 + 0.5623351) = 0.2059898;
    # v1: -0.75 (-0.2876821 + 0.5623351) = -0.2059898; v2, v3: p = 0
    assert z.grad[1].tolist() == pytest.approx([0.2059898, -0.2059898, 0.0, 0.0], abs=1e-6)
    assert z.grad[0].tolist() == [0.0] * 4


def test_entropy_in_blocks_matches_the_full_softmax():
    torch.manual_seed(2)
    z = torch.randn(2, CHUNK + 3, 29, dtype=torch.float64, requires_grad=True)
    h = entropy(z)
    ref = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    assert torch.allclose(h, ref, atol=1e-12)
    w = torch.randn(2, CHUNK + 3, dtype=torch.float64)
    (g,) = torch.autograd.grad((h * w).sum(), z)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), z)
    assert torch.allclose(g, g_ref, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Loss terms


def test_reference_kl_estimators_by_hand():
    logp = torch.tensor([math.log(0.5), math.log(0.5)])
    ref = torch.tensor([math.log(0.25), math.log(0.75)])
    # k1 = logp - ref = [ln 2, ln(2/3)] = [0.6931472, -0.4054651]
    assert reference_kl(logp, ref, "k1").tolist() == pytest.approx([0.6931472, -0.4054651], abs=1e-6)
    # k3 with d = ref - logp: ratio e^d = [0.5, 1.5]; e^d - d - 1 = [0.5 + 0.6931472 - 1, 1.5 - 0.4054651 - 1]
    k3 = reference_kl(logp, ref, "k3")
    assert k3.tolist() == pytest.approx([0.1931472, 0.0945349], abs=1e-6)
    # Policy p = (1/2, 1/2) over these two tokens, reference q = (1/4, 3/4): KL(p||q) =
    # 1/2 ln 2 + 1/2 ln(2/3) = 0.1438410, and both estimators average to it under p (unbiased).
    assert reference_kl(logp, ref, "k1").mean().item() == pytest.approx(0.1438410, abs=1e-6)
    assert k3.mean().item() == pytest.approx(0.1438410, abs=1e-6)
    # equal policies: zero
    assert reference_kl(logp, logp, "k1").tolist() == [0.0, 0.0]
    assert reference_kl(logp, logp, "k3").tolist() == [0.0, 0.0]
    # d k3 / d logp = 1 - e^(ref - logp) = [1 - 0.5, 1 - 1.5]
    lp = logp.clone().requires_grad_(True)
    reference_kl(lp, ref, "k3").sum().backward()
    assert lp.grad.tolist() == pytest.approx([0.5, -0.5], abs=1e-6)
    with pytest.raises(ValueError):
        reference_kl(logp, ref, "k2")


def test_masked_nll_by_hand():
    logp = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    w = torch.tensor([0.5, 0.0, 2.0])
    # -(0.5 * -1 + 0 * -2 + 2 * -3) / 4 = 6.5 / 4 = 1.625
    loss = masked_nll(logp, w, 4.0)
    assert loss.item() == pytest.approx(1.625)
    loss.backward()
    assert logp.grad.tolist() == [-0.125, 0.0, -0.5]  # -w / N: raise the targets' log-probs


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


def test_masking_counts_only_completion_tokens():
    inf = torch.zeros(4)
    logp = torch.tensor([math.log(10.0), math.log(0.1), math.log(2.0), math.log(20.0)]).requires_grad_(True)
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the 4th (ratio 20) is padding: neither counted nor kept
    loss, stats = policy_loss(logp, inf, torch.ones(4), mask, 0.125, 8.0, normalizer=3.0)
    # kept: token 3 only, -(2 * 1) / 3
    assert loss.item() == pytest.approx(-2 / 3, rel=1e-6)
    assert (stats["masked_low"], stats["masked_high"], stats["tokens"]) == (1.0, 1.0, 3.0)
    loss.backward()
    # d/dlogp of -(r * A)/N = -r * A / N on the kept token: -2/3; masked tokens get no gradient
    assert logp.grad.tolist() == pytest.approx([0.0, 0.0, -2 / 3, 0.0])


def test_train_sample_carries_supervised_fields():
    plain = TrainSample(input_ids=[1, 2, 3], prompt_len=2, inference_logprobs=[-1.0], advantages=[0.5])
    assert plain.sft_weight == 0.0 and plain.policy is True  # old senders stay valid
    corrective = TrainSample(input_ids=[1, 2, 9, 8], prompt_len=2, inference_logprobs=[], advantages=[],
                             sft_weight=0.3, policy=False)
    batch = TrainBatch(step=1, samples=[plain, corrective], total_tokens=1)
    assert decode(encode(batch), TrainBatch) == batch


# ----------------------------------------------------------------------------------------------
# Config


LOSS_CONFIG_ERRORS = [
    (["--orchestrator.skip_verification", "--trainer.loss.adv_tau", "0.5"],
     "trainer.loss.adv_tau: must be 0 when orchestrator.skip_verification is true"),
    (["--orchestrator.skip_verification", "true", "--trainer.loss.lockin_coef", "0.1"],
     "trainer.loss.lockin_coef: must be 0 when orchestrator.skip_verification is true"),
    (["--orchestrator.skip_verification", "--trainer.loss.corrective_coef", "1"],
     "trainer.loss.corrective_coef: must be 0 when orchestrator.skip_verification is true"),
    (["--trainer.loss.kl_level", "sequence", "--trainer.loss.kl_discount", "0.5"],
     'trainer.loss.kl_discount: only applies to trainer.loss.kl_level = "token"'),
    (["--trainer.loss.kl_discount", "1.5"], "trainer.loss.kl_discount: expected float <= 1.0, got 1.5"),
    (["--trainer.loss.kl_level", "seq"], 'trainer.loss.kl_level: expected one of "token", "sequence", got "seq"'),
    (["--trainer.loss.ref_kl_estimator", "k2"], 'trainer.loss.ref_kl_estimator: expected one of "k1", "k3", got "k2"'),
    (["--trainer.loss.teacher_tau", "-1"], "trainer.loss.teacher_tau: expected float >= 0.0, got -1"),
    (["--trainer.loss.student_tau", "-0.5"], "trainer.loss.student_tau: expected float >= 0.0, got -0.5"),
    (["--trainer.loss.adv_tau", "-1"], "trainer.loss.adv_tau: expected float >= 0.0, got -1"),
    (["--trainer.loss.ref_kl_coef", "-1"], "trainer.loss.ref_kl_coef: expected float >= 0.0, got -1"),
    (["--trainer.loss.entropy_coef", "-0.1"], "trainer.loss.entropy_coef: expected float >= 0.0, got -0.1"),
    (["--trainer.loss.reward_std_scale", "maybe"], 'trainer.loss.reward_std_scale: expected bool, got "maybe"'),
]


@pytest.mark.parametrize(("argv", "message"), LOSS_CONFIG_ERRORS, ids=[c[1].split(":")[0] + "-" + c[0][-1]
                                                                          for c in LOSS_CONFIG_ERRORS])
def test_loss_config_errors(argv, message):
    with pytest.raises(ConfigError) as e:
        load(argv)
    assert str(e.value) == message


def test_loss_config_error_exits_2(capsys):
    from orchestrator.cli import main

    assert main(["--orchestrator.skip_verification", "--trainer.loss.adv_tau", "1"]) == 2
    assert capsys.readouterr().err == (
        "error: trainer.loss.adv_tau: must be 0 when orchestrator.skip_verification is true\n"
    )


def test_loss_config_defaults_and_tau_resolution():
    lc = load([]).trainer.loss
    # the defaults are the skeleton's pure reverse-KL advantage, per token, no discount, no optional term
    assert (lc.adv_tau, lc.teacher_tau, lc.student_tau, lc.kl_coef) == (0.0, 1.0, 1.0, 1.0)
    assert (lc.kl_level, lc.kl_discount, lc.reward_std_scale) == ("token", 0.0, False)
    assert (lc.ref_kl_coef, lc.ref_kl_estimator, lc.lockin_coef, lc.corrective_coef, lc.entropy_coef) == (
        0.0, "k3", 0.0, 0.0, 0.0)
    lc = load(["--trainer.loss.kl_coef", "0.5"]).trainer.loss
    assert (lc.teacher_tau, lc.student_tau) == (0.5, 0.5)  # unset taus follow kl_coef
    lc = load(["--trainer.loss.kl_coef", "0.5", "--trainer.loss.teacher_tau", "2"]).trainer.loss
    assert (lc.teacher_tau, lc.student_tau) == (2.0, 0.5)
    assert LossConfig(student_tau=0.0).student_tau == 0.0  # 0 is a value, not "unset"
    cfg = load(["--orchestrator.skip_verification", "--trainer.loss.kl_level", "sequence",
                "--trainer.loss.ref_kl_coef", "0.1", "--trainer.loss.ref_kl_estimator", "k1"])
    assert cfg.orchestrator.skip_verification and cfg.trainer.loss.kl_level == "sequence"
    import tomli

    assert from_dict(tomli.loads(to_toml(cfg))) == cfg  # the resolved taus survive config.toml


# ----------------------------------------------------------------------------------------------
# The trainer's loss terms, in-process (one gloo rank, the tiny student, no Ray)


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_trainer_loss_terms(tiny_pair, tmp_path):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shared.wire import StepResult
    from trainer.worker import TrainerRank

    _, student = tiny_pair
    tok = AutoTokenizer.from_pretrained(str(student))
    spec = dict(seed=0, dtype="float32", lr=0.005, weight_decay=0.0, max_grad_norm=1.0, lora_rank=8, lora_alpha=16.0,
                lora_dropout=0.0, lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"], mask_ratio_low=0.125,
                mask_ratio_high=8.0, ref_kl_coef=0.1, ref_kl_estimator="k3", entropy_coef=0.01)
    p1, c1 = tok("abcdef=").input_ids, tok("fedcba").input_ids[1:] + [tok.eos_token_id]
    p2, c2 = tok("xyz=").input_ids, tok("zyx").input_ids[1:] + [tok.eos_token_id]
    samples = [  # a rewarded rollout (lock-in weight 1, zero advantage) and a teacher answer (corrective 1)
        TrainSample(input_ids=p1 + c1, prompt_len=len(p1), inference_logprobs=[-1.0] * len(c1),
                    advantages=[0.0] * len(c1), sft_weight=1.0),
        TrainSample(input_ids=p2 + c2, prompt_len=len(p2), inference_logprobs=[], advantages=[], sft_weight=1.0,
                    policy=False),
    ]
    n = len(c1)  # the normaliser: policy tokens only

    # Independent reference at the start (LoRA B = 0: the adapter is the identity).
    base = AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32)
    with torch.no_grad():
        def logsoftmax(p, c):
            return torch.log_softmax(base(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1], -1)

        lsm1, lsm2 = logsoftmax(p1, c1), logsoftmax(p2, c2)
    nll1 = -float(lsm1.gather(-1, torch.tensor(c1)[:, None]).sum())
    nll2 = -float(lsm2.gather(-1, torch.tensor(c2)[:, None]).sum())
    ent1 = -float((lsm1.exp() * lsm1).sum())

    rank = TrainerRank(0, 1, "gloo", f"tcp://127.0.0.1:{_port()}", str(student), spec, str(tmp_path), None)
    try:
        rank.setup()
        steps = []
        for step in range(1, 6):
            data = rank.train_step(encode(TrainBatch(step=step, samples=samples, total_tokens=n)))
            steps.append(decode(data, StepResult).metrics)
    finally:
        dist.destroy_process_group()

    first = steps[0]
    assert first["ref_kl_sum"] == pytest.approx(0.0, abs=1e-6)  # unchanged adapter: policy == reference
    assert first["loss/ref_kl"] == pytest.approx(0.0, abs=1e-7)
    assert first["loss/lockin"] == pytest.approx(nll1 / n, rel=1e-4)  # weight 1 * NLL / policy tokens
    assert first["loss/corrective"] == pytest.approx(nll2 / n, rel=1e-4)
    assert first["entropy_sum"] == pytest.approx(ent1, rel=1e-4)
    assert first["loss/entropy"] == pytest.approx(-0.01 * ent1 / n, rel=1e-4)
    assert first["loss/policy"] == 0.0 and first["tokens"] == n  # zero advantages; the teacher answer is no policy
    assert steps[1]["ref_kl_sum"] > 1e-4  # the adapter moved away from the reference
    # the supervised terms raise their targets' likelihood
    assert steps[-1]["loss/lockin"] < 0.8 * first["loss/lockin"]
    assert steps[-1]["loss/corrective"] < 0.8 * first["loss/corrective"]
    assert (tmp_path / "broadcast" / "step_5" / "COMPLETE").exists()


def _one_sample(tiny_pair):
    """A single-rank trainer spec (LoRA on q/v, AdamW with weight decay) and one reverse-text sample as token ids:
    ``(student, spec, prompt_ids, completion_ids)``."""
    from transformers import AutoTokenizer

    _, student = tiny_pair
    tok = AutoTokenizer.from_pretrained(str(student))
    spec = dict(seed=0, dtype="float32", lr=0.01, weight_decay=0.1, max_grad_norm=1.0, lora_rank=8, lora_alpha=16.0,
                lora_dropout=0.0, lora_targets=["q_proj", "v_proj"], mask_ratio_low=0.125, mask_ratio_high=8.0,
                ref_kl_coef=0.0, ref_kl_estimator="k3", entropy_coef=0.0)
    return student, spec, tok("abcd=").input_ids, tok("dcba").input_ids[1:] + [tok.eos_token_id]


def test_a_step_with_an_exactly_zero_gradient_is_not_applied(tiny_pair, tmp_path):
    """RL with no rewarded sample: every advantage is 0 and no other term is on, so the gradient is exactly
    zero; AdamW would still move the weights on the momentum of the step before (and weight decay), so the
    trainer does not step: the adapter it publishes is bit-identical to the previous one."""
    import torch.distributed as dist
    from safetensors.torch import load_file
    from shared.wire import StepResult
    from trainer.worker import TrainerRank

    student, spec, p, c = _one_sample(tiny_pair)

    def batch(step, adv):
        return encode(TrainBatch(step=step, total_tokens=len(c), samples=[TrainSample(
            input_ids=p + c, prompt_len=len(p), inference_logprobs=[-1.0] * len(c), advantages=[adv] * len(c))]))

    rank = TrainerRank(0, 1, "gloo", f"tcp://127.0.0.1:{_port()}", str(student), spec, str(tmp_path), None)
    try:
        rank.setup()
        moved = decode(rank.train_step(batch(1, 1.0)), StepResult).metrics
        still = decode(rank.train_step(batch(2, 0.0)), StepResult).metrics
        again = decode(rank.train_step(batch(3, 1.0)), StepResult).metrics
    finally:
        dist.destroy_process_group()
    assert moved["grad_norm"] > 0 and moved["zero_grad_step"] == 0.0
    assert still["grad_norm"] == 0.0 and still["zero_grad_step"] == 1.0 and still["skipped_step"] == 0.0
    assert again["zero_grad_step"] == 0.0
    w = {s: load_file(tmp_path / "broadcast" / f"step_{s}" / "adapter_model.safetensors") for s in (1, 2, 3)}
    assert all(torch.equal(w[1][k], w[2][k]) for k in w[1])  # step 2 applied nothing
    assert any(not torch.equal(w[2][k], w[3][k]) for k in w[2])  # and step 3 learns again


def test_a_non_finite_loss_on_a_real_rank_is_skipped_and_counted_then_stops_the_run(tiny_pair, tmp_path):
    """NaN advantages reach a real trainer rank through the wire (as a broken reward or teacher would send them):
    the loss and the all-reduced gradient norm are NaN, so the rank skips the step (``skipped_step`` = 1) and
    publishes the previous weights unchanged, AdamW's moments stay finite, and the next good step trains again.
    The loop's counter stops the run, in one line, after ``trainer.max_bad_steps`` such steps in a row."""
    import torch.distributed as dist
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from shared.metrics import BadSteps, TrainingStopped
    from shared.wire import StepResult
    from trainer.worker import TrainerRank

    student, spec, p, c = _one_sample(tiny_pair)

    def batch(step, adv):
        return encode(TrainBatch(step=step, total_tokens=len(c), samples=[TrainSample(
            input_ids=p + c, prompt_len=len(p), inference_logprobs=[-1.0] * len(c),
            advantages=[1.0] * (len(c) - 1) + [adv])]))  # one poisoned token is enough

    rank = TrainerRank(0, 1, "gloo", f"tcp://127.0.0.1:{_port()}", str(student), spec, str(tmp_path), None)
    try:
        rank.setup()
        steps = [decode(rank.train_step(batch(s, adv)), StepResult).metrics
                 for s, adv in enumerate([1.0, float("nan"), float("nan"), 1.0], start=1)]
        moments = [v for st in rank.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    finally:
        dist.destroy_process_group()
    assert [m["skipped_step"] for m in steps] == [0.0, 1.0, 1.0, 0.0]
    assert math.isnan(steps[1]["grad_norm"]) and math.isnan(steps[1]["loss/policy"])
    assert math.isfinite(steps[3]["grad_norm"]) and steps[3]["grad_norm"] > 0
    assert all(bool(torch.isfinite(m.full_tensor() if hasattr(m, "full_tensor") else m).all()) for m in moments)
    w = {s: load_file(tmp_path / "broadcast" / f"step_{s}" / "adapter_model.safetensors") for s in (1, 2, 3, 4)}
    assert all(torch.equal(w[1][k], w[3][k]) for k in w[1])  # steps 2 and 3 applied nothing
    assert any(not torch.equal(w[3][k], w[4][k]) for k in w[3]) and all(bool(torch.isfinite(v).all()) for v in w[4].values())

    rows = [{"step": s, "skipped_step": m["skipped_step"], "grad_norm": m["grad_norm"], "loss/policy": m["loss/policy"]}
            for s, m in enumerate(steps, start=1)]
    patient = BadSteps(3)
    for row in rows:  # two in a row are fewer than 3: the run goes on, and step 4 resets the count
        patient.update(row)
    assert (patient.in_a_row, patient.last_good) == (0, 4)
    strict = BadSteps(2)
    strict.update(rows[0])
    strict.update(rows[1])
    with pytest.raises(TrainingStopped) as stopped:
        strict.update(rows[2])
    assert str(stopped.value) == (
        "steps 2-3: 2 training steps in a row were skipped (non-finite loss or gradient norm, or no usable samples; "
        "trainer.max_bad_steps = 2); broadcast/step_1 is the last good adapter (later steps left it unchanged)")
