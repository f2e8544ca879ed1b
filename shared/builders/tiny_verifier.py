"""A tiny verifier for the reverse-text task: a judge that answers ``yes`` / ``no`` to "is this a correct
answer to this prompt", for ``orchestrator.judge.verdict = "loglik"``.

The judge path (``orchestrator/workflows/judge.py``) renders the rubric as plain text (the tiny tokenizer has
no chat template) and compares the judge's log-likelihoods of the replies ``yes`` and ``no`` after it. The
verifier is trained on exactly that text, in one of two *layouts* (:data:`LAYOUTS`)::

    question   "{question}{answer}="              "abcd=" + "dcba" + "="               ->  "yes" + EOS
    reference  "{question}{answer}={reference}="  "abcd=" + "dcab" + "=" + "dcba" + "="  ->  "no" + EOS

``question``: the judge must reverse the string itself. The tiny teacher is fine-tuned on the verdict tokens
plus, at each answer position, the letter that belongs there. ``reference`` (a judge that knows the answer:
``orchestrator.judge`` fills ``{reference}`` with the environment's answer): the teacher's layers are frozen
(their reversal predicts, at each answer position, the letter that belongs next) and two decoder layers
appended after them are trained on, after each answer letter, ``y`` / ``n`` for whether it equals the
reference's letter at that offset, after the answer's ``=`` whether the lengths agree, and the verdict.

Training answers are half correct and half near misses of the kinds a sampling student makes
(:data:`NEAR_MISSES`: a dropped, swapped, repeated or substituted character, a cut or an extra tail, the
string copied unreversed; the reference layout draws substitutions and swaps twice as often). The label
comes from a *labeler*:

``exact``   correct iff the answer is the reversed string (the verifiable check). Question layout: held-out
            agreement with exact match 0.886, but blind to same-length answers with wrong letters (0.21 on
            substitutions, 0.16 on swaps): a student trained against it learns to exploit that
            (docs/workflows.md). Reference layout: 0.962 (0.91 on substitutions, 0.83 on swaps).
``length``  correct iff the answer is at least as long as the string: a deliberately weakened judge, as if
            its training labels came from a grader that only penalised omissions. Any long enough answer
            passes, so a student optimising its verdict can stop caring about the letters.

``build_verifier(labeler, layout=...)`` trains one (2000 steps: question layout 314 s on one core under load,
reference layout 371 s under load ~3, each measured once 2026-12-02; ``length``: 100 steps, ~30 s), caches it
beside the tiny pair (name with the recipe's hash, atomic, under the tiny pair's lock) and records in
``BUILD_OK`` its held-out agreement with exact match on synthetic answers (overall and per near-miss kind)
and on the tiny student's own samples. Numbers: benchmarks/results/judge_tiny_2026-12-02.md.

Command line: ``python -m shared.builders.tiny_verifier [--labeler exact|length] [--layout question|reference]
[--force]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from shared.builders import default_root, tiny_pair
from shared.builders.tiny_pair import ALPHABET, answer_for, make_string, prompt_for

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

YES, NO = "yes", "no"
# The orchestrator.judge.rubric of each layout: it renders exactly the text the verifier is trained on.
# question:  the judge sees the prompt and the answer and must reverse the string itself ("abcd=dcba=").
# reference: the judge also sees the prompt's reference answer after the answer ("abcd=dcab=dcba="): it has
#            to compare, not to reverse (orchestrator.judge fills {reference} from the environment).
LAYOUTS = {"question": "{question}{answer}=", "reference": "{question}{answer}={reference}="}
RUBRIC = LAYOUTS["question"]
MATCH, MISMATCH = "y", "n"  # the reference layout's per-letter labels (never read by the judge path)
MAX_ANSWER = tiny_pair.MAX_LEN + 4  # the longest answer a near miss (or a 12-token student sample) has


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def judge_text(s: str, answer: str, layout: str = "question") -> str:
    """The judge prompt for ``answer`` to the prompt of ``s``: ``("abcd", "dcab") -> "abcd=dcab="``, with
    ``layout="reference"`` ``"abcd=dcab=dcba="``."""
    _check_layout(layout)
    return LAYOUTS[layout].format(question=prompt_for(s), reference=answer_for(s), answer=answer)


def answer_start(s: str, layout: str = "question") -> str:
    """The judge prompt's text before the answer: ``"abcd="`` (in both layouts; the reference comes after)."""
    _check_layout(layout)
    return LAYOUTS[layout].split("{answer}")[0].format(question=prompt_for(s), reference=answer_for(s))


