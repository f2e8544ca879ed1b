"""The top-k teacher estimator (trainer/topk.py) against hand-worked numbers on a 4-token vocabulary.

Student ``p = (0.4, 0.3, 0.2, 0.1)``; the teacher's top-2 are token 1 (q = 0.5) and token 0 (q = 0.25), so
its tail holds 0.25 and the student's tail (tokens 2, 3) 0.3.  Buckets {1}, {0}, tail:

    reverse = 0.3 ln(0.3/0.5) + 0.4 ln(0.4/0.25) + 0.3 ln(0.3/0.25)
            = -0.1532477 + 0.1880014 + 0.0546965 = 0.0894502
    forward = 0.5 ln(0.5/0.3) + 0.25 ln(0.25/0.4) + 0.25 ln(0.25/0.3)
            = 0.2554128 - 0.1175009 - 0.0455804 = 0.0923315

Gradients with respect to the student's logits (bucket b(v) of token v, r_b = ln(P_b / Q_b)):
reverse ``p_v (r_b(v) - KL)`` = (0.1522205, -0.1800828, 0.0185743, 0.0092871);
forward ``p_v (1 - Q_b(v) / P_b(v))`` = (0.15, -0.2, 0.0333333, 0.0166667).
"""

import math

import pytest
import torch

from trainer import loss as loss_mod
from trainer.topk import support_logprobs, teacher_tail, topk_kl

P = [0.4, 0.3, 0.2, 0.1]
IDS = [1, 0]
Q = [0.5, 0.25]
FLOOR = -20.0


def _setup(dtype=torch.float64):
    z = torch.log(torch.tensor([[P]], dtype=dtype)).requires_grad_()  # (1, T=1, V=4)
    ids = torch.tensor([[IDS]])  # (1, 1, K=2)
    lq = torch.log(torch.tensor([[Q]], dtype=torch.float64))
    return z, ids, lq


def test_support_logprobs_are_the_log_softmax_at_the_ids_and_the_tail_mass():
    z, ids, _ = _setup()
    lp, tail = support_logprobs(z + 3.0, ids)  # a shift of the logits changes nothing
    assert torch.exp(lp).flatten().tolist() == pytest.approx([0.3, 0.4], abs=1e-12)
    assert float(torch.exp(tail.detach())) == pytest.approx(0.3, abs=1e-12)


def test_reverse_value_and_gradient_by_hand():
    z, ids, lq = _setup()
    lp, tail = support_logprobs(z, ids)
    kl = topk_kl(lp, tail, lq, 1.0, FLOOR)
    assert float(kl) == pytest.approx(0.0894502, abs=1e-7)
    kl.sum().backward()
    assert z.grad.flatten().tolist() == pytest.approx([0.1522205, -0.1800828, 0.0185743, 0.0092871], abs=1e-6)


def test_forward_value_and_gradient_by_hand():
    z, ids, lq = _setup()
    lp, tail = support_logprobs(z, ids)
    kl = topk_kl(lp, tail, lq, 0.0, FLOOR)
    assert float(kl) == pytest.approx(0.0923315, abs=1e-7)
    kl.sum().backward()
    assert z.grad.flatten().tolist() == pytest.approx([0.15, -0.2, 1 / 30, 1 / 60], abs=1e-7)


def test_mixture_is_the_weighted_sum():
    z, ids, lq = _setup()
    lp, tail = support_logprobs(z, ids)
    assert float(topk_kl(lp, tail, lq, 0.25, FLOOR)) == pytest.approx(0.25 * 0.0894502 + 0.75 * 0.0923315, abs=1e-7)


def test_backward_matches_autograd_through_an_explicit_log_softmax_in_blocks(monkeypatch):
    """The hand-written backward (a block of positions at a time) against autograd of the plain formula,
    on float64 logits with rows of several blocks (CHUNK = 3) and random weights on every output."""
    monkeypatch.setattr(loss_mod, "CHUNK", 3)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 7, 11, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(11, generator=g)[:4] for _ in range(14)]).view(2, 7, 4)
    w, w_tail = torch.randn(2, 7, 4, generator=g, dtype=torch.float64), torch.randn(2, 7, generator=g, dtype=torch.float64)

    a = z.clone().requires_grad_()
    lp, tail = support_logprobs(a, ids)
    ((lp * w).sum() + (tail * w_tail).sum()).backward()

    b = z.clone().requires_grad_()
    logp = torch.log_softmax(b, -1)
    lp2 = logp.gather(-1, ids)
    tail2 = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), -1)
    ((lp2 * w).sum() + (tail2 * w_tail).sum()).backward()
    assert torch.allclose(lp, lp2) and torch.allclose(tail, tail2)
    assert torch.allclose(a.grad, b.grad, atol=1e-12)


