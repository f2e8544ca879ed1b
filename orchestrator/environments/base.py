"""The environment interface, and the held-out split shared by the generated environments.

An environment yields training prompts (``next_prompts``; seeded by ``cfg.seed``), a held-out set of
evaluation prompts that never appears in training (``eval_prompts``), and scores a completion in
[0, 1] (``score``; 1 = correct).  A subclass implements ``generate`` (one training prompt from the
run's random stream), ``eval_prompts`` and ``grade``; :class:`GeneratedEnvironment` derives both
from a single ``sample`` function and a stable hash split.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence

from orchestrator.data import EpochOrder, Prompt, load_jsonl
from shared.answers import match_answer
from shared.config import Config, ConfigError

HELDOUT_EVERY = 5  # a generated prompt is held out when the hash of its text is 0 mod this (~20%)
HELDOUT_SEED = 12345  # the evaluation stream: the same held-out prompts for every cfg.seed
MAX_DRAWS = 20_000  # draws without a usable prompt before a generator counts as exhausted


def is_heldout(text: str, every: int = HELDOUT_EVERY) -> bool:
    """Whether a prompt text belongs to the held-out split (stable across runs and machines)."""
    return int(hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(), 16) % every == 0


class Environment:
    """Yields training prompts (cycling with a seeded shuffle), held-out eval prompts, and scores.

    ``orchestrator.dataset.path`` replaces the generated training prompts with a JSONL file; rows
    that this environment cannot score (``row_problem``) are bad rows, named by file:line.  The file's
    rows are drawn epoch by epoch, each epoch a seeded permutation (:class:`orchestrator.data.EpochOrder`),
    so the stream's state is ``position`` alone (and ``data_digest``: the file a resumed run continues in).
    """

    name = "base"
    needs_answer = False  # dataset rows must carry an "answer" (the environment scores against it)
    split_heldout = False  # tag dataset rows by is_heldout on the loading pass (exact_answer evaluates on them)

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.answers = list(cfg.orchestrator.env_args.answers)
        self.rng = random.Random(cfg.seed)
        self.bad_rows = 0
        self.dataset: list[Prompt] | None = None
        if cfg.orchestrator.dataset.path:
            self.dataset, self.bad_rows = load_jsonl(
                cfg.orchestrator.dataset.path, cfg.orchestrator.dataset.on_bad_row, check=self.row_problem,
                tag=(lambda p: is_heldout(p.text)) if self.split_heldout else None,
            )
        self.position = 0  # prompts handed out so far (for resume)
        self._order: EpochOrder | None = None

    # -- to implement --------------------------------------------------------------------------
    def generate(self, rng: random.Random) -> Prompt:
        raise NotImplementedError

    def eval_prompts(self, n: int) -> list[Prompt]:
        raise NotImplementedError

    def grade(self, prompt: Prompt, completion: str) -> float:
        """The environment's own score of ``completion`` (after the answer-set mapping), in [0, 1]."""
        raise NotImplementedError

    def eval_metrics(self, scored: Sequence[tuple[Prompt, str]]) -> dict[str, float]:
        """Extra evaluation scores over ``(prompt, completion)`` pairs, logged as ``eval/<name>/<key>`` beside
        ``eval/<name>/avg`` (none by default; ``running_sum`` adds its exact and partial scores)."""
        return {}

    # -- shared ----------------------------------------------------------------------------------
    def row_problem(self, prompt: Prompt) -> str | None:
        """Why a dataset row cannot be used here, or None."""
        if self.needs_answer and prompt.answer is None:
            return f"missing field 'answer' (the {self.name} environment scores against it)"
        if self.answers and prompt.answer is not None and prompt.answer.strip() not in {a.strip() for a in self.answers}:
            return f"'answer' {prompt.answer!r} is not one of orchestrator.env_args.answers"
        return None

    def score(self, prompt: Prompt, completion: str) -> float:
        """``grade`` in [0, 1]; with ``answers`` the completion first becomes an allowed answer (none: 0)."""
        if self.answers:
            choice = match_answer(completion, self.answers, self.cfg.orchestrator.env_args.answer_match)
            if choice is None:
                return 0.0
            completion = choice
        value = float(self.grade(prompt, completion))
        return 0.0 if math.isnan(value) else min(1.0, max(0.0, value))

    def training_rows(self) -> Sequence[Prompt]:
        """The dataset rows that training cycles over (all of them here)."""
        assert self.dataset is not None
        return self.dataset

    def next_prompts(self, n: int) -> list[Prompt]:
        """The next ``n`` training prompts: the file's rows in a seeded order per epoch, else generated."""
        out = []
        rows = self.training_rows() if self.dataset is not None else None
        if rows is not None and (self._order is None or self._order.n != len(rows)):
            self._order = EpochOrder(self.cfg.seed, len(rows))
        for _ in range(n):
            out.append(rows[self._order.draw(self.position)] if rows is not None else self.generate(self.rng))
            self.position += 1
        return out

    @property
    def data_digest(self) -> str:
        """The dataset file's sha256 ("" without one); part of the checkpointed state."""
        return self.dataset.digest if self.dataset is not None else ""

    @data_digest.setter
    def data_digest(self, saved: str) -> None:
        """Restoring a checkpoint: its data position means nothing in another file, so refuse one."""
        if saved != self.data_digest:
            raise ConfigError(f"resume: orchestrator.dataset.path: {self.cfg.orchestrator.dataset.path or '(none)'} "
                              f"is not the data the checkpoint was written with ({self.data_digest or 'no file'} vs "
                              f"{saved or 'no file'}); resume with the same file")


class GeneratedEnvironment(Environment):
    """Prompts drawn by ``sample(rng)``; a stable hash of the text splits them into training and held-out.

    Training draws from the run's stream (``cfg.seed``) and skips held-out texts; evaluation takes the
    first ``n`` distinct held-out texts of a fixed stream (``HELDOUT_SEED``), so the two never meet,
    and ``eval_prompts(n)`` is a prefix of ``eval_prompts(m)`` for ``m > n``.  A small prompt space
    gives fewer than ``n`` evaluation prompts; one with no training prompt at all is a ConfigError.
    """

    config_key = "orchestrator.environment"  # named in the error of an exhausted generator

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self._eval: list[Prompt] = []  # the longest held-out list drawn so far
        self._eval_exhausted = False  # the held-out split has no more distinct prompts

    def sample(self, rng: random.Random) -> Prompt:
        raise NotImplementedError

    def generate(self, rng: random.Random) -> Prompt:
        for _ in range(MAX_DRAWS):
            p = self.sample(rng)
            if not is_heldout(p.text):
                return p
        raise ConfigError(f"{self.config_key}: {self.name}: no training prompt in {MAX_DRAWS} draws "
                          "(every prompt drawn is held out; widen the prompt space)")

    def eval_prompts(self, n: int) -> list[Prompt]:
        if len(self._eval) < n and not self._eval_exhausted:
            rng = random.Random(HELDOUT_SEED)
            seen: dict[str, Prompt] = {}
            misses = 0
            while len(seen) < n and misses < MAX_DRAWS:
                p = self.sample(rng)
                if is_heldout(p.text) and p.text not in seen:
                    seen[p.text] = p
                    misses = 0
                else:
                    misses += 1
            self._eval, self._eval_exhausted = list(seen.values()), len(seen) < n
        return self._eval[:n]