# --------------------------------------------------------------------------------------------------
# Data: near misses and labelers
# --------------------------------------------------------------------------------------------------


def _drop(r: str, rng: random.Random) -> str:
    i = rng.randrange(len(r))
    return r[:i] + r[i + 1 :]


def _swap(r: str, rng: random.Random) -> str:
    i = rng.randrange(len(r) - 1)
    return r[:i] + r[i + 1] + r[i] + r[i + 2 :]


def _repeat(r: str, rng: random.Random) -> str:
    i = rng.randrange(len(r))
    return r[: i + 1] + r[i] + r[i + 1 :]


def _substitute(r: str, rng: random.Random) -> str:
    i = rng.randrange(len(r))
    return r[:i] + rng.choice(ALPHABET.replace(r[i], "")) + r[i + 1 :]


def _truncate(r: str, rng: random.Random) -> str:
    return r[: rng.randrange(len(r))]  # possibly empty: a student that stops at once


def _extend(r: str, rng: random.Random) -> str:
    return r + "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, MAX_ANSWER - len(r))))


def _unreversed(r: str, rng: random.Random) -> str:
    return r[::-1]


# Each takes the correct answer r (len >= 3) and returns an edited string, possibly equal to r (a swap of
# two equal letters, the copy of a palindrome): near_miss() retries those.
NEAR_MISSES: dict[str, Callable[[str, random.Random], str]] = {
    "drop": _drop, "swap": _swap, "repeat": _repeat, "substitute": _substitute,
    "truncate": _truncate, "extend": _extend, "unreversed": _unreversed,
}


def near_miss(s: str, rng: random.Random, weights: dict[str, float] | None = None) -> tuple[str, str]:
    """``(kind, wrong answer)`` for ``s``: a kind of :data:`NEAR_MISSES` drawn uniformly (or in proportion to
    ``weights``, 1 for a kind not named) whose edit changed the answer (kinds are redrawn until one does;
    ``substitute`` always does)."""
    r = answer_for(s)
    kinds = tuple(NEAR_MISSES)
    w = None if weights is None else [weights.get(k, 1.0) for k in kinds]
    while True:
        kind = rng.choice(kinds) if w is None else rng.choices(kinds, w)[0]
        wrong = NEAR_MISSES[kind](r, rng)
        if wrong != r:
            return kind, wrong


LABELERS: dict[str, Callable[[str, str], bool]] = {
    "exact": lambda s, a: a == answer_for(s),
    "length": lambda s, a: len(a) >= len(s),
}


def make_example(rng: random.Random, labeler: str = "exact", weights: dict[str, float] | None = None
                 ) -> tuple[str, str, bool]:
    """``(s, answer, label)``: a fresh task string, the correct answer or (probability 1/2) a near miss
    (kinds weighted by ``weights``, see :func:`near_miss`), labelled by ``LABELERS[labeler]``."""
    s = make_string(rng)
    answer = answer_for(s) if rng.random() < 0.5 else near_miss(s, rng, weights)[1]
    return s, answer, LABELERS[labeler](s, answer)


def agreement(verdicts: Sequence[bool], truths: Sequence[bool]) -> float:
    """Fraction of verdicts equal to the truth (exact match): ``([T, T, F, F], [T, F, F, T]) -> 0.5``."""
    if len(verdicts) != len(truths) or not verdicts:
        raise ValueError(f"agreement needs two equally long, non-empty lists (got {len(verdicts)}, {len(truths)})")
    return sum(v == t for v, t in zip(verdicts, truths)) / len(verdicts)


