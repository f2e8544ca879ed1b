"""Packed micro-batches (trainer/packing.py): the plan by hand, the packed row's layout by hand, attention
that stays inside each sequence, the lm-head on completion positions only, and a trainer whose loss and
LoRA gradients are the same packed or padded."""

import socket

import pytest
import torch

from shared.wire import TrainBatch, TrainSample, encode
from trainer.packing import micro_batch_count, pack, padded, plan_micro_batches, use_segment_attention


def test_plan_first_fit_decreasing_by_hand():
    # longest first: 9 (i1) opens bin 0 (room 1); 7 (i3) opens bin 1 (room 3); 5 (i0) fits neither, opens
    # bin 2 (room 5); 3 (i2) fits bin 1 (room 0); 2 (i4) fits bin 2 (room 3).
    assert plan_micro_batches([5, 9, 3, 7, 2], 10) == [[1], [2, 3], [0, 4]]
    assert plan_micro_batches([12, 3], 10) == [[0], [1]]  # longer than the budget: a micro-batch of its own
    assert plan_micro_batches([4, 4, 4], 12) == [[0, 1, 2]]
    assert plan_micro_batches([], 10) == []
    with pytest.raises(ValueError):
        plan_micro_batches([1], 0)


def test_micro_batch_count_is_the_largest_share():
    shares = [[5, 9, 3, 7, 2], [4, 4]]
    assert micro_batch_count(shares, 2, 10) == 3  # the plan above; the second share packs into 1
    assert micro_batch_count(shares, 2, 0) == 3  # by count: ceil(5 / 2)
    assert micro_batch_count(shares, 8, 0) == 1


def _sample(ids, p, policy=True, w=0.0):
    c = len(ids) - p
    if not policy:
        return TrainSample(input_ids=ids, prompt_len=p, inference_logprobs=[], advantages=[], sft_weight=w,
                           policy=False)
    return TrainSample(input_ids=ids, prompt_len=p, inference_logprobs=[-0.5 - k for k in range(c)],
                       advantages=[1.0 + k for k in range(c)], sft_weight=w)


