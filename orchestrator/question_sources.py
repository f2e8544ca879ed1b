"""Where the answer-comparator workflow's questions come from (``orchestrator.comparator.question_source``).

``dataset``
    ``orchestrator.dataset.path`` (JSONL, read with :func:`orchestrator.data.load_jsonl`), cycled with the
    environments' seeded shuffle per epoch.
``generator``
    The environment's own prompts (``orchestrator.environment``; a dataset path, if set, replaces them
    there too).
``teacher``
    The teacher is asked (``question_prompt`` with ``{n}`` = ``num_questions``) to write questions; its reply
    is split by :func:`parse_questions`.  Questions already handed out are not repeated.

Every source has ``next_prompts(n) -> list[Prompt]``.  The teacher's generation is a callable
``generate(messages) -> str`` given by the caller (the orchestrator renders the chat messages with the
teacher's template and asks the teacher role), so this module needs no engine.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from orchestrator.data import Prompt
from orchestrator.environments.base import Environment
from shared.config import ComparatorConfig, Config, ConfigError

# A numbered item: "1.", "1)", "(1)", "1:", "Q1:", "Q1.", "Question 1:", optionally in markdown bold.
_NUMBERED = re.compile(
    r"^\s*(?:[*_]{1,2})?(?:\(\d+\)|(?:q(?:uestion)?\s*)?\d+\s*[.):]|q(?:uestion)?\s*[.:)])(?:[*_]{1,2})?"
    r"(?:\s+|(?=[^\s\d]))(?P<q>.*)$",  # "1.What" is an item, "3.14 is pi" is not
    re.IGNORECASE,
)
_BULLET = re.compile(r"^\s*[-*•+]\s+(?P<q>.*)$")
_EDGES = " \t*_`\"'“”‘’"


def _clean(item: str) -> str:
    return " ".join(item.split()).strip(_EDGES)


def parse_questions(text: str) -> list[str]:
    """Questions in a teacher's reply, in order, without empties or (case/space-insensitive) duplicates.

    Numbered lines (``1. …``, ``2) …``, ``(3) …``, ``Q4: …``, ``Question 5: …``) are taken if there are
    any; else bulleted lines (``- …``, ``* …``, ``• …``); else every line ending in ``?``.  Preambles
    ("Here are five questions:") and, when numbered items exist, bulleted sub-items (answers, notes) are
    therefore ignored.  Markdown emphasis and quotes around an item are removed.
    """
    if not isinstance(text, str):
        return []
    lines = text.splitlines()
    items: list[str] = []
    for pattern in (_NUMBERED, _BULLET):
        items = [m.group("q") for m in map(pattern.match, lines) if m is not None]
        if items:
            break
    else:
        items = [line for line in lines if line.strip().endswith("?")]
    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        q = _clean(item)
        key = q.casefold()
        if q and key not in seen:
            seen.add(key)
            out.append(q)
    return out


def question_request(cfg: ComparatorConfig, n: int | None = None) -> list[dict[str, str]]:
    """The chat messages asking the teacher for ``n`` (default ``num_questions``) questions."""
    return [{"role": "user", "content": cfg.question_prompt.format_map({"n": n or cfg.num_questions})}]


class TeacherQuestions:
    """Questions written by the teacher, buffered; ``generate(messages) -> str`` asks the teacher once.

    A reply with no new question counts in ``empty_replies``; after ``max_empty`` such replies in a row
    a :class:`RuntimeError` says so (the teacher is not following the request).
    """

    def __init__(self, cfg: ComparatorConfig, generate: Callable[[list[dict[str, str]]], str], max_empty: int = 5):
        self.cfg = cfg
        self.generate = generate
        self.max_empty = max_empty
        self.buffer: list[str] = []
        self.seen: set[str] = set()
        self.requests = 0
        self.empty_replies = 0
        self.position = 0

    def add(self, reply: str) -> int:
        """Parse one teacher reply into the buffer; the number of new questions."""
        new = 0
        for q in parse_questions(reply):
            if q.casefold() not in self.seen:
                self.seen.add(q.casefold())
                self.buffer.append(q)
                new += 1
        return new

    def next_prompts(self, n: int) -> list[Prompt]:
        empty_in_a_row = 0
        while len(self.buffer) < n:
            self.requests += 1
            if self.add(self.generate(question_request(self.cfg))) == 0:
                self.empty_replies += 1
                empty_in_a_row += 1
                if empty_in_a_row >= self.max_empty:
                    raise RuntimeError(
                        f"the teacher wrote no new question in {empty_in_a_row} replies in a row "
                        "(check orchestrator.comparator.question_prompt)"
                    )
            else:
                empty_in_a_row = 0
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        self.position += n
        return [Prompt(text=q) for q in out]


class DatasetQuestions(Environment):
    """``orchestrator.dataset.path`` alone, cycled by :meth:`Environment.next_prompts`."""

    name = "dataset"

    def __init__(self, cfg: Config):
        if not cfg.orchestrator.dataset.path:
            raise ConfigError("orchestrator.comparator.question_source: \"dataset\" needs orchestrator.dataset.path")
        super().__init__(cfg)

    def generate(self, rng: random.Random) -> Prompt:  # pragma: no cover - never called with a dataset
        raise AssertionError("DatasetQuestions always has a dataset")


def make_question_source(cfg: Config, generate: Callable[[list[dict[str, str]]], str] | None = None):
    """The configured source: a :class:`DatasetQuestions`, the environment, or a :class:`TeacherQuestions`."""
    source = cfg.orchestrator.comparator.question_source
    if source == "dataset":
        return DatasetQuestions(cfg)
    if source == "generator":
        from orchestrator.environments import make

        return make(cfg)
    if generate is None:
        raise ValueError("question_source = \"teacher\" needs a generate(messages) -> str callable")
    return TeacherQuestions(cfg.orchestrator.comparator, generate)