# --------------------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------------------

RECIPE_VERSION = 1
TRAIN = tiny_pair.TrainSpec(lr=1e-3, batch_size=64, warmup_steps=20, schedule_steps=2000, eval_every=100,
                            stop_at_val_accuracy=0.99)  # "accuracy" here: agreement with the labeler
VALIDATION_N = 512
HELDOUT_N = 1000  # synthetic held-out answers (to the tiny pair's held-out strings) for BUILD_OK
STUDENT_SAMPLES = 2  # the tiny student's temperature-1 samples per held-out string, for BUILD_OK
# a finished verifier below this on held-out answers is a build error
MIN_AGREEMENT = {("exact", "question"): 0.85, ("exact", "reference"): 0.95}  # measured 0.886, 0.962
# Decoder layers added after the tiny teacher's, by layout (see _initial_model).
EXTRA_LAYERS = {"question": 0, "reference": 2}
# Training near misses per kind, by layout (held-out reports draw every kind uniformly): the reference layout
# sees substituted and swapped letters twice as often, the edits that keep the answer's length.
KIND_WEIGHTS: dict[str, dict[str, float] | None] = {"question": None, "reference": {"substitute": 2.0, "swap": 2.0}}


def recipe(labeler: str, layout: str = "question") -> dict:
    out = {"version": RECIPE_VERSION, "pair": tiny_pair.RECIPE_HASH, "labeler": labeler,
           "near_misses": sorted(NEAR_MISSES), "rubric": LAYOUTS[layout], "replies": [YES, NO],
           "train": dataclasses.asdict(TRAIN), "validation_n": VALIDATION_N, "threads": tiny_pair.BUILD_THREADS}
    if layout != "question":  # the question layout's recipe (and cache name) predates layouts
        out |= {"layout": layout, "kind_weights": KIND_WEIGHTS[layout], "dense": [MATCH, MISMATCH],
                "extra_layers": EXTRA_LAYERS[layout]}
    return out


def dir_name(labeler: str = "exact", seed: int = 0, layout: str = "question") -> str:
    """The cache directory name of the verifier trained with ``labeler`` on ``layout`` from the tiny pair of
    ``seed`` (``tiny-reverse-verifier-exact-v1-<hash>-s0``; the reference layout adds ``-ref``)."""
    if labeler not in LABELERS:
        raise ValueError(f"labeler must be one of {', '.join(LABELERS)}, got {labeler!r}")
    _check_layout(layout)
    digest = hashlib.sha256(json.dumps(recipe(labeler, layout), sort_keys=True).encode()).hexdigest()[:8]
    tag = "" if layout == "question" else "-ref"
    return f"tiny-reverse-verifier-{labeler}{tag}-v{RECIPE_VERSION}-{digest}-s{seed}"


# --------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------


def _ids(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def verdict_logliks(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast,
                    pairs: Sequence[tuple[str, str]], layout: str = "question") -> list[tuple[float, float]]:
    """``(log p(yes | prompt), log p(no | prompt))`` per ``(s, answer)``, summed over the reply's tokens, as
    the judge path's scoring pass computes them."""
    import torch

    yes, no = _ids(tok, YES), _ids(tok, NO)
    out: list[tuple[float, float]] = []
    for start in range(0, len(pairs), 256):
        rows, spans = [], []
        for s, a in pairs[start : start + 256]:
            prompt = tok(judge_text(s, a, layout)).input_ids
            for reply in (yes, no):
                rows.append(prompt + reply)
                spans.append((len(prompt), reply))
        width = max(map(len, rows))
        ids = torch.tensor([r + [tiny_pair.PAD_ID] * (width - len(r)) for r in rows])  # right padding: causal
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)  # (rows, T, V)
        sums = [sum(logp[k, n - 1 + j, t].item() for j, t in enumerate(reply)) for k, (n, reply) in enumerate(spans)]
        out += list(zip(sums[0::2], sums[1::2]))
    return out


