"""A tiny, deterministic teacher/student pair for CPU end-to-end tests of on-policy distillation.

The task is string reversal over a small alphabet::

    prompt      "abcd="           (``prompt_for("abcd")``)
    completion  "dcba" + EOS      (``answer_for("abcd")`` followed by the EOS token)

Both models are Llama-architecture causal LMs (``LlamaForCausalLM``, float32, untied embeddings,
head_dim 32 so that vLLM's CPU attention accepts them) sharing one character-level tokenizer.
The teacher is trained until it solves held-out strings (>= 95% exact match, greedy); the student is
smaller and is stopped early, once it emits the right format but still gets most strings wrong, so that
on-policy distillation has room to improve it.

``build_pair()`` builds both once and caches them under ``$OPD_CACHE/models`` (or
``~/.cache/opd/models``). The directory names carry a hash of the build recipe, so changing the recipe
builds a new pair. Builds are atomic (temporary sibling directories renamed into place) and serialised
across processes with a file lock. Each finished directory holds a ``BUILD_OK`` JSON file recording the
measured held-out accuracy, parameter count and timings (see ``read_build_info``).

Command line: ``python -m shared.builders.tiny_pair [--out DIR] [--seed N] [--force]``.

Importing this module and finding a cached pair import nothing heavy (no torch or transformers).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import string
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from shared.builders import default_root

if TYPE_CHECKING:  # torch, tokenizers and transformers are imported where needed: a cache hit needs none
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# --------------------------------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------------------------------

ALPHABET = "abcdefgh"
MIN_LEN = 3
MAX_LEN = 8
HELDOUT_SEED = 12345


def make_string(rng: random.Random) -> str:
    """Draw one task string: length uniform in [MIN_LEN, MAX_LEN], letters uniform over ALPHABET."""
    length = rng.randint(MIN_LEN, MAX_LEN)
    return "".join(rng.choice(ALPHABET) for _ in range(length))


def prompt_for(s: str) -> str:
    """The prompt text for string ``s``: ``"abcd" -> "abcd="``."""
    return f"{s}="


def answer_for(s: str) -> str:
    """The expected completion text for ``s`` without the EOS token: ``"abcd" -> "dcba"``."""
    return s[::-1]


def heldout_strings(n: int, seed: int = HELDOUT_SEED) -> list[str]:
    """The first ``n`` distinct held-out strings of the stream seeded with ``seed``.

    The stream is separate from the training streams (which are seeded with strings), and the training
    data additionally skips the first ``HELDOUT_EXCLUDED`` held-out strings. The result for ``n`` is a
    prefix of the result for any larger ``n``.
    """
    return _distinct_strings(n, random.Random(seed))


def _distinct_strings(n: int, rng: random.Random) -> list[str]:
    """The first ``n`` distinct strings drawn from ``rng``, in order of first appearance."""
    seen: dict[str, None] = {}
    while len(seen) < n:
        seen.setdefault(make_string(rng))
    return list(seen)


HELDOUT_EVAL_N = 200  # strings used for the accuracies recorded in BUILD_OK
HELDOUT_EXCLUDED = 1000  # the first this-many held-out strings never appear in training data
VALIDATION_N = 256  # strings (from their own stream) that drive the stopping decisions

# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))
CHARACTERS = (*string.ascii_lowercase, "=", " ", "\n", *".,:;!?-'\"()")
VOCAB_MULTIPLE = 64  # vLLM's LoRA layers and kernels prefer padded vocabularies
MAX_POSITIONS = 64


def _vocabulary() -> list[str]:
    """Special tokens, then single characters, then ``<extra_i>`` padding up to VOCAB_MULTIPLE."""
    vocab = [*SPECIAL_TOKENS, *CHARACTERS]
    padded = -(-len(vocab) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return vocab + [f"<extra_{i}>" for i in range(padded - len(vocab))]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer shared by teacher and student.

    Every character is its own token (unknown characters map to ``<unk>``; there is no normaliser, so
    upper case is unknown). Encoding prepends ``<s>``; decoding concatenates tokens without separators,
    so ``decode(encode(text), skip_special_tokens=True) == text`` for text over the vocabulary.
    """
    import tokenizers
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = _vocabulary()
    tok = tokenizers.Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------------------

