"""A tiny reverse-text teacher with *another vocabulary* than the tiny student: letter pairs.

The task, the model size, the training recipe and the student are those of :mod:`shared.builders.tiny_pair`;
only the tokenizer differs.  The student reads and writes one character per token; this teacher's tokenizer
also has one token for each of the 64 pairs of task letters, and cuts every run of letters into pairs from
the left (``"abcde=" -> ab | cd | e | =``; the answer ``"edcba"`` is ``ed | cb | a``).  Its special tokens
keep the tiny pair's ids (``<pad> <s> </s> <unk>`` = 0..3), the single characters follow, then the pairs, so
the two vocabularies share their first 44 ids and differ after them (the student's 64 entries, the teacher's
128).  A teacher whose boundaries fall inside the student's tokens is what ``teacher.vocabulary = "align"``
(``shared/align.py``) is for; this one lets the CPU tests and ``benchmarks/cross_vocab.py`` exercise it.

``build_teacher()`` trains it once (about 2 minutes on one core) and caches it under
:func:`shared.builders.default_root` as ``tiny-reverse-teacher-pairs-v1-<hash>-s<seed>``, atomically, under the
tiny pair's file lock, with a ``BUILD_OK`` record like the pair's.  Config alias: ``tiny-reverse-teacher-pairs``.

Command line: ``python -m shared.builders.tiny_cross_vocab [--out DIR] [--seed N] [--force]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from shared.builders import default_root, tiny_pair as tp

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAIRS = tuple(a + b for a, b in itertools.product(tp.ALPHABET, repeat=2))  # "aa", "ab", ..., "hh"
RECIPE_VERSION = 1
ALIAS = "tiny-reverse-teacher-pairs"
# Pairs make the answer harder to line up with the prompt (an odd-length string's pairs straddle the
# prompt's), so the schedule is longer than the pair's teacher's; it still stops at 99% validation accuracy.
TEACHER_TRAIN = dataclasses.replace(tp.TEACHER_TRAIN, schedule_steps=1500)
MIN_ACCURACY = 0.9  # a finished teacher below this on held-out strings is a build error


def _vocabulary() -> list[str]:
    """The tiny pair's specials and characters (same ids), the letter pairs, then padding to a multiple of 64."""
    vocab = [*tp.SPECIAL_TOKENS, *tp.CHARACTERS, *PAIRS]
    padded = -(-len(vocab) // tp.VOCAB_MULTIPLE) * tp.VOCAB_MULTIPLE
    return vocab + [f"<extra_{i}>" for i in range(padded - len(vocab))]


RECIPE = {"version": RECIPE_VERSION, "pair_recipe": tp.RECIPE_HASH, "vocab": _vocabulary(),
          "model": dataclasses.asdict(tp.TEACHER_MODEL), "train": dataclasses.asdict(TEACHER_TRAIN),
          "min_accuracy": MIN_ACCURACY}
RECIPE_HASH = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:8]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Letter pairs from the left, then single characters; ``<s>`` prepended; decoding concatenates, so
    ``decode(encode(text), skip_special_tokens=True) == text`` for text over the characters."""
    import tokenizers
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = _vocabulary()
    tok = tokenizers.Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=tp.UNK_TOKEN))
    letters = f"[{tp.ALPHABET}]"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(f"{letters}{letters}|[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(tp.SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{tp.BOS_TOKEN} $A", pair=f"{tp.BOS_TOKEN} $A {tp.BOS_TOKEN} $B",
        special_tokens=[(tp.BOS_TOKEN, tp.BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=tp.BOS_TOKEN, eos_token=tp.EOS_TOKEN, pad_token=tp.PAD_TOKEN,
        unk_token=tp.UNK_TOKEN, model_max_length=tp.MAX_POSITIONS, clean_up_tokenization_spaces=False)


def dir_name(seed: int = 0) -> str:
    return f"{ALIAS}-v{RECIPE_VERSION}-{RECIPE_HASH}-s{seed}"


def is_built(root: Path | None = None, seed: int = 0) -> bool:
    return tp.is_built((root or default_root()) / dir_name(seed))


def _build_into(out: Path, seed: int) -> None:
    import torch
    import transformers

    start = time.perf_counter()
    tok = build_tokenizer()
    result = tp.train_model("teacher (letter pairs)", tp.TEACHER_MODEL, TEACHER_TRAIN, tok, seed)
    heldout = tp.evaluate(result.model, tok, tp.heldout_strings(tp.HELDOUT_EVAL_N))
    if heldout.accuracy < MIN_ACCURACY:
        raise RuntimeError(f"pair-vocabulary teacher reached only {heldout.accuracy:.3f} held-out accuracy "
                           f"(< {MIN_ACCURACY})")
    result.model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"role": "teacher", "vocabulary": "letter pairs", "seed": seed, "recipe_version": RECIPE_VERSION,
            "recipe_hash": RECIPE_HASH, "model": dataclasses.asdict(tp.TEACHER_MODEL),
            "n_params": sum(p.numel() for p in result.model.parameters()), "vocab_size": len(tok),
            "train_steps": result.steps, "val_accuracy": result.val.accuracy, "heldout_n": tp.HELDOUT_EVAL_N,
            "heldout_accuracy": heldout.accuracy, "train_seconds": round(result.seconds, 2),
            "build_seconds": round(time.perf_counter() - start, 2),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    (out / tp.BUILD_MARKER).write_text(json.dumps(info, indent=2) + "\n")


def build_teacher(out_root: Path | None = None, seed: int = 0, force: bool = False) -> Path:
    """Build (or find cached) the letter-pair teacher; its directory (a ``save_pretrained`` model, its
    tokenizer and ``BUILD_OK``).  Serialised with the tiny pair's builds by the same file lock."""
    root = Path(out_root).expanduser() if out_root is not None else default_root()
    final = root / dir_name(seed)
    if not force and tp.is_built(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with tp._locked(root):
        if not force and tp.is_built(final):
            return final
        for stale in root.glob(f".{ALIAS}-*"):  # left by killed builds; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        try:
            with tp._torch_threads(tp.BUILD_THREADS):
                _build_into(tmp, seed)
            tp._install(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shared.builders.tiny_cross_vocab",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"cache root (default: {default_root()})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached teacher exists")
    args = parser.parse_args(argv)
    path = build_teacher(args.out, seed=args.seed, force=args.force)
    info = tp.read_build_info(path)
    print(f"teacher: {path}  heldout_acc={info['heldout_accuracy']:.3f}  vocab={info['vocab_size']}  "
          f"params={info['n_params']}  steps={info['train_steps']}")


if __name__ == "__main__":
    main()