def verdicts(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, pairs: Sequence[tuple[str, str]],
             layout: str = "question") -> list[bool]:
    """The verifier's verdict (``yes`` likelier than ``no``) per ``(s, answer)``."""
    return [ly > ln for ly, ln in verdict_logliks(model, tok, pairs, layout)]


def training_row(tok: PreTrainedTokenizerFast, s: str, a: str, label: bool, layout: str = "question"
                 ) -> tuple[list[int], list[int]]:
    """``(input ids, labels)`` of one training row: judge prompt + verdict + EOS, labelled on the verdict and
    EOS and on the answer (question layout: the letter that belongs at each answer position; reference
    layout: after each answer letter, whether it matches the reference's), -100 elsewhere."""
    prompt, reply = tok(judge_text(s, a, layout)).input_ids, _ids(tok, YES if label else NO) + [tiny_pair.EOS_ID]
    start, r = len(tok(answer_start(s, layout)).input_ids), answer_for(s)
    if layout == "reference":
        # Dense supervision of the comparison itself: after each answer letter, whether it equals the
        # reference's letter at the same offset (MATCH / MISMATCH; a letter past the reference's end
        # mismatches), and after the answer's closing "=", whether the lengths agree. The verdict then only
        # has to see whether anything mismatched.
        flags = [MATCH if j < len(r) and a[j] == r[j] else MISMATCH for j in range(len(a))]
        flags.append(MATCH if len(a) == len(r) else MISMATCH)
        context = [-100] * (start + 1) + _ids(tok, "".join(flags))
        context = context[: len(prompt)] + [-100] * (len(prompt) - len(context))
    else:
        # Dense supervision the comparison builds on: at each answer position, the letter that belongs there
        # (the teacher's own reversal, teacher-forced on the answer's possibly wrong prefix).
        ids = _ids(tok, r)
        context = [-100] * start + ids[: len(a)] + [-100] * (len(prompt) - start - min(len(a), len(ids)))
    return prompt + reply, context + reply


