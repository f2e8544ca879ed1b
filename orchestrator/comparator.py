"""Answer comparators: the student's answer against the teacher's reference answer.

``compare(kind, student, reference, threshold) -> (score, correct)`` with ``correct = score >= threshold``:

``exact``
    1.0 if :func:`normalize_answer` makes both equal, else 0.0.  Normalisation: Unicode NFKC, case-folded,
    runs of whitespace → one space, surrounding markdown emphasis/quotes (``* _ ` " '``) and trailing
    punctuation (``. , ; : ! ? …``) stripped, and (``normalize_numbers``) every number written
    canonically: ``1,000`` → ``1000``, ``3.50`` → ``3.5``, ``+4`` → ``4``, ``2.0`` → ``2``, ``-0`` → ``0``.
``bleu``
    Sentence BLEU-4 (Papineni et al. 2002) of the student against the single reference, on case-folded
    word/punctuation tokens (``\\w+`` or one non-space symbol), uniform weights, brevity penalty
    ``exp(1 - r/c)`` when ``c < r``, and add-one smoothing for n >= 2 (Lin & Och 2004):
    ``p_1 = m_1 / l_1`` and ``p_n = (m_n + 1) / (l_n + 1)``, so a candidate sharing no word scores 0.
    Both empty → 1.0; an empty candidate otherwise → 0.0.
``semantic``
    Cosine similarity of the mean-pooled (over the attention mask) last hidden states of a local model,
    loaded with transformers ``AutoModel`` on the CPU with ``local_files_only=True`` (never the hub).  The
    default is the converted SmolLM2-135M-Instruct folder (``smollm2-135m-instruct``, built by
    ``shared/builders/smollm2.py`` on first use); any local model directory works.  A causal LM is a coarse
    embedder: unrelated sentences score ~0.6, paraphrases ~0.95, and single-word answers are poorly
    separated (``Paris`` vs ``London`` ~0.99), so prefer ``exact`` for short factual answers.
"""

from __future__ import annotations

import math
import re
import threading
import unicodedata
from collections import Counter
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from shared.config import COMPARATOR_THRESHOLDS, ComparatorConfig, ConfigError

EMBEDDING_KEY = "orchestrator.comparator.embedding_model"
KINDS = ("exact", "bleu", "semantic")

# ------------------------------------------------------------------------------------------------
# exact

_NUMBER = re.compile(r"(?<![\w.,])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\w|[.,]\d)")
_EDGE_MARKUP = "*_`\"'“”‘’"
_TRAILING_PUNCT = ".,;:!?…"