def test_pack_layout_by_hand():
    a = _sample([10, 11, 12, 13, 14], 3, w=0.5)  # prompt 10 11 12, completion 13 14
    b = _sample([20, 21, 22, 23], 2, policy=False, w=2.0)  # prompt 20 21, completion 22 23 (teacher answer)
    mb = pack([a, b])
    kw = mb.model_kwargs
    assert kw["input_ids"].tolist() == [[10, 11, 12, 13, 14, 20, 21, 22, 23]]
    assert kw["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert kw["cu_seq_lens_q"].tolist() == [0, 5, 9] and kw["max_length_q"] == 5
    # a: positions 2, 3 predict 13, 14; b (offset 5): positions 5 + 1, 5 + 2 predict 22, 23
    assert kw["logits_to_keep"].tolist() == [2, 3, 6, 7]
    assert mb.targets.tolist() == [[13, 14, 22, 23]]
    assert mb.mask.tolist() == [[1, 1, 0, 0]]
    assert mb.inference_logprobs.tolist() == [[-0.5, -1.5, 0, 0]]
    assert mb.advantages.tolist() == [[1, 2, 0, 0]]
    assert mb.lockin.tolist() == [[0.5, 0.5, 0, 0]]
    assert mb.corrective.tolist() == [[0, 0, 2, 2]]
    # padded: rows of 5, first = min(prompt_len) - 1 = 1, logits at 1..3 predict tokens 2..4
    pd = padded([a, b], pad_id=0)
    assert pd.model_kwargs["input_ids"].tolist() == [[10, 11, 12, 13, 14], [20, 21, 22, 23, 0]]
    assert pd.model_kwargs["logits_to_keep"].tolist() == [1, 2, 3]
    assert pd.targets.tolist() == [[12, 13, 14], [22, 23, 0]]
    assert pd.mask.tolist() == [[0, 1, 1], [0, 0, 0]]
    assert pd.corrective.tolist() == [[0, 0, 0], [2, 2, 0]]  # b's tokens 22, 23 are predicted at 1, 2


def _gqa_model():
    """A random 2-layer Llama with grouped-query attention (4 heads, 2 key-value heads), as SmolLM2 has."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _samples(vocab, shape=((5, 9), (3, 4), (7, 12), (2, 3))):
    g = torch.Generator().manual_seed(1)
    return [_sample(torch.randint(3, vocab, (p + c,), generator=g).tolist(), p) for p, c in shape]


def _alone(model, samples):
    """Each sequence run by itself: the log-probs of its completion tokens, concatenated."""
    out = []
    for s in samples:
        logits = model(input_ids=torch.tensor([s.input_ids])).logits[0, s.prompt_len - 1 : -1]
        out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(s.input_ids[s.prompt_len :])[:, None])[:, 0])
    return torch.cat(out)


def _row_logprobs(model, mb):
    logits = model(**mb.model_kwargs).logits
    return torch.log_softmax(logits, -1).gather(-1, mb.targets[..., None])[..., 0]


def test_packed_row_equals_each_sequence_alone():
    """Per-token log-probs of a packed row equal those of each sequence run alone (float32, |diff| < 1e-5);
    without the segment bounds the sequences see each other (the check can fail)."""
    model = _gqa_model()
    samples = _samples(64)
    mb = pack(samples)
    with torch.no_grad():
        alone = _alone(model, samples)
        use_segment_attention(model)
        packed = _row_logprobs(model, mb)[0]
        crossed = {k: v for k, v in mb.model_kwargs.items() if k not in ("cu_seq_lens_q", "position_ids")}
        crossed = _row_logprobs(model, mb._replace(model_kwargs=crossed))[0]
        # transformers' own packed-sequence detection from position_ids (no cu_seq_lens): also isolated
        detected = {k: v for k, v in mb.model_kwargs.items() if k != "cu_seq_lens_q"}
        detected = _row_logprobs(model, mb._replace(model_kwargs=detected))[0]
    assert packed.shape == alone.shape == (9 + 4 + 12 + 3,)
    assert (packed - alone).abs().max() < 1e-5
    assert (detected - alone).abs().max() < 1e-5
    assert (crossed - alone)[9:].abs().max() > 1e-2  # the later sequences attend to the earlier ones


def test_lm_head_on_completion_positions_equals_the_full_computation():
    """``logits_to_keep`` as positions (gather, then the head) gives the full logits at those positions."""
    model = _gqa_model()
    use_segment_attention(model)
    samples = _samples(64)
    with torch.no_grad():
        for mb in (pack(samples), padded(samples, pad_id=0)):
            kw = dict(mb.model_kwargs)
            keep = kw.pop("logits_to_keep")
            full = model(**kw).logits[:, keep]
            part = model(**mb.model_kwargs).logits
            assert part.shape == full.shape and part.shape[1] == len(keep)
            assert (part - full).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------
# The trainer: the same loss and LoRA gradients packed or padded (one gloo rank, real FSDP2, tiny student)


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            g = p.grad
            out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def test_trainer_loss_and_gradients_packed_equal_padded(tiny_pair, tmp_path):
    """Every loss term (policy with non-zero advantages, reference KL, entropy, lock-in, corrective, top-k, at a
    sampling temperature of 0.8) and every
    LoRA gradient agree padded (2 micro-batches of 3 sequences) and packed (a 30-token budget: 3 micro-batches,
    grouped differently): |diff| <= 1e-5 * max(1, |value|) in float32."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from trainer.worker import TrainerRank

    _, student = tiny_pair
    tok = AutoTokenizer.from_pretrained(str(student))
    spec = dict(seed=0, dtype="float32", lr=0.01, weight_decay=0.0, max_grad_norm=1.0, lora_rank=8, lora_alpha=16.0,
                lora_dropout=0.0, lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"], mask_ratio_low=0.125,
                mask_ratio_high=8.0, ref_kl_coef=0.1, ref_kl_estimator="k3", entropy_coef=0.01,
                temperature=0.8, topk_coef=1.0, topk_reverse_weight=0.5)  # tempered policy, top-k term
    samples = []
    for i, text in enumerate(["abcdef", "xyz", "hello", "qrstuvwx", "mn", "pqrs"]):
        p, c = tok(f"{text}=").input_ids, tok(text[::-1]).input_ids[1:] + [tok.eos_token_id]
        if i == 4:  # a teacher answer
            samples.append(TrainSample(input_ids=p + c, prompt_len=len(p), inference_logprobs=[], advantages=[],
                                       sft_weight=1.0, policy=False))
        else:
            top = [] if i == 5 else [[(3 * k + j + i) % 20 for j in range(3)] for k in range(len(c))]  # 5: unscored
            samples.append(TrainSample(input_ids=p + c, prompt_len=len(p), inference_logprobs=[-2.0] * len(c),
                                       advantages=[(-1.0) ** i * (1 + 0.1 * k) for k in range(len(c))],
                                       sft_weight=0.5 if i == 0 else 0.0, topk_ids=top,
                                       topk_logprobs=[[-0.5, -1.5, -2.5]] * len(top)))
    n = sum(len(s.input_ids) - s.prompt_len for s in samples if s.policy)
    lengths = [len(s.input_ids) for s in samples]
    plan = plan_micro_batches(lengths, 30)
    assert plan == [[3, 5], [0, 2], [1, 4]]  # lengths [15, 9, 13, 19, 7, 11]: not the round-robin deal

    rank = TrainerRank(0, 1, "gloo", f"tcp://127.0.0.1:{_port()}", str(student), spec, str(tmp_path), None)
    try:
        rank.setup()
        # one step first, so that LoRA B != 0 and lora_A's gradients are not all zero
        rank.train_step(encode(TrainBatch(step=1, samples=samples, total_tokens=n)))
        out = {}
        for name, batch in {
            "padded": TrainBatch(step=2, samples=samples, total_tokens=n, num_micro_batches=2),
            "packed": TrainBatch(step=2, samples=samples, total_tokens=n, num_micro_batches=3, micro_batch_tokens=30),
            "packed+1": TrainBatch(step=2, samples=samples, total_tokens=n, num_micro_batches=4, micro_batch_tokens=30),
        }.items():
            rank.optimizer.zero_grad(set_to_none=True)
            totals = rank.accumulate(batch)
            out[name] = (totals, _grads(rank.model))
        with pytest.raises(ValueError, match="3 packed micro-batches of 30 tokens"):
            rank.accumulate(TrainBatch(step=2, samples=samples, total_tokens=n, num_micro_batches=2,
                                       micro_batch_tokens=30))
    finally:
        dist.destroy_process_group()

    (t_pad, g_pad) = out["padded"]
    assert t_pad["tokens"] == n and t_pad["ref_kl_sum"] > 0 and t_pad["loss/corrective"] > 0
    assert t_pad["loss/lockin"] > 0 and t_pad["entropy_sum"] > 0 and t_pad["loss/policy"] != 0
    assert t_pad["topk_kl_sum"] > 0 and t_pad["loss/topk"] > 0
    assert any("lora_A" in k for k in g_pad) and all(g.abs().max() > 0 for g in g_pad.values())
    for name in ("packed", "packed+1"):  # packed+1: one zero-weight pass added, as a rank with fewer would run
        t, g = out[name]
        for k, v in t_pad.items():
            assert t[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (name, k)
        assert g.keys() == g_pad.keys()
        for k in g:
            assert torch.allclose(g[k], g_pad[k], rtol=1e-5, atol=1e-6), (name, k, (g[k] - g_pad[k]).abs().max())


def test_micro_batch_tokens_key():
    from shared.config import ConfigError, load

    assert load([]).trainer.micro_batch_tokens == 0
    assert load(["--trainer.micro_batch_tokens", "2048"]).trainer.micro_batch_tokens == 2048
    with pytest.raises(ConfigError, match="trainer.micro_batch_tokens"):
        load(["--trainer.micro_batch_tokens", "-1"])