def _batch(tok: PreTrainedTokenizerFast, rng: random.Random, n: int, labeler: str,
           excluded: set[str], layout: str = "question") -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training rows (:func:`training_row`), right-padded."""
    import torch

    rows = []
    while len(rows) < n:
        s, a, label = make_example(rng, labeler, KIND_WEIGHTS[layout])
        if s in excluded:
            continue
        rows.append(training_row(tok, s, a, label, layout))
    width = max(len(x) for x, _ in rows)
    return (torch.tensor([x + [tiny_pair.PAD_ID] * (width - len(x)) for x, _ in rows]),
            torch.tensor([y + [-100] * (width - len(y)) for _, y in rows]))


def _examples(rng: random.Random, strings: Sequence[str], labeler: str) -> list[tuple[str, str, bool]]:
    out = []
    for s in strings:
        a = answer_for(s) if rng.random() < 0.5 else near_miss(s, rng)[1]
        out.append((s, a, LABELERS[labeler](s, a)))
    return out


def student_samples(student_dir: Path, strings: Sequence[str], per_string: int, seed: int) -> list[tuple[str, str]]:
    """``(s, answer)`` pairs sampled from the tiny student at temperature 1 (up to EOS, at most MAX_ANSWER
    tokens, as ``experiments/judge/tiny.toml`` samples them)."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(student_dir).eval()
    tok = tiny_pair.build_tokenizer()
    gen = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=MAX_ANSWER,
                           bos_token_id=tiny_pair.BOS_ID, eos_token_id=tiny_pair.EOS_ID, pad_token_id=tiny_pair.PAD_ID)
    by_length: dict[int, list[str]] = {}
    for s in strings:
        by_length.setdefault(len(s), []).append(s)
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for group in by_length.values():
            prompts = torch.tensor([tok(prompt_for(s)).input_ids for s in group for _ in range(per_string)])
            with torch.no_grad():
                ids = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=gen)
            for k, completion in enumerate(ids[:, prompts.shape[1] :].tolist()):
                if tiny_pair.EOS_ID in completion:
                    completion = completion[: completion.index(tiny_pair.EOS_ID)]
                out.append((group[k // per_string], tok.decode(completion, skip_special_tokens=True)))
    return out


def _initial_model(teacher_dir: Path, extra_layers: int) -> LlamaForCausalLM:
    """The tiny teacher, with ``extra_layers`` decoder layers appended that start as the identity (their
    attention and MLP output projections zero): room for the comparison after the teacher's own layers,
    which are frozen (with the embeddings) so that their reversal stays intact for the new layers to read."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if not extra_layers:
        return LlamaForCausalLM.from_pretrained(teacher_dir)
    config = LlamaConfig.from_pretrained(teacher_dir)
    base = config.num_hidden_layers
    config.num_hidden_layers = base + extra_layers
    model = LlamaForCausalLM(config)
    teacher = LlamaForCausalLM.from_pretrained(teacher_dir)
    missing, unexpected = model.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not k.startswith(tuple(f"model.layers.{base + i}." for i in range(extra_layers)))
                         for k in missing):
        raise RuntimeError(f"tiny verifier: teacher weights do not fit (missing {missing}, unexpected {unexpected})")
    with torch.no_grad():
        for layer in model.model.layers[base:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    for module in (model.model.embed_tokens, *model.model.layers[:base]):
        module.requires_grad_(False)
    return model


def _train(labeler: str, teacher_dir: Path, tok: PreTrainedTokenizerFast, seed: int, steps: int | None,
           layout: str = "question") -> tuple[LlamaForCausalLM, int, float]:
    """Fine-tune the teacher into a verifier; ``(model, steps taken, validation agreement with the labeler)``."""
    import torch

    validation = tiny_pair._distinct_strings(VALIDATION_N, random.Random(f"tiny-verifier-validation-{seed}"))
    val = _examples(random.Random(f"tiny-verifier-val-answers-{seed}"), validation, labeler)
    excluded = set(tiny_pair.heldout_strings(tiny_pair.HELDOUT_EXCLUDED)) | set(validation)
    rng = random.Random(f"tiny-verifier-train-{labeler}-{seed}" + ("" if layout == "question" else f"-{layout}"))
    model = _initial_model(teacher_dir, EXTRA_LAYERS[layout])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN.lr, betas=TRAIN.betas, weight_decay=TRAIN.weight_decay)
    total = TRAIN.schedule_steps if steps is None else steps
    step, val_agreement = 0, 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        while step < total:
            for group in opt.param_groups:
                group["lr"] = TRAIN.lr_at(step)
            ids, labels = _batch(tok, rng, TRAIN.batch_size, labeler, excluded, layout)
            model(input_ids=ids, labels=labels).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % TRAIN.eval_every == 0 or step == total:
                model.eval()
                val_agreement = agreement(verdicts(model, tok, [(s, a) for s, a, _ in val], layout),
                                          [y for _, _, y in val])
                model.train()
                print(f"tiny_verifier ({labeler}, {layout}): step {step}, validation agreement {val_agreement:.3f}", file=sys.stderr)
                if steps is None and val_agreement >= TRAIN.stop_at_val_accuracy:
                    break
    model.eval()
    return model, step, val_agreement


def _heldout_report(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, student_dir: Path, seed: int,
                    layout: str = "question") -> dict:
    """Agreement with exact match on synthetic held-out answers (overall and per near-miss kind) and on
    the tiny student's own samples to held-out strings."""
    rng = random.Random(f"tiny-verifier-heldout-{seed}")
    strings = tiny_pair.heldout_strings(HELDOUT_N)
    kinds, pairs = [], []
    for s in strings:
        kind, a = ("correct", answer_for(s)) if rng.random() < 0.5 else near_miss(s, rng)
        kinds.append(kind)
        pairs.append((s, a))
    v = verdicts(model, tok, pairs, layout)
    truth = [LABELERS["exact"](s, a) for s, a in pairs]
    per_kind = {k: agreement([x for x, kk in zip(v, kinds) if kk == k], [t for t, kk in zip(truth, kinds) if kk == k])
                for k in sorted(set(kinds))}
    samples = student_samples(student_dir, tiny_pair.heldout_strings(tiny_pair.HELDOUT_EVAL_N), STUDENT_SAMPLES, seed)
    sv = verdicts(model, tok, samples, layout)
    st = [LABELERS["exact"](s, a) for s, a in samples]
    return {
        "heldout_n": len(pairs), "heldout_agreement": agreement(v, truth),
        "heldout_agreement_by_kind": per_kind, "heldout_n_by_kind": dict(sorted(Counter(kinds).items())),
        "student_samples_n": len(samples), "student_samples_correct": sum(st) / len(st),
        "student_samples_agreement": agreement(sv, st),
        "student_samples_judged_yes": sum(sv) / len(sv),
    }


def build_verifier(labeler: str = "exact", out_root: Path | None = None, seed: int = 0, force: bool = False,
                   steps: int | None = None, layout: str = "question") -> Path:
    """Build (or find cached) the verifier trained with ``labeler`` on ``layout``; return its directory.

    The directory is a ``save_pretrained`` model with the tiny tokenizer and a ``BUILD_OK`` record (the
    held-out agreements). ``steps`` trains exactly that many steps into a directory of its own (``-n<steps>``),
    for a quick test; otherwise training stops at the first check reaching the recipe's validation agreement.
    """
    import torch
    import transformers

    name = dir_name(labeler, seed, layout) + (f"-n{steps}" if steps is not None else "")
    root = Path(out_root).expanduser() if out_root is not None else default_root()
    final = root / name
    if not force and tiny_pair.is_built(final):
        return final
    teacher_dir, student_dir = tiny_pair.build_pair(out_root, seed=seed)
    with tiny_pair._locked(root):
        if not force and tiny_pair.is_built(final):
            return final
        for stale in root.glob(f".{name}.tmp-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            start = time.perf_counter()
            tok = tiny_pair.build_tokenizer()
            with tiny_pair._torch_threads(tiny_pair.BUILD_THREADS):
                model, taken, val_agreement = _train(labeler, teacher_dir, tok, seed, steps, layout)
                train_seconds = time.perf_counter() - start
                report = _heldout_report(model, tok, student_dir, seed, layout)
            least = MIN_AGREEMENT.get((labeler, layout), 0.0)
            if steps is None and report["heldout_agreement"] < least:
                raise RuntimeError(f"verifier ({labeler}, {layout}) reached only {report['heldout_agreement']:.3f} "
                                   f"held-out agreement with exact match (< {least})")
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            info = {"role": "verifier", "labeler": labeler, "layout": layout, "seed": seed,
                    "recipe_version": RECIPE_VERSION, "recipe": recipe(labeler, layout), "from": teacher_dir.name,
                    "rubric": LAYOUTS[layout], "yes": YES, "no": NO,
                    "train_steps": taken, "val_agreement_with_labeler": val_agreement, **report,
                    "train_seconds": round(train_seconds, 2), "build_seconds": round(time.perf_counter() - start, 2),
                    "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
            (tmp / tiny_pair.BUILD_MARKER).write_text(json.dumps(info, indent=2) + "\n")
            tiny_pair._install(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shared.builders.tiny_verifier", description=__doc__.splitlines()[0])
    parser.add_argument("--labeler", choices=sorted(LABELERS), default="exact")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="question",
                        help="question: judge '{question}{answer}='; reference: '{question}{reference}={answer}='")
    parser.add_argument("--out", type=Path, default=None, help=f"cache root (default: {default_root()})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="train exactly this many steps (a quick test)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached verifier exists")
    args = parser.parse_args(argv)
    path = build_verifier(args.labeler, args.out, args.seed, args.force, args.steps, args.layout)
    info = tiny_pair.read_build_info(path)
    print(f"{path}\n  steps={info['train_steps']} heldout_agreement={info['heldout_agreement']:.3f} "
          f"student_samples_agreement={info['student_samples_agreement']:.3f} "
          f"(n={info['student_samples_n']}, correct {info['student_samples_correct']:.3f}) "
          f"build_seconds={info['build_seconds']}")


if __name__ == "__main__":
    main()
