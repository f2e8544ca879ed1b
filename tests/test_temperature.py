"""The sampling temperature in the estimators (shared/sampling.py), against an exact KL over a 5-token vocabulary.

A run at temperature T samples from ``pi_T = softmax(z / T)``.  The engines then return ``log pi_T(y)`` and the
trainer computes ``log pi_T`` from ``logits / T``; the teacher ``q`` stays at temperature 1.  Enumerating the
vocabulary gives the exact ``KL(pi_T || q)`` and its gradient, which the sampled-token estimator (the
``teacher_kl`` metric and the policy-gradient loss of the reverse-KL advantage) and the top-k estimator must
reproduce; the untempered log-probs that vLLM returns by default do not.
"""

import math

import pytest
import torch

from shared.advantages import reverse_kl_advantages
from shared.config import load
from shared.sampling import policy_temperature, sampler_logprobs_mode
from trainer.loss import policy_loss, token_logprobs
from trainer.topk import support_logprobs, topk_kl

T = 0.7
Z = torch.tensor([2.0, 1.0, 0.5, -0.5, -1.5], dtype=torch.float64)  # the student's logits at one position
Q = torch.tensor([0.1, 0.2, 0.4, 0.2, 0.1], dtype=torch.float64)  # the teacher's distribution there


def exact_kl(z: torch.Tensor, temperature: float) -> torch.Tensor:
    p = torch.softmax(z / temperature, -1)
    return (p * (torch.log(p) - torch.log(Q))).sum()


def test_the_exact_tempered_kl_by_hand():
    p = [math.exp(v / T) for v in Z.tolist()]
    p = [v / sum(p) for v in p]
    by_hand = sum(pi * math.log(pi / qi) for pi, qi in zip(p, Q.tolist()))
    assert float(exact_kl(Z, T)) == pytest.approx(by_hand, rel=1e-12)
    assert by_hand == pytest.approx(1.19881, abs=1e-5)  # KL(pi_1 || q) = 0.81030


def test_teacher_kl_on_tempered_log_probs_estimates_the_tempered_kl_and_raw_ones_do_not():
    """``teacher_kl`` is the mean of ``logp_S(y) - logp_T(y)`` over sampled tokens (the reverse-KL advantage,
    negated).  Its expectation over ``y ~ pi_T``, enumerated exactly, is ``KL(pi_T || q)`` with the tempered
    log-probs the engines now return; with raw log-probs (vLLM's default) it is 0.045 nats low here.  A Monte
    Carlo draw of 40 000 tokens agrees within 4 standard errors."""
    pt = torch.softmax(Z / T, -1)
    tempered, raw = torch.log_softmax(Z / T, -1), torch.log_softmax(Z, -1)
    per_token = -reverse_kl_advantages(tempered, torch.log(Q), 1.0)  # (V,) logp_S - logp_T for every y
    assert float((pt * per_token).sum()) == pytest.approx(float(exact_kl(Z, T)), abs=1e-12)
    biased = float((pt * (raw - torch.log(Q))).sum())
    assert biased - float(exact_kl(Z, T)) == pytest.approx(-0.04506, abs=1e-5)

    g = torch.Generator().manual_seed(0)
    ys = torch.multinomial(pt, 40_000, replacement=True, generator=g)
    draws = per_token[ys]
    se = float(draws.std()) / math.sqrt(len(draws))
    assert abs(float(draws.mean()) - float(exact_kl(Z, T))) < 4 * se


def _expected_policy_gradient(temper_in_trainer: bool) -> torch.Tensor:
    """``E_{y ~ pi_T}`` of the gradient of the policy loss with the reverse-KL advantage with respect to the
    logits, summed exactly over the vocabulary (each token's gradient weighted by ``pi_T(y)``)."""
    z = Z.clone().requires_grad_()
    pt = torch.softmax(Z / T, -1)
    adv = reverse_kl_advantages(torch.log_softmax(Z / T, -1), torch.log(Q), 1.0)  # from the engine's log pi_T
    total = torch.zeros(5, dtype=torch.float64)
    for y in range(5):
        logits = (z / T if temper_in_trainer else z).view(1, 1, 5)
        lp = token_logprobs(logits, torch.tensor([[y]]))  # (1, 1)
        loss, _ = policy_loss(lp, lp.detach(), adv[y].view(1, 1), torch.ones(1, 1), 0.125, 8.0, 1.0)
        total += pt[y] * torch.autograd.grad(loss, z)[0]
    return total