def _canonical_number(m: re.Match[str]) -> str:
    try:
        d = Decimal(m.group(0).replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the pattern only matches decimal numbers
        return m.group(0)
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def normalize_answer(text: str, numbers: bool = True) -> str:
    """The canonical form that ``exact`` compares (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = " ".join(text.split())
    previous = None
    while previous != text:  # "**Paris.**" → "paris"
        previous = text
        text = text.strip(_EDGE_MARKUP + " ").rstrip(_TRAILING_PUNCT + " ")
    if numbers:
        text = _NUMBER.sub(_canonical_number, text)
    return text


def exact_score(student: str, reference: str, numbers: bool = True) -> float:
    return float(normalize_answer(student, numbers) == normalize_answer(reference, numbers))


# ------------------------------------------------------------------------------------------------
# bleu

_TOKEN = re.compile(r"\w+|[^\w\s]")


def bleu_tokens(text: str) -> list[str]:
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu(candidate: str, reference: str, max_n: int = 4) -> float:
    """Smoothed sentence BLEU of ``candidate`` against one ``reference`` (see the module docstring)."""
    cand, ref = bleu_tokens(candidate), bleu_tokens(reference)
    if not cand:
        return 1.0 if not ref else 0.0
    log_sum = 0.0
    for n in range(1, max_n + 1):
        c_grams, r_grams = _ngrams(cand, n), _ngrams(ref, n)
        matches = sum(min(count, r_grams[g]) for g, count in c_grams.items())
        total = sum(c_grams.values())
        if n == 1:
            if matches == 0:
                return 0.0
            log_sum += math.log(matches / total)
        else:
            log_sum += math.log((matches + 1) / (total + 1))
    c, r = len(cand), len(ref)
    brevity = 0.0 if c >= r else 1.0 - r / c
    return math.exp(brevity + log_sum / max_n)


# ------------------------------------------------------------------------------------------------
# semantic


class Embedder:
    """Mean-pooled last hidden states of a local transformers model (CPU, float32, no hub)."""

    def __init__(self, model_dir: Path, key: str = EMBEDDING_KEY):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = Path(model_dir)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 - any failure to load is the config's model that is unusable
            cause = " ".join(str(e).split())[:300]
            raise ConfigError(f"{key}: cannot load {str(model_dir)!r} with transformers ({type(e).__name__}: {cause})") from None
        self.model.eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.tokenizer.padding_side = "right"

    def embed(self, texts: list[str]) -> Any:
        """A ``(len(texts), hidden)`` float tensor of unit-norm embeddings."""
        import torch

        # An empty text still gets one (padding) token so that every row has a defined mean.
        texts = [t if t.strip() else self.tokenizer.pad_token for t in texts]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=512)
        with torch.inference_mode():
            hidden = self.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
        mask = enc.attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def similarity(self, a: str, b: str) -> float:
        e = self.embed([a, b])
        return float((e[0] * e[1]).sum())

    def similarities(self, students: list[str], references: list[str]) -> list[float]:
        if len(students) != len(references):
            raise ValueError(f"{len(students)} answers but {len(references)} references")
        if not students:
            return []
        e = self.embed(list(students) + list(references))
        n = len(students)
        return [float(x) for x in (e[:n] * e[n:]).sum(dim=-1)]


_EMBEDDERS: dict[str, Embedder] = {}
_EMBEDDERS_LOCK = threading.Lock()


def embedding_model_dir(name: str, key: str = EMBEDDING_KEY) -> Path:
    """The local directory for ``name`` (a model alias or a directory); ConfigError naming ``key`` if absent."""
    from shared.models import resolve

    return resolve(name, key)


def load_embedder(name: str, key: str = EMBEDDING_KEY) -> Embedder:
    """The (cached, one per directory) :class:`Embedder` for a model alias or local directory."""
    model_dir = embedding_model_dir(name, key)
    cache_key = str(model_dir.resolve())
    with _EMBEDDERS_LOCK:
        if cache_key not in _EMBEDDERS:
            _EMBEDDERS[cache_key] = Embedder(model_dir, key)
        return _EMBEDDERS[cache_key]


# ------------------------------------------------------------------------------------------------
# compare


def resolve_threshold(kind: str, threshold: float | str) -> float:
    """``threshold`` as a number; ``"auto"`` → :data:`shared.config.COMPARATOR_THRESHOLDS` for ``kind``."""
    if threshold == "auto":
        return COMPARATOR_THRESHOLDS[kind]
    return float(threshold)


def score(kind: str, student: str, reference: str, *, embedding_model: str = "smollm2-135m-instruct",
          normalize_numbers: bool = True) -> float:
    """The ``kind`` similarity of ``student`` to ``reference`` (exact/bleu in [0, 1], semantic in [-1, 1])."""
    if kind == "exact":
        return exact_score(student, reference, normalize_numbers)
    if kind == "bleu":
        return sentence_bleu(student, reference)
    if kind == "semantic":
        return load_embedder(embedding_model).similarity(student, reference)
    raise ValueError(f"comparator kind must be one of {', '.join(KINDS)}, got {kind!r}")


def compare(kind: str, student: str, reference: str, threshold: float | str = "auto", *,
            embedding_model: str = "smollm2-135m-instruct", normalize_numbers: bool = True) -> tuple[float, bool]:
    """``(score, score >= threshold)`` for one answer pair."""
    s = score(kind, student, reference, embedding_model=embedding_model, normalize_numbers=normalize_numbers)
    return s, s >= resolve_threshold(kind, threshold)


def compare_batch(cfg: ComparatorConfig, students: list[str], references: list[str]) -> list[tuple[float, bool]]:
    """:func:`compare` over answer pairs with the config's kind and threshold (semantic: one forward pass)."""
    if len(students) != len(references):
        raise ValueError(f"{len(students)} answers but {len(references)} references")
    threshold = resolve_threshold(cfg.kind, cfg.reward_threshold)
    if cfg.kind == "semantic":
        scores = load_embedder(cfg.embedding_model).similarities(students, references)
    else:
        scores = [score(cfg.kind, s, r, normalize_numbers=cfg.normalize_numbers) for s, r in zip(students, references)]
    return [(s, s >= threshold) for s in scores]


def outcome_reward(cfg: ComparatorConfig, correct: bool) -> float:
    """``reward_correct`` or ``reward_wrong`` (a wrong answer also gets the corrective supervised step)."""
    return cfg.reward_correct if correct else cfg.reward_wrong
