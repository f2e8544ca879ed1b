"""The TRL half of ``benchmarks/vs_trl.py``; runs inside the TRL environment (``benchmarks/trl_env.py``).

    <trl-env>/bin/python benchmarks/trl_side.py SPEC.json OUT.json

SPEC (written by vs_trl.py from the project's own config and environment, so both sides see the same
prompts): ``student``/``teacher`` model folders, ``train_prompts`` (one list per step, each prompt already
repeated ``group_size`` times), ``eval`` ([prompt, answer] pairs), ``steps``, ``max_tokens``,
``temperature``, ``seed``, ``micro_batch_size``, ``lr``, ``lr_multipliers`` (one per optimizer step),
``max_grad_norm``, ``weight_decay``, ``lora`` (rank, alpha, dropout, target_modules) and ``threads``
(torch's intra-op threads).

``mode`` (default ``"distillation"``) picks the trainer. ``"sdft"`` is the context-distillation peer:
TRL's ``SDFTTrainer`` (self-distillation with privileged information) with the base model as the teacher
(``teacher_model_kind = "base"``: the student with its adapter switched off), the sampled-token reverse KL
(``distillation_mode = "sampled_token"``), and the teacher prompt ``"{privileged_context} {prompt}"``, our
``user_prefix`` layout. Its SPEC gives ``train_messages`` (one list of unique prompts, as chat messages, per
step), ``group_size``, ``privileged_context`` and ``eval_messages``; OUT then holds the held-out completions
(``eval_before`` / ``eval_after``, sampled at ``eval_temperature``) for vs_trl.py to grade with our environment.

TRL's ``DistillationTrainer`` with ``beta = 1`` (reverse KL over the full vocabulary, on completions the
student samples itself with ``transformers.generate``) trains a peft LoRA adapter of the same shape as ours.
OUT: per-step wall seconds (from one optimizer step's end to the next), completion tokens sampled per
step, held-out greedy exact-match accuracy before and after training, the set-up seconds and the losses.
Imports only the TRL environment's packages and the standard library.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DistillationConfig, DistillationTrainer


class OurSchedule:
    """Follows our learning-rate multipliers step by step (``lr_multipliers``, from ``trainer/schedule.py``)."""

    lr_multipliers: list[float] = []

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:
            mults = self.lr_multipliers
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, lambda i: mults[min(i, len(mults) - 1)])
        return self.lr_scheduler


class CountingTrainer(OurSchedule, DistillationTrainer):
    """Counts the completion tokens the student samples (EOS included, as vLLM's token ids include it)."""

    sampled_tokens = 0

    def _generate_single_turn(self, *args, **kwargs):
        ids = super()._generate_single_turn(*args, **kwargs)
        self.sampled_tokens += sum(len(c) for c in ids)
        return ids


def counting_sdft():
    """``SDFTTrainer`` (TRL's experimental package, imported only for ``mode = "sdft"``) with our schedule,
    counting the completion tokens its ``_generate`` samples."""
    from trl.experimental.sdft import SDFTTrainer

    class CountingSDFT(OurSchedule, SDFTTrainer):
        sampled_tokens = 0

        def _generate(self, prompt_ids):
            out = super()._generate(prompt_ids)
            self.sampled_tokens += sum(len(c) for c in out[1])
            return out

    return CountingSDFT


class StepClock(TrainerCallback):
    """Wall time and sampled tokens of each optimizer step (generation, teacher forward, backward, update)."""

    def __init__(self) -> None:
        self.trainer: CountingTrainer | None = None
        self.last = 0.0
        self.last_tokens = 0
        self.step_s: list[float] = []
        self.tokens: list[int] = []
        self.losses: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.last:
            self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.step_s.append(now - self.last)
        self.tokens.append(self.trainer.sampled_tokens - self.last_tokens)
        self.last, self.last_tokens = now, self.trainer.sampled_tokens

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


@torch.no_grad()
def accuracy(model, tok, pairs: list[list[str]], max_tokens: int) -> float:
    """Greedy exact match (``completion.strip() == answer``, the reverse_text grade), batched, left-padded."""
    model.eval()
    correct = 0
    for i in range(0, len(pairs), 64):
        chunk = pairs[i:i + 64]
        enc = tok([p for p, _ in chunk], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        correct += sum(t.strip() == a for t, (_, a) in zip(texts, chunk))
    return correct / len(pairs)


@torch.no_grad()
def sample_texts(model, tok, messages: list[list[dict]], max_tokens: int, temperature: float, seed: int) -> list[str]:
    """Completions of chat prompts (the tokenizer's template, generation prompt added), sampled at
    ``temperature`` (greedy at 0), batched and left-padded; graded by vs_trl.py with our environment."""
    model.eval()
    torch.manual_seed(seed)
    texts: list[str] = []
    for i in range(0, len(messages), 32):
        rendered = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages[i:i + 32]]
        enc = tok(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else {}
        out = model.generate(**enc, max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, **sampling, **({} if temperature else {"do_sample": False}))
        texts += tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return texts


def main_sdft(spec: dict, out_path: str, t0: float) -> int:
    """Context distillation with ``SDFTTrainer`` (module docstring); the student and teacher are one model."""
    from trl.experimental.sdft import SDFTConfig

    tok = AutoTokenizer.from_pretrained(spec["student"], padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    ev = dict(max_tokens=spec["max_tokens"], temperature=spec["eval_temperature"], seed=spec["seed"])
    before = sample_texts(student, tok, spec["eval_messages"], **ev)
    steps = spec["train_messages"]
    prompts = [m for step in steps for m in step]
    group = spec["group_size"]
    per_step = len(steps[0]) * group  # completions per optimizer step
    micro = min(spec["micro_batch_size"], per_step)
    if per_step % micro:
        print(f"error: {per_step} sequences per step is not a multiple of micro_batch_size {micro}", file=sys.stderr)
        return 2
    lora = spec["lora"]
    args = SDFTConfig(
        output_dir=str(Path(out_path).parent / "trl_out"), max_steps=spec["steps"],
        per_device_train_batch_size=micro, gradient_accumulation_steps=per_step // micro,
        num_generations=group, learning_rate=spec["lr"], weight_decay=spec["weight_decay"],
        max_grad_norm=spec["max_grad_norm"] or 1e9, temperature=spec["temperature"], top_k=0, top_p=1.0,
        max_completion_length=spec["max_tokens"], shuffle_dataset=False, disable_dropout=True,
        gradient_checkpointing=False, bf16=False, use_cpu=True, seed=spec["seed"], logging_steps=1,
        save_strategy="no", report_to="none", dataloader_num_workers=0,
        teacher_model_kind="base", distillation_mode="sampled_token", distillation_alpha=1.0,
        teacher_prompt_template="{privileged_context} {prompt}",
    )
    clock = StepClock()
    trainer_cls = counting_sdft()
    trainer_cls.lr_multipliers = spec["lr_multipliers"]
    trainer = trainer_cls(
        model=student, args=args, processing_class=tok, callbacks=[clock],
        train_dataset=Dataset.from_list([{"prompt": m, "privileged_context": spec["privileged_context"]}
                                         for m in prompts]),
        peft_config=LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                               target_modules=lora["target_modules"], task_type="CAUSAL_LM"),
    )
    clock.trainer = trainer
    setup_s = time.perf_counter() - t0
    trainer.train()
    after = sample_texts(trainer.model, tok, spec["eval_messages"], **ev)
    Path(out_path).write_text(json.dumps({
        "setup_s": setup_s, "step_s": clock.step_s, "tokens": clock.tokens, "losses": clock.losses,
        "eval_before": before, "eval_after": after, "wall_s": time.perf_counter() - t0,
        "torch_threads": torch.get_num_threads(),
    }))
    return 0


def main(spec_path: str, out_path: str) -> int:
    t0 = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    if spec.get("mode", "distillation") == "sdft":
        return main_sdft(spec, out_path, t0)
    tok = AutoTokenizer.from_pretrained(spec["student"], padding_side="left")  # TRL wants prompts left-padded
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32)
    before = accuracy(student, tok, spec["eval"], spec["max_tokens"])
    prompts = [p for step in spec["train_prompts"] for p in step]
    per_step = len(spec["train_prompts"][0])
    micro = min(spec["micro_batch_size"], per_step)
    if per_step % micro:
        print(f"error: {per_step} sequences per step is not a multiple of micro_batch_size {micro}", file=sys.stderr)
        return 2
    lora = spec["lora"]
    args = DistillationConfig(
        output_dir=str(Path(out_path).parent / "trl_out"),
        max_steps=spec["steps"],
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=per_step // micro,  # one optimizer step over the step's completions, as ours
        learning_rate=spec["lr"],  # times lr_multipliers (CountingTrainer.create_scheduler)
        weight_decay=spec["weight_decay"],
        max_grad_norm=spec["max_grad_norm"] or 1e9,
        beta=1.0,  # reverse KL(student || teacher)
        temperature=spec["temperature"],
        top_k=0,
        top_p=1.0,
        max_completion_length=spec["max_tokens"],
        shuffle_dataset=False,  # the prompts in the order our orchestrator drew them
        disable_dropout=True,
        gradient_checkpointing=False,  # ours does not recompute activations either
        bf16=False,
        use_cpu=True,
        seed=spec["seed"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
    )
    clock = StepClock()
    CountingTrainer.lr_multipliers = spec["lr_multipliers"]
    trainer = CountingTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tok,
        peft_config=LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                               target_modules=lora["target_modules"], task_type="CAUSAL_LM"),
        callbacks=[clock],
    )
    clock.trainer = trainer
    setup_s = time.perf_counter() - t0
    trainer.train()
    after = accuracy(trainer.model, tok, spec["eval"], spec["max_tokens"])
    Path(out_path).write_text(json.dumps({
        "setup_s": setup_s, "step_s": clock.step_s, "tokens": clock.tokens, "losses": clock.losses,
        "acc_before": before, "acc_after": after, "wall_s": time.perf_counter() - t0,
        "torch_threads": torch.get_num_threads(),
    }))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: trl_side.py SPEC.json OUT.json", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