def test_the_policy_gradient_with_tempered_logits_is_the_gradient_of_the_tempered_kl():
    """With the trainer's ``logits / T`` the expected policy gradient equals ``d KL(pi_T || q) / dz`` exactly;
    with untempered logits (the trainer before) it is another vector (0.89 of the norm here, up to 0.08 off per
    logit): the pull towards the teacher is mis-scaled, and biased by ``E[A] (p_1 - p_T)``."""
    z = Z.clone().requires_grad_()
    want = torch.autograd.grad(exact_kl(z, T), z)[0]
    got = _expected_policy_gradient(True)
    assert torch.allclose(got, want, atol=1e-12)
    before = _expected_policy_gradient(False)
    assert float(before.norm() / want.norm()) == pytest.approx(0.8918, abs=1e-4)
    assert float((before - want).abs().max()) == pytest.approx(0.0806, abs=1e-4)


def test_the_topk_estimator_at_t_is_the_exact_tempered_kl_on_full_support_and_a_lower_bound_below():
    ids = torch.argsort(Q, descending=True)
    for k in range(1, 6):
        z = Z.clone().requires_grad_()  # a fresh leaf each k
        lp, tail = support_logprobs((z / T).view(1, 1, 5), ids[:k].view(1, 1, k))
        kl = topk_kl(lp, tail, torch.log(Q)[ids[:k]].view(1, 1, k), 1.0, -20.0)
        if k >= 4:  # a tail of one token is that token: the buckets are the vocabulary
            assert float(kl) == pytest.approx(float(exact_kl(Z, T)), abs=1e-9)
            zz = Z.clone().requires_grad_()
            assert torch.allclose(torch.autograd.grad(kl.sum(), z)[0],
                                  torch.autograd.grad(exact_kl(zz, T), zz)[0], atol=1e-9)
        else:
            assert float(kl) < float(exact_kl(Z, T)) - 1e-3


@pytest.mark.parametrize("argv, temperature, mode", [
    ([], 1.0, "raw_logprobs"),
    (["--inference.temperature", "0.8"], 0.8, "processed_logprobs"),
    (["--inference.temperature", "0"], 1.0, "raw_logprobs"),  # greedy: vLLM's log-probs are untempered
    (["--inference.temperature", "1.3"], 1.3, "processed_logprobs"),
    (["--inference.temperature", "0.8", "--orchestrator.env_args.answers", "yes,no",
      "--orchestrator.env_args.answer_choice", "loglik", "--inference.lora_mode", "merge"], 1.0, "raw_logprobs"),  # answers drawn by log-likelihood
])
def test_policy_temperature_and_the_engines_logprobs_mode(argv, temperature, mode):
    cfg = load(["--inference.max_tokens", "8", *argv])
    assert policy_temperature(cfg) == temperature and sampler_logprobs_mode(cfg) == mode


def test_a_sessions_run_may_not_cross_between_raw_and_tempered_log_probs():
    """The student engines' logprobs_mode is fixed when a session starts them (orchestrator/api.py)."""
    from orchestrator.api import session_run_config
    from shared.config import ConfigError

    at_08 = session_run_config({"inference": {"temperature": 0.8}}, overrides={"inference.temperature": 0.7})
    assert policy_temperature(at_08) == 0.7
    with pytest.raises(ConfigError, match=r"^inference\.temperature: 0\.8 needs the student engines' logprobs_mode = "
                                          r"processed_logprobs, and the session's were started with raw_logprobs"):
        session_run_config({"inference": {"temperature": 1.0}}, overrides={"inference.temperature": 0.8})