def test_full_support_is_the_exact_kl_without_nans():
    """k = V: the tail is empty on both sides (the teacher's clipped to exp(floor)); reverse is KL(p || q)
    exactly, forward KL(q || p), and every gradient is finite and equals the exact one."""
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    p, q = torch.softmax(zs, -1), torch.softmax(zt, -1)
    ids = torch.argsort(q, descending=True).view(1, 1, 5)
    lq = torch.log(q)[ids]
    for beta, exact in ((1.0, (p * (p.log() - q.log())).sum()), (0.0, (q * (q.log() - p.log())).sum())):
        z = zs.view(1, 1, 5).clone().requires_grad_()
        lp, tail = support_logprobs(z, ids)
        assert float(tail) == -math.inf
        kl = topk_kl(lp, tail, lq, beta, FLOOR)
        assert float(kl) == pytest.approx(float(exact), abs=1e-7)
        kl.sum().backward()
        ref = zs.clone().requires_grad_()
        pr = torch.softmax(ref, -1)
        (pr * (pr.log() - q.log())).sum().backward() if beta == 1.0 else (q * (q.log() - pr.log())).sum().backward()
        assert torch.isfinite(z.grad).all()
        assert torch.allclose(z.grad.flatten(), ref.grad, atol=1e-7)


def test_buckets_never_exceed_the_full_kl():
    """Collapsing onto buckets lowers a KL (data processing): for random pairs and every k."""
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        zs, zt = torch.randn(8, generator=g, dtype=torch.float64) * 2, torch.randn(8, generator=g, dtype=torch.float64) * 2
        p, q = torch.softmax(zs, -1), torch.softmax(zt, -1)
        full = float((p * (p.log() - q.log())).sum())
        for k in range(1, 9):
            ids = torch.argsort(q, descending=True)[:k].view(1, 1, k)
            lp, tail = support_logprobs(zs.view(1, 1, 8), ids)
            assert float(topk_kl(lp, tail, torch.log(q)[ids], 1.0, FLOOR)) <= full + 1e-12


def test_teacher_tail_is_clipped_and_bad_log_probs_too():
    lq, tail = teacher_tail(torch.tensor([[-0.1, float("nan"), -float("inf")]]), FLOOR)
    assert lq.tolist()[0] == pytest.approx([-0.1, FLOOR, FLOOR])
    assert float(tail) == pytest.approx(math.log(1 - math.exp(-0.1) - 2 * math.exp(FLOOR)), rel=1e-6)
    _, over = teacher_tail(torch.log(torch.tensor([[0.6, 0.400001]])), FLOOR)  # rounding above 1
    assert float(over) == FLOOR


