"""A long-horizon task and a tiny teacher/student pair for it: running sums written out step by step.

The task (``running_sum``)::

    prompt      "3 1 4 1 5 ="           n digits x_1..x_n (n = 16; "31415" shows n = 5), a space after each, "="
    completion  "3314481954" + EOS      n steps "x_i y_i": the digit, then y_i = (y_{i-1} + x_i) mod 10, y_0 = 0

Each step copies the next digit and writes the running total mod 10, which the next step adds to.  So every
step depends on the one before it: a wrong digit or total at step i makes every later total wrong (each is off
by the same amount), and the answer is only right if all n steps are.  Answers are 32 tokens: the regime where
errors compound, unlike the 2-8 token answers of ``reverse_text`` and ``arithmetic``.

Why this format: the digit a step copies sits a fixed distance (2n + 1 tokens) behind it (two tokens per digit
in the prompt, two per step in the answer, one length), which one attention head finds, and the total is then
a function of the two tokens just before it.  Writing only the totals ("34894") fails to train: a total mod 10
is independent of either of its two inputs alone (as a parity is), so nothing rewards finding the digit first,
and the teacher's loss stayed at the uniform ln 10 for 350 steps, as it did for 8-14-digit "3:3 1:4" steps,
whose copy distance changes from step to step.

Scores (:func:`exact_score`, :func:`partial_score`): exact match (the verifiable reward), and a partial credit,
the fraction of steps right before the first wrong one (over the longer of the two, so extra or missing steps
cost).  The held-out split is a stable hash of the digit string (:func:`is_heldout`): training
never sees an evaluation prompt.

``build_pair()`` trains, on one thread, a teacher until it solves the validation set and a smaller student
stopped at the first check with a tenth of the validation answers right, and caches both under
``$OPD_CACHE/models`` the way ``tiny_pair`` does (recipe hash in the directory names, atomic install under a file
lock, ``BUILD_OK`` with the measured held-out scores).  A teacher below 0.95 or a student above 0.2 held-out exact
match is a build error.  Measured (``benchmarks/results/tiny_long_build_2026-12-02.json``): teacher 1.000 after
250 steps, student 0.165 (partial credit 0.69) after 320, 128 s in all under a load of 4-7.
``python -m shared.builders.tiny_long [--force]``.

Importing this module imports nothing heavy (no torch or transformers).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import shutil
import string
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.builders import default_root
from shared.builders import tiny_pair as tp

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

# --------------------------------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------------------------------

MIN_DIGITS = MAX_DIGITS = 16
HELDOUT_EVERY = 5  # a digit string is held out when the hash of its text is 0 mod this (~20%)
HELDOUT_SEED = 12345  # the evaluation stream


def make_digits(rng: random.Random, min_digits: int = MIN_DIGITS, max_digits: int = MAX_DIGITS) -> str:
    """One task string: a length uniform in [min_digits, max_digits], digits uniform."""
    return "".join(rng.choice(string.digits) for _ in range(rng.randint(min_digits, max_digits)))


def prompt_for(digits: str) -> str:
    """``"314" -> "3 1 4 ="``."""
    return "".join(f"{d} " for d in digits) + "="


def steps_for(digits: str) -> list[str]:
    """The steps, each digit then the running total mod 10: ``"31415" -> ["33", "14", "48", "19", "54"]``."""
    total, steps = 0, []
    for d in digits:
        total = (total + int(d)) % 10
        steps.append(f"{d}{total}")
    return steps


def answer_for(digits: str) -> str:
    """The expected completion without EOS: ``"31415" -> "3314481954"``."""
    return "".join(steps_for(digits))


def is_heldout(digits: str) -> bool:
    """Whether a digit string belongs to the held-out split (stable across runs and machines)."""
    return int(hashlib.sha256(digits.encode()).hexdigest(), 16) % HELDOUT_EVERY == 0


def training_digits(rng: random.Random, min_digits: int = MIN_DIGITS, max_digits: int = MAX_DIGITS) -> str:
    """A digit string of the training split (held-out ones are skipped)."""
    while True:
        s = make_digits(rng, min_digits, max_digits)
        if not is_heldout(s):
            return s


def heldout_digits(n: int, min_digits: int = MIN_DIGITS, max_digits: int = MAX_DIGITS) -> list[str]:
    """The first ``n`` distinct held-out digit strings of the evaluation stream (a prefix of any longer list)."""
    rng, seen = random.Random(HELDOUT_SEED), dict[str, None]()
    while len(seen) < n:
        s = make_digits(rng, min_digits, max_digits)
        if is_heldout(s):
            seen.setdefault(s)
    return list(seen)


def exact_score(answer: str, completion: str) -> float:
    """1.0 when the completion (surrounding white space ignored) is the answer, else 0.0."""
    return float(completion.strip() == answer)


def partial_score(answer: str, completion: str) -> float:
    """The steps (two characters each) right before the first wrong one, over the longer of answer and completion
    in steps (a last odd character counts as a step).

    ``answer = "33144819"``: ``"33144919"`` -> 2/4; ``"331448"`` -> 3/4; ``"331448195"`` -> 4/5; itself -> 1.
    """
    text = completion.strip()
    want, got = [answer[i:i + 2] for i in range(0, len(answer), 2)], [text[i:i + 2] for i in range(0, len(text), 2)]
    right = 0
    for w, g in zip(want, got):
        if w != g:
            break
        right += 1
    return right / max(len(want), len(got))


# --------------------------------------------------------------------------------------------------
# Tokenizer: one token per character, the tiny pair's special tokens and ids
# --------------------------------------------------------------------------------------------------

CHARACTERS = string.digits + " ="
MAX_POSITIONS = 80  # BOS + 16 x (digit, space) + "=" + 32 answer tokens + EOS = 67


def char_tokenizer(chars: str, max_positions: int = MAX_POSITIONS) -> PreTrainedTokenizerFast:
    """A character tokenizer over ``chars`` with ``tiny_pair``'s special tokens and ids (BOS prepended)."""
    import tokenizers
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [*tp.SPECIAL_TOKENS, *chars]
    vocab += [f"<extra_{i}>" for i in range(-len(vocab) % tp.VOCAB_MULTIPLE)]
    tok = tokenizers.Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=tp.UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(tp.SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(single=f"{tp.BOS_TOKEN} $A",
                                                       special_tokens=[(tp.BOS_TOKEN, tp.BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=tp.BOS_TOKEN, eos_token=tp.EOS_TOKEN,
                                   pad_token=tp.PAD_TOKEN, unk_token=tp.UNK_TOKEN, model_max_length=max_positions,
                                   clean_up_tokenization_spaces=False)


# --------------------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------------------

RECIPE_VERSION = 1
TEACHER_MODEL = tp.ModelSpec(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256)
STUDENT_MODEL = tp.ModelSpec(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
TEACHER_TRAIN = tp.TrainSpec(lr=3e-3, batch_size=64, warmup_steps=50, schedule_steps=1500, eval_every=50,
                             stop_at_val_accuracy=0.99)
# The student stops at the first check (every 10 steps) with a tenth of the validation answers right: its
# per-token accuracy is then already high, but over 32 dependent tokens few answers survive.
STUDENT_TRAIN = dataclasses.replace(TEACHER_TRAIN, eval_every=10, stop_at_val_accuracy=0.1)
TEACHER_MIN_ACCURACY = 0.95  # held-out exact match below this is a build error
STUDENT_MAX_ACCURACY = 0.2  # ... and above this for the student
VALIDATION_N = 128  # validation strings (training split, their own stream) that drive the stopping decisions
HELDOUT_EVAL_N = 200  # held-out strings behind the accuracies in BUILD_OK
BUILD_THREADS = 1  # as tiny_pair: machine-independent weights, no thread contention on 2 cores

RECIPE = {
    "version": RECIPE_VERSION, "threads": BUILD_THREADS, "chars": CHARACTERS, "max_positions": MAX_POSITIONS,
    "task": {"min_digits": MIN_DIGITS, "max_digits": MAX_DIGITS, "heldout_every": HELDOUT_EVERY,
             "heldout_seed": HELDOUT_SEED, "validation_n": VALIDATION_N},
    "teacher": {"model": dataclasses.asdict(TEACHER_MODEL), "train": dataclasses.asdict(TEACHER_TRAIN)},
    "student": {"model": dataclasses.asdict(STUDENT_MODEL), "train": dataclasses.asdict(STUDENT_TRAIN)},
}
RECIPE_HASH = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:8]

# --------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------


def evaluate(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, digits: Sequence[str]) -> dict[str, float]:
    """Greedy completions of ``digits``' prompts: mean exact and partial scores (batched by length: no padding)."""
    import torch

    by_len: dict[int, list[str]] = {}
    for s in digits:
        by_len.setdefault(len(s), []).append(s)
    was_training = model.training
    model.eval()
    exact = partial = 0.0
    for group in by_len.values():
        ids = torch.tensor([tok(prompt_for(s)).input_ids for s in group])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=2 * len(group[0]) + 2, eos_token_id=tp.EOS_ID, pad_token_id=tp.PAD_ID)
        for s, completion in zip(group, out[:, ids.shape[1]:].tolist()):
            ended = tp.EOS_ID in completion
            text = tok.decode(completion[:completion.index(tp.EOS_ID)] if ended else completion, skip_special_tokens=True)
            exact += ended and exact_score(answer_for(s), text)
            partial += partial_score(answer_for(s), text)
    model.train(was_training)
    return {"accuracy": exact / len(digits), "partial": partial / len(digits)}


def train_model(role: str, spec: tp.ModelSpec, train: tp.TrainSpec, tok: PreTrainedTokenizerFast,
                seed: int) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """Train a model of ``spec`` on completion tokens until its validation exact match reaches
    ``train.stop_at_val_accuracy`` (checked every ``train.eval_every`` steps) or the schedule ends."""
    import torch
    from transformers import LlamaForCausalLM

    t0 = time.perf_counter()
    data_rng = random.Random(f"tiny-long-train-{seed}")
    val_rng = random.Random(f"tiny-long-validation-{seed}")
    validation = [training_digits(val_rng) for _ in range(VALIDATION_N)]
    config = spec.config(len(tok))
    config.max_position_embeddings = MAX_POSITIONS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)
    model.train()
    step, val = 0, {"accuracy": 0.0, "partial": 0.0}
    while step < train.schedule_steps:
        rows = []
        for s in (training_digits(data_rng) for _ in range(train.batch_size)):
            prompt = tok(prompt_for(s)).input_ids
            answer = tok(answer_for(s), add_special_tokens=False).input_ids + [tp.EOS_ID]
            rows.append((prompt + answer, [-100] * len(prompt) + answer))
        width = max(len(x) for x, _ in rows)  # right padding after real tokens: causal attention needs no mask
        ids = torch.tensor([x + [tp.PAD_ID] * (width - len(x)) for x, _ in rows])  # (B, T)
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in rows])  # (B, T)
        for g in opt.param_groups:
            g["lr"] = train.lr_at(step)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % train.eval_every == 0:
            val = evaluate(model, tok, validation)
            print(f"tiny_long {role} step {step}: loss {loss.item():.4f}, validation exact {val['accuracy']:.3f}, "
                  f"partial {val['partial']:.3f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            if val["accuracy"] >= train.stop_at_val_accuracy:
                break
    model.eval()
    return model, {"train_steps": step, "val_accuracy": val["accuracy"], "train_seconds": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


def pair_dir_names(seed: int = 0) -> tuple[str, str]:
    """Directory names of the teacher and student for ``seed`` under the current recipe."""
    stem = f"v{RECIPE_VERSION}-{RECIPE_HASH}-s{seed}"
    return f"tiny-long-teacher-{stem}", f"tiny-long-student-{stem}"


def is_built(root: Path | None = None, seed: int = 0) -> bool:
    root = root or default_root()
    return all(tp.is_built(root / name) for name in pair_dir_names(seed))


def build_pair(out_root: Path | None = None, seed: int = 0, force: bool = False) -> tuple[Path, Path]:
    """Build (or find cached) the running-sum teacher and student; return ``(teacher_dir, student_dir)``.

    A teacher below TEACHER_MIN_ACCURACY or a student above STUDENT_MAX_ACCURACY held-out exact match is a
    RuntimeError, and nothing is installed.  Each directory's ``BUILD_OK`` records both held-out scores.
    """
    root = Path(out_root).expanduser() if out_root is not None else default_root()
    dirs = [root / name for name in pair_dir_names(seed)]
    if not force and is_built(root, seed):
        return dirs[0], dirs[1]
    root.mkdir(parents=True, exist_ok=True)
    with tp._locked(root):
        if not force and is_built(root, seed):
            return dirs[0], dirs[1]
        for stale in root.glob(".tiny-long-*"):  # left by killed builds; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmps = [Path(tempfile.mkdtemp(prefix=f".{d.name}.tmp-", dir=root)) for d in dirs]
        try:
            with tp._torch_threads(BUILD_THREADS):
                _build_into(tmps, seed)
            for tmp, d in zip(tmps[::-1], dirs[::-1]):  # the student first: a teacher alone is not "built"
                tp._install(tmp, d)
        finally:
            for tmp in tmps:
                shutil.rmtree(tmp, ignore_errors=True)
    return dirs[0], dirs[1]


def _build_into(tmps: list[Path], seed: int) -> None:
    import torch
    import transformers

    start, tok = time.perf_counter(), char_tokenizer(CHARACTERS)
    heldout = heldout_digits(HELDOUT_EVAL_N)
    runs = {}
    for role, spec, train in (("teacher", TEACHER_MODEL, TEACHER_TRAIN), ("student", STUDENT_MODEL, STUDENT_TRAIN)):
        model, info = train_model(role, spec, train, tok, seed)
        runs[role] = (model, spec, info, evaluate(model, tok, heldout))
    teacher_acc, student_acc = runs["teacher"][3]["accuracy"], runs["student"][3]["accuracy"]
    if teacher_acc < TEACHER_MIN_ACCURACY:
        raise RuntimeError(f"tiny_long: teacher reached only {teacher_acc:.3f} held-out exact match "
                           f"(< {TEACHER_MIN_ACCURACY})")
    if student_acc > STUDENT_MAX_ACCURACY:
        raise RuntimeError(f"tiny_long: student starts at {student_acc:.3f} held-out exact match "
                           f"(> {STUDENT_MAX_ACCURACY})")
    names = pair_dir_names(seed)
    for tmp, (role, (model, spec, info, held)) in zip(tmps, runs.items()):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        record = {"role": role, "task": "running_sum", "seed": seed, "recipe_version": RECIPE_VERSION,
                  "recipe_hash": RECIPE_HASH, "model": dataclasses.asdict(spec),
                  "n_params": sum(p.numel() for p in model.parameters()), **info, "heldout_n": len(heldout),
                  "heldout_accuracy": held["accuracy"], "heldout_partial": held["partial"],
                  "build_seconds": round(time.perf_counter() - start, 1),
                  "pair": {"teacher": names[0], "student": names[1]},
                  "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
        (tmp / tp.BUILD_MARKER).write_text(json.dumps(record, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: build the pair and print both paths with their held-out scores."""
    parser = argparse.ArgumentParser(prog="python -m shared.builders.tiny_long", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"cache root (default: {default_root()})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached pair exists")
    args = parser.parse_args(argv)
    for d in build_pair(args.out, seed=args.seed, force=args.force):
        info = tp.read_build_info(d)
        print(f"{info['role']}: {d}  heldout exact={info['heldout_accuracy']:.3f} partial={info['heldout_partial']:.3f}"
              f"  params={info['n_params']}  steps={info['train_steps']}  ({info['train_seconds']} s)")


if __name__ == "__main__":
    main()
