"""The sampling temperature in the estimators: which distribution a run's rollouts come from, and so which
log-probs the engines return and the trainer computes.

The student engines sample completion tokens from ``pi_T = softmax(z / T)`` (``T = inference.temperature``).
vLLM returns ``log softmax(z)`` of the sampled token by default (``logprobs_mode = "raw_logprobs"``), the
untempered student, while the token was drawn from ``pi_T``: the importance ratio, the reverse-KL advantage
and ``teacher_kl`` would then treat samples of ``pi_T`` as samples of ``pi_1``.  A run at ``T`` instead
optimises the policy it samples from:

- the engines return ``log pi_T(y)`` (``logprobs_mode = "processed_logprobs"``: the log-softmax of the logits
  after the temperature, vLLM 0.32 ``vllm/v1/sample/sampler.py``);
- the trainer computes every student log-prob from ``logits / T`` (:func:`policy_temperature`), so the ratio
  compares ``pi_T`` with ``pi_T``;
- the teacher stays at temperature 1 (its ``prompt_logprobs`` are raw in every ``logprobs_mode``): the
  reverse-KL advantage ``log q(y) - log pi_T(y)`` and ``teacher_kl`` then estimate ``KL(pi_T || q)``, and the
  student learns to reproduce the teacher when sampled at ``T``.

At ``T = 1`` (and ``T = 0``: greedy, where vLLM returns untempered log-probs) nothing changes: raw log-probs
and untempered logits, as before.  With ``answer_choice = "loglik"`` the engine draws whole answers from
their summed log-likelihoods (``inference/answer_choice.py``), not tokens from ``pi_T``: per-token log-probs
stay untempered there.  docs/workflows.md ("The sampling temperature") says what changes for a run at T != 1.
"""

from __future__ import annotations

from typing import Any


def policy_temperature(cfg: Any) -> float:
    """The ``T`` of the student's policy ``softmax(z / T)`` that the trainer and the engines' log-probs use:
    ``inference.temperature``, or 1 when rollouts are greedy (``T = 0``) or drawn by answer log-likelihood."""
    t = float(cfg.inference.temperature)
    if t <= 0 or cfg.orchestrator.env_args.answer_choice == "loglik":
        return 1.0
    return t


def sampler_logprobs_mode(cfg: Any) -> str:
    """The student engines' ``logprobs_mode``: tempered log-probs when the policy's ``T`` is not 1."""
    return "raw_logprobs" if policy_temperature(cfg) == 1.0 else "processed_logprobs"