RECIPE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Llama model size. ``hidden_size / num_attention_heads`` must be 32 or 64 (vLLM CPU attention)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads or self.head_dim not in (32, 64):
            raise ValueError(f"head_dim must be 32 or 64, got {self.hidden_size}/{self.num_attention_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def config(self, vocab_size: int) -> LlamaConfig:
        """The transformers config for this size."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            head_dim=self.head_dim,
            max_position_embeddings=MAX_POSITIONS,
            rms_norm_eps=1e-5,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
            tie_word_embeddings=False,
            architectures=["LlamaForCausalLM"],
            dtype="float32",
        )


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """Supervised training on completion tokens: AdamW, linear warmup then cosine decay over
    ``schedule_steps``. Every ``eval_every`` steps the model is greedily evaluated on the validation
    strings, and training stops at the first evaluation reaching ``stop_at_val_accuracy`` (or at the end
    of the schedule)."""

    lr: float
    batch_size: int
    warmup_steps: int
    schedule_steps: int
    eval_every: int
    stop_at_val_accuracy: float
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0

    def lr_at(self, step: int) -> float:
        """Learning rate for optimiser step ``step`` (0-based)."""
        warmup = min(1.0, (step + 1) / self.warmup_steps)
        progress = min(step, self.schedule_steps) / self.schedule_steps
        return self.lr * warmup * 0.5 * (1.0 + math.cos(math.pi * progress))


TEACHER_MODEL = ModelSpec(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256)
STUDENT_MODEL = ModelSpec(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
# Same optimiser and schedule for both; the teacher trains until it has (nearly) solved the validation
# set, the student stops at the first check (every 5 steps, ~0.1 s each) where it gets a fifth right.
# Stopping on measured accuracy rather than after a fixed step count keeps the student inside its
# intended accuracy band even if floating-point differences between machines shift its (steep) learning
# curve: around that point it gains ~1% accuracy per step.
TEACHER_TRAIN = TrainSpec(
    lr=3e-3, batch_size=64, warmup_steps=100, schedule_steps=800, eval_every=50, stop_at_val_accuracy=0.99
)
STUDENT_TRAIN = dataclasses.replace(TEACHER_TRAIN, eval_every=5, stop_at_val_accuracy=0.2)
TEACHER_MIN_ACCURACY = 0.95  # a finished teacher below this on held-out strings is a build error
# One intra-op thread: with two, any other process doing the same on a 2-core machine (a test run next to
# a vLLM engine, a colleague's job) makes OpenMP threads wait on each other, and steps slow from ~0.1 s
# to ~5 s. A fixed count also keeps the float summation order, and so the weights, machine-independent.
BUILD_THREADS = 1

RECIPE = {
    "version": RECIPE_VERSION,
    "threads": BUILD_THREADS,
    "task": {"alphabet": ALPHABET, "min_len": MIN_LEN, "max_len": MAX_LEN, "prompt": prompt_for("{s}")},
    "data": {"heldout_seed": HELDOUT_SEED, "heldout_excluded": HELDOUT_EXCLUDED, "validation_n": VALIDATION_N},
    "vocab": _vocabulary(),
    "teacher": {"model": dataclasses.asdict(TEACHER_MODEL), "train": dataclasses.asdict(TEACHER_TRAIN)},
    "student": {"model": dataclasses.asdict(STUDENT_MODEL), "train": dataclasses.asdict(STUDENT_TRAIN)},
}
RECIPE_HASH = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:8]

# --------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------


def _completion_ids(tok: PreTrainedTokenizerFast, s: str) -> list[int]:
    """Token ids of the answer for ``s`` followed by EOS."""
    return tok(answer_for(s), add_special_tokens=False).input_ids + [EOS_ID]


def _training_batch(
    tok: PreTrainedTokenizerFast, rng: random.Random, batch_size: int, excluded: set[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A right-padded batch of ``prompt + completion`` ids and labels that mask all but the completion.

    No attention mask is needed: padding only follows real tokens, and attention is causal.
    """
    import torch

    rows: list[tuple[list[int], list[int]]] = []
    while len(rows) < batch_size:
        s = make_string(rng)
        if s in excluded:
            continue
        prompt, completion = tok(prompt_for(s)).input_ids, _completion_ids(tok, s)
        rows.append((prompt + completion, [-100] * len(prompt) + completion))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [PAD_ID] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    return input_ids, labels


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Greedy-decoding scores on a list of strings."""

    accuracy: float  # completion == answer + EOS exactly
    format_rate: float  # completion is one or more ALPHABET letters followed by EOS


def evaluate(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, strings: Sequence[str]) -> EvalResult:
    """Greedy-decode the prompts of ``strings`` with transformers (up to EOS, at most MAX_LEN + 4 new
    tokens) and score exact matches and well-formed completions."""
    import torch
    from transformers import GenerationConfig

    letter_ids = set(tok.convert_tokens_to_ids(list(ALPHABET)))
    gen_config = GenerationConfig(
        do_sample=False, max_new_tokens=MAX_LEN + 4, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID
    )
    by_length: dict[int, list[str]] = {}  # equal-length prompts batch without padding
    for s in strings:
        by_length.setdefault(len(s), []).append(s)
    was_training = model.training
    model.eval()
    exact = well_formed = 0
    for group in by_length.values():
        prompts = torch.tensor([tok(prompt_for(s)).input_ids for s in group])
        with torch.no_grad():
            out = model.generate(
                input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=gen_config
            )
        for s, completion in zip(group, out[:, prompts.shape[1] :].tolist()):
            if EOS_ID not in completion:
                continue
            body = completion[: completion.index(EOS_ID)]
            exact += body + [EOS_ID] == _completion_ids(tok, s)
            well_formed += bool(body) and all(t in letter_ids for t in body)
    model.train(was_training)
    return EvalResult(accuracy=exact / len(strings), format_rate=well_formed / len(strings))


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """A trained model, the optimiser steps taken, its last validation scores and the time taken."""

    model: LlamaForCausalLM
    steps: int
    val: EvalResult
    seconds: float


def train_model(
    role: str,
    model_spec: ModelSpec,
    train_spec: TrainSpec,
    tok: PreTrainedTokenizerFast,
    seed: int,
) -> TrainResult:
    """Initialise a model from ``seed`` and train it per ``train_spec``, with a progress bar on stderr.

    The data stream depends only on ``seed`` (teacher and student see the same strings), skips the
    first HELDOUT_EXCLUDED held-out strings and the validation strings, and never touches the global
    ``random`` state. The global torch RNG is forked, so the caller's state is left unchanged.
    """
    import torch
    from tqdm import tqdm
    from transformers import GenerationConfig, LlamaForCausalLM

    start = time.perf_counter()
    validation = _distinct_strings(VALIDATION_N, random.Random(f"tiny-reverse-validation-{seed}"))
    excluded = set(heldout_strings(HELDOUT_EXCLUDED)) | set(validation)
    data_rng = random.Random(f"tiny-reverse-train-{seed}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(model_spec.config(len(tok)))
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train_spec.lr, betas=train_spec.betas, weight_decay=train_spec.weight_decay
    )
    val = EvalResult(accuracy=0.0, format_rate=0.0)
    bar = tqdm(
        total=train_spec.schedule_steps,
        desc=f"{role} (stop at val acc {train_spec.stop_at_val_accuracy:.2f})",
        file=sys.stderr,
        dynamic_ncols=True,
    )
    with bar:
        step = 0
        while step < train_spec.schedule_steps:
            for group in optimizer.param_groups:
                group["lr"] = train_spec.lr_at(step)
            input_ids, labels = _training_batch(tok, data_rng, train_spec.batch_size, excluded)
            loss = model(input_ids=input_ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_spec.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update()
            if step % train_spec.eval_every == 0:
                val = evaluate(model, tok, validation)
                bar.set_postfix(loss=f"{loss.item():.4f}", val_acc=f"{val.accuracy:.3f}")
                if val.accuracy >= train_spec.stop_at_val_accuracy:
                    break
    model.eval()
    return TrainResult(model=model, steps=step, val=val, seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------

BUILD_MARKER = "BUILD_OK"
LOCK_FILE = ".tiny_pair.lock"


def pair_dir_names(seed: int = 0) -> tuple[str, str]:
    """Directory names of the teacher and student for ``seed`` under the current recipe."""
    stem = f"v{RECIPE_VERSION}-{RECIPE_HASH}-s{seed}"
    return f"tiny-reverse-teacher-{stem}", f"tiny-reverse-student-{stem}"


def read_build_info(model_dir: Path) -> dict:
    """The ``BUILD_OK`` record of a built model directory."""
    return json.loads((Path(model_dir) / BUILD_MARKER).read_text())


def is_built(model_dir: Path) -> bool:
    return (model_dir / BUILD_MARKER).is_file()


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the root's lock file, telling the user if we have to wait."""
    with open(root / LOCK_FILE, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"tiny_pair: waiting for another build to release {root / LOCK_FILE}", file=sys.stderr)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads, restoring the caller's setting afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _install(tmp_dir: Path, final_dir: Path) -> None:
    """Move a finished build into place, replacing (under the lock) whatever was there."""
    if final_dir.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.old-", dir=final_dir.parent))
        os.replace(final_dir, trash / final_dir.name)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(trash)
    else:
        os.replace(tmp_dir, final_dir)


def _build_into(teacher_tmp: Path, student_tmp: Path, seed: int) -> None:
    """Train both models and write them, the tokenizer and the BUILD_OK records into the given dirs."""
    import torch
    import transformers

    start = time.perf_counter()
    tok = build_tokenizer()
    heldout = heldout_strings(HELDOUT_EVAL_N)
    teacher_name, student_name = pair_dir_names(seed)
    runs = {}
    for role, model_spec, train_spec in (
        ("teacher", TEACHER_MODEL, TEACHER_TRAIN),
        ("student", STUDENT_MODEL, STUDENT_TRAIN),
    ):
        result = train_model(role, model_spec, train_spec, tok, seed)
        runs[role] = (result, evaluate(result.model, tok, heldout))
    teacher_acc = runs["teacher"][1].accuracy
    if teacher_acc < TEACHER_MIN_ACCURACY:
        raise RuntimeError(f"teacher reached only {teacher_acc:.3f} held-out accuracy (< {TEACHER_MIN_ACCURACY})")
    build_seconds = time.perf_counter() - start
    for role, out_dir, model_spec in (
        ("teacher", teacher_tmp, TEACHER_MODEL),
        ("student", student_tmp, STUDENT_MODEL),
    ):
        result, heldout_eval = runs[role]
        result.model.save_pretrained(out_dir)  # safetensors: the only format transformers 5 writes
        tok.save_pretrained(out_dir)
        info = {
            "role": role,
            "seed": seed,
            "recipe_version": RECIPE_VERSION,
            "recipe_hash": RECIPE_HASH,
            "model": dataclasses.asdict(model_spec),
            "n_params": sum(p.numel() for p in result.model.parameters()),
            "train_steps": result.steps,
            "val_accuracy": result.val.accuracy,
            "heldout_n": len(heldout),
            "heldout_accuracy": heldout_eval.accuracy,
            "heldout_format_rate": heldout_eval.format_rate,
            "train_seconds": round(result.seconds, 2),
            "build_seconds": round(build_seconds, 2),
            "pair": {"teacher": teacher_name, "student": student_name},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
        (out_dir / BUILD_MARKER).write_text(json.dumps(info, indent=2) + "\n")


def build_pair(out_root: Path | None = None, seed: int = 0, force: bool = False) -> tuple[Path, Path]:
    """Build (or find cached) the tiny teacher and student; return ``(teacher_dir, student_dir)``.

    Each directory is a ``save_pretrained`` model with the shared tokenizer and a ``BUILD_OK`` record.
    A cached pair is returned immediately; otherwise the pair is built (about 2 minutes on 2 CPU cores)
    under a file lock in ``out_root`` and moved into place atomically. ``force`` rebuilds regardless.
    """
    root = Path(out_root).expanduser() if out_root is not None else default_root()
    teacher_dir, student_dir = (root / name for name in pair_dir_names(seed))
    if not force and is_built(teacher_dir) and is_built(student_dir):
        return teacher_dir, student_dir
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        if not force and is_built(teacher_dir) and is_built(student_dir):
            return teacher_dir, student_dir  # another process built it while we waited
        for stale in root.glob(".tiny-reverse-*"):  # left by killed builds; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp_dirs = [Path(tempfile.mkdtemp(prefix=f".{d.name}.tmp-", dir=root)) for d in (teacher_dir, student_dir)]
        try:
            with _torch_threads(BUILD_THREADS):
                _build_into(*tmp_dirs, seed=seed)
            _install(tmp_dirs[1], student_dir)
            _install(tmp_dirs[0], teacher_dir)
        finally:
            for tmp in tmp_dirs:
                shutil.rmtree(tmp, ignore_errors=True)
    return teacher_dir, student_dir


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: build the pair and print the two paths with their held-out accuracies."""
    parser = argparse.ArgumentParser(prog="python -m shared.builders.tiny_pair", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"cache root (default: {default_root()})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached pair exists")
    args = parser.parse_args(argv)
    for model_dir in build_pair(args.out, seed=args.seed, force=args.force):
        info = read_build_info(model_dir)
        print(
            f"{info['role']}: {model_dir}  heldout_acc={info['heldout_accuracy']:.3f}"
            f"  format={info['heldout_format_rate']:.3f}  params={info['n_params']}  steps={info['train_steps']}"
        )


if __name__ == "__main__":
    main()