def test_padded_positions_stay_finite_under_a_mask():
    """The trainer pads positions that are not completion tokens with ids 0 and the floor: finite values, and
    a zero mask leaves a zero gradient there."""
    z = torch.randn(1, 3, 6, dtype=torch.float64).requires_grad_()
    ids = torch.tensor([[[2, 5], [0, 0], [0, 0]]])
    lq = torch.tensor([[[-0.2, -2.0], [FLOOR, FLOOR], [FLOOR, FLOOR]]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    for beta in (1.0, 0.5, 0.0):
        z.grad = None
        lp, tail = support_logprobs(z, ids)
        kl = topk_kl(lp, tail, lq, beta, FLOOR)
        assert torch.isfinite(kl).all()
        (kl * mask).sum().backward()
        assert torch.isfinite(z.grad).all() and float(z.grad[0, 1:].abs().sum()) == 0.0


def test_bf16_logits_accumulate_in_float32():
    z, ids, lq = _setup(torch.bfloat16)
    lp, tail = support_logprobs(z, ids)
    assert lp.dtype == torch.float32 and float(topk_kl(lp, tail, lq.float(), 1.0, FLOOR)) == pytest.approx(0.0894502,
                                                                                                          abs=2e-2)


# ----------------------------------------------------------------------------------------------
# The term on a real trainer rank (one gloo rank, the tiny pair, no Ray), at a sampling temperature of 0.8


def test_a_trainer_rank_adds_the_topk_term_at_the_sampling_temperature(tiny_pair, tmp_path):
    """Step 1's ``topk_kl_sum`` and ``loss/topk`` equal the KL computed here by the plain formula from the
    student's ``log_softmax(logits / 0.8)`` (transformers, LoRA B = 0) and the teacher's top-3 (temperature 1);
    the ratio of the trainer's log-probs to the tempered ones an engine returns is 1; with zero advantages the
    top-k term alone trains, and it falls."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shared.wire import StepResult, TrainBatch, TrainSample, decode, encode
    from tests.test_loss import _port
    from trainer.worker import TrainerRank

    teacher_dir, student_dir = tiny_pair
    tok = AutoTokenizer.from_pretrained(str(student_dir))
    p, c = tok("abcdef=").input_ids, tok("fedcab").input_ids[1:] + [tok.eos_token_id]
    n, k, temp = len(c), 3, 0.8
    with torch.no_grad():
        def logits(path):
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
            return model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1: -1].double()  # (n, V)

        ls, lt = torch.log_softmax(logits(student_dir) / temp, -1), torch.log_softmax(logits(teacher_dir), -1)
    top = torch.topk(lt, k, -1)
    ps, qs = ls.exp().gather(-1, top.indices), lt.exp().gather(-1, top.indices)  # (n, k)
    p_tail, q_tail = 1 - ps.sum(-1), 1 - qs.sum(-1)
    want = float(((ps * (ps / qs).log()).sum(-1) + p_tail * (p_tail / q_tail).log()).sum())

    sample = TrainSample(input_ids=p + c, prompt_len=len(p), advantages=[0.0] * n,
                         inference_logprobs=ls.gather(-1, torch.tensor(c)[:, None]).squeeze(-1).tolist(),
                         topk_ids=top.indices.tolist(), topk_logprobs=top.values.tolist())
    spec = dict(seed=0, dtype="float32", lr=0.01, weight_decay=0.0, max_grad_norm=1.0, lora_rank=8, lora_alpha=16.0,
                lora_dropout=0.0, lora_targets=["q_proj", "v_proj"], mask_ratio_low=0.125, mask_ratio_high=8.0,
                ref_kl_coef=0.0, ref_kl_estimator="k3", entropy_coef=0.0, temperature=temp, topk_coef=0.5,
                topk_reverse_weight=1.0, logprob_floor=-20.0)
    rank = TrainerRank(0, 1, "gloo", f"tcp://127.0.0.1:{_port()}", str(student_dir), spec, str(tmp_path), None)
    try:
        rank.setup()
        steps = [decode(rank.train_step(encode(TrainBatch(step=s, samples=[sample], total_tokens=n))), StepResult).metrics
                 for s in range(1, 6)]
    finally:
        dist.destroy_process_group()
    first = steps[0]
    assert first["topk_kl_sum"] == pytest.approx(want, rel=1e-4)
    assert first["loss/topk"] == pytest.approx(0.5 * want / n, rel=1e-4)
    assert first["ratio_sum"] / first["tokens"] == pytest.approx(1.0, abs=1e-5)  # logits / T on both sides
    assert first["loss/policy"] == 0.0 and first["masked_low"] == first["masked_high"] == 0
    assert steps[-1]["topk_kl_sum"] < 0.9 * want


@pytest.mark.parametrize("argv, message", [
    (["--orchestrator.workflow", "sft", "--trainer.loss.teacher_topk", "4"],
     r'^trainer\.loss\.teacher_topk: must be 0 with orchestrator\.workflow = "sft"'),
    (["--trainer.loss.teacher_topk", "300"], r"^trainer\.loss\.teacher_topk: expected int <= 256, got 300$"),
    (["--trainer.loss.topk_reverse_weight", "1.5"], r"^trainer\.loss\.topk_reverse_weight: expected float <= 1"),
    (["--trainer.loss.topk_coef", "-1"], r"^trainer\.loss\.topk_coef: expected float >= 0"),
])
def test_topk_config_errors_name_the_key(argv, message):
    from shared.config import ConfigError, load

    with pytest.raises(ConfigError, match=message):
        load(argv)


def test_the_teacher_scores_for_the_topk_term_alone():
    """kl_coef = 0 leaves no sampled-token term; the top-k term still needs the teacher's log-probs."""
    from shared.config import kl_in_advantage, load, needs_teacher_logprobs, topk_in_loss

    cfg = load(["--trainer.loss.kl_coef", "0", "--trainer.loss.teacher_topk", "4"])
    assert not kl_in_advantage(cfg) and topk_in_loss(cfg) and needs_teacher_logprobs(cfg)
    assert not topk_in_loss(load(["--trainer.loss.teacher_topk", "4", "--trainer.loss.topk_coef", "0"]))
    assert not topk_in_loss(load([]))  # the default: the sampled-token estimator alone


def test_topk_tensors_line_up_with_the_trainers_per_token_arrays():
    """Position ``prompt_len - 1 - first + j`` predicts completion token ``j`` (trainer/worker.py); prompts,
    padding and non-policy samples hold id 0 and the floor."""
    from shared.wire import TrainSample
    from trainer.topk import topk_tensors

    a = TrainSample(input_ids=[1, 2, 3, 4, 5], prompt_len=3, inference_logprobs=[-1.0, -1.0], advantages=[0.0, 0.0],
                    topk_ids=[[7, 8], [9, 10]], topk_logprobs=[[-0.1, -0.2], [-0.3, -0.4]])
    b = TrainSample(input_ids=[1, 2, 6], prompt_len=2, inference_logprobs=[-1.0], advantages=[0.0],
                    topk_ids=[[11, 12]], topk_logprobs=[[-0.5, -0.6]])
    c = TrainSample(input_ids=[1, 2, 9], prompt_len=2, inference_logprobs=[], advantages=[], policy=False)
    ids, lps = topk_tensors([a, b, c], length=5, first=1, floor=-20.0)  # first = min prompt_len - 1
    assert ids.tolist() == [[[0, 0], [7, 8], [9, 10]], [[11, 12], [0, 0], [0, 0]], [[0, 0]] * 3]
    assert torch.allclose(lps[0], torch.tensor([[-20.0, -20.0], [-0.1, -0.2], [-0.3, -0.4]]))
    assert lps[1, 0].tolist() == pytest.approx([-0.5, -0.6]) and float(lps[2].max()) == -20.0
    assert topk_tensors([c], length=3, first=1, floor=-20.0) is None


def test_attach_topk_puts_the_teachers_top_k_on_the_scored_rollouts():
    from orchestrator.roles import scores_of
    from shared.wire import Rollout, ScoreResult, encode

    rollouts = [Rollout(prompt_index=i, prompt_ids=[1], completion_ids=[5, 6], logprobs=[-1.0, -1.0]) for i in range(3)]
    replies = [encode(ScoreResult(logprobs=[[-0.5, -0.6], []], failed=[1], topk_ids=[[[5, 4], [6, 4]], []],
                                  topk_logprobs=[[[-0.5, -1.5], [-0.6, -1.6]], []], seconds=0.25)),
               encode(ScoreResult(logprobs=[], seconds=0.5))]  # a second engine, given nothing to score
    parts = [[2, 0], []]  # rollout 2 scored, rollout 0 failed; rollout 1 not sent
    scores = scores_of(parts, replies, 3)
    assert scores.logprobs == [None, None, [-0.5, -0.6]]
    assert scores.seconds == 0.5  # the engines' own time: the slowest one's
    scores.attach_topk(rollouts)
    assert rollouts[2].teacher_topk_ids == [[5, 4], [6, 4]] and rollouts[2].teacher_topk_logprobs[1] == [-0.6, -1.6]
    assert rollouts[0].teacher_topk_ids == [] and rollouts[1].teacher_topk_ids == []
