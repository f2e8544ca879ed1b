"""Prompt datasets: JSONL files with one ``{"prompt": str, "answer"?: str, "teacher_context"?: ..., "teacher"?: str}``
object per line (``teacher``: which of several named teachers scores the row, orchestrator/teacher_set.py).

``teacher_context`` is what only the teacher sees for this row (self-distillation with privileged
information: the worked solution, the source document): a string, or a list of chat messages
``[{"role": "system"|"user"|"assistant", "content": str}]``; null, ``""`` and ``[]`` mean none.  Where it
goes in the teacher's prompt, and how it combines with the run-wide context: ``orchestrator/prompts.py``.

A file is streamed once (:func:`load_jsonl`): every row is parsed and validated as it goes by, and only
where each good row lies is kept — its byte offset (8 bytes), length and line number (4 bytes each),
and with a ``tag`` one more byte — so a file of N good rows costs ~16 N bytes of memory, whatever the
length of its prompts (10^6 rows of ~200 bytes: ~16 MB of index for a 200 MB file; the measured peak
RSS is in ``benchmarks/results/data_scale_*.md``).  A row is read back from the file when it is drawn
(one ``pread`` and one ``json.loads``), and a file changed since it was loaded is refused, never read
at the wrong place.  ``sha256`` of the bytes is taken on the same pass (``Dataset.digest``): a resumed
run checks it before it continues at its saved data position.

Drawing: :func:`epoch_order` is the seeded permutation of one epoch, computed once per epoch (the
environment caches it), so the ``k``-th prompt is ``rows[order(k // N)[k % N]]``: O(1) per prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from array import array
from collections.abc import Callable, Sequence
from typing import Any, overload

from msgspec import Struct

from shared.config import ConfigError

EPOCH_SEED = 1_000_003  # the epoch's shuffle is seeded with seed * EPOCH_SEED + epoch (unchanged since v1)


class Prompt(Struct, kw_only=True):
    text: str
    answer: str | None = None
    meta: dict[str, Any] | None = None  # what an environment needs to score it (e.g. a reasoning-gym entry)
    env: str = ""  # the environment that drew it when it is not the run's own (a continual replay's core)
    # what only the teacher sees for this prompt (a string or chat messages); None = the run-wide context alone
    teacher_context: str | list[dict[str, str]] | None = None
    teacher: str = ""  # the row's "teacher" field: which of [teachers.NAME] scores it (teacher_route.by = "column")


CONTEXT_ROLES = ("system", "user", "assistant")


class DatasetError(ConfigError):
    """A dataset problem; the message names the file (and line)."""


def row_problem(row: Any) -> str | None:
    """Why a parsed JSON value is not a prompt row, or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if "prompt" not in row:
        return "missing field 'prompt'"
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        return "'prompt' must be a non-empty string"
    if "answer" in row and row["answer"] is not None and not isinstance(row["answer"], str):
        return "'answer' must be a string"
    if "teacher" in row and row["teacher"] is not None and not isinstance(row["teacher"], str):
        return "'teacher' must be a string (a name of [teachers.NAME])"
    return context_problem(row.get("teacher_context"))


def context_problem(ctx: Any) -> str | None:
    """Why a row's ``teacher_context`` is malformed, or None (absent, a string, or a list of messages)."""
    if ctx is None or isinstance(ctx, str):
        return None
    if not isinstance(ctx, list):
        return f"'teacher_context' must be a string or a list of chat messages, got {type(ctx).__name__}"
    for i, m in enumerate(ctx):
        where = f"'teacher_context'[{i}]"
        if not isinstance(m, dict):
            return f"{where} must be an object {{\"role\", \"content\"}}, got {type(m).__name__}"
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            return f"{where}: unknown field {extra[0]!r} (a message has only 'role' and 'content')"
        if m.get("role") not in CONTEXT_ROLES:
            return f"{where}: 'role' must be one of {', '.join(CONTEXT_ROLES)}, got {m.get('role')!r}"
        if not isinstance(m.get("content"), str):
            return f"{where}: 'content' must be a string"
    return None


def parse_row(line: str) -> tuple[Prompt | None, str | None]:
    """``(prompt, None)`` for a good line, ``(None, problem)`` for a bad one."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError) as e:  # also: an integer of > 4300 digits, nesting too deep
        return None, f"not valid JSON ({getattr(e, 'msg', e)})"
    problem = row_problem(row)
    if problem:
        return None, problem
    context = row.get("teacher_context") or None  # "" and [] are no context
    return Prompt(text=row["prompt"], answer=row.get("answer"), teacher_context=context,
                  teacher=row.get("teacher") or ""), None


BAD_LINES_KEPT = 5  # line numbers of skipped rows kept, to name them (orchestrator/skips.py)


class Dataset(Sequence[Prompt]):
    """The good rows of a JSONL file, read back by byte offset (see the module docstring).

    ``dataset[i]`` is the i-th good row; ``lines[i]`` its 1-based line number; ``tags[i]`` the value of
    the loader's ``tag`` for it (0/1), when one was given; ``bad`` the rows skipped, ``bad_lines`` the line
    numbers of the first :data:`BAD_LINES_KEPT` of them.
    """

    bad_lines: list[int] = []

    def __init__(self, path: str, offsets: array, lengths: array, lines: array, tags: bytearray | None,
                 bad: int, digest: str, stamp: tuple[int, int]):
        self.path, self.offsets, self.lengths, self.lines, self.tags = path, offsets, lengths, lines, tags
        self.bad, self.digest, self._stamp = bad, digest, stamp
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    @overload
    def __getitem__(self, i: int) -> Prompt: ...
    @overload
    def __getitem__(self, i: slice) -> list[Prompt]: ...
    def __getitem__(self, i: int | slice) -> Prompt | list[Prompt]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        fd = self._open()
        st = os.fstat(fd)  # ~1 us: a file rewritten in place is refused, not read at the wrong offsets
        raw = os.pread(fd, self.lengths[i], self.offsets[i]) if (st.st_size, st.st_mtime_ns) == self._stamp else b""
        prompt, _ = parse_row(raw.decode("utf-8", "replace")) if len(raw) == self.lengths[i] else (None, None)
        if prompt is None:
            raise DatasetError(f"{self.path}:{self.lines[i]}: the file changed since it was loaded; restart the run")
        return prompt

    def raw(self, i: int) -> bytes:
        """Row ``i``'s line as it is in the file, ending in one ``\\n``."""
        return os.pread(self._open(), self.lengths[i], self.offsets[i]).rstrip(b"\r\n") + b"\n"

    def select(self, tag: int) -> DatasetView:
        """The rows whose tag is ``tag``, in file order."""
        assert self.tags is not None, "load_jsonl(..., tag=...) was not given"
        return DatasetView(self, array("I", (i for i, t in enumerate(self.tags) if t == tag)))

    def _open(self) -> int:
        if self._fd is None:
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise DatasetError(f"{self.path}: cannot reopen ({e.strerror or e})") from None
            self._fd = fd
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:  # the descriptor stays behind; the copy opens its own
        return {**self.__dict__, "_fd": None}


class DatasetView(Sequence[Prompt]):
    """Some rows of a :class:`Dataset` by index (e.g. the training split), 4 bytes each."""

    def __init__(self, base: Dataset, index: array):
        self.base, self.index = base, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self.base[self.index[j]] for j in range(*i.indices(len(self)))]
        return self.base[self.index[i]]


def load_jsonl(
    path: str, on_bad_row: str = "error", check: Callable[[Prompt], str | None] | None = None,
    tag: Callable[[Prompt], bool] | None = None,
) -> tuple[Dataset, int]:
    """The good rows of ``path`` and the number of bad rows skipped (always 0 with ``on_bad_row="error"``).

    ``check`` (an environment's own rule, e.g. "needs an answer") returns a problem for a row, or None;
    ``tag`` labels each good row 0/1 on the same pass (:meth:`Dataset.select`).  Lines end at ``\\n`` only
    (``str.splitlines`` would also break at U+2028/U+0085, which JSON allows inside strings); a blank line
    is no row.  One pass over the file; memory ~16 bytes per good row.
    """
    offsets, lengths, lines = array("q"), array("I"), array("I")
    tags = bytearray() if tag is not None else None
    bad, bad_lines = 0, []
    sha = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            offset = 0
            for lineno, raw in enumerate(f, start=1):
                sha.update(raw)
                start, offset = offset, offset + len(raw)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DatasetError(f"orchestrator.dataset.path: {path}: cannot read (line {lineno}: "
                                       f"UnicodeDecodeError: {e})") from None
                if not line.strip():
                    continue
                prompt, problem = parse_row(line)
                if prompt is not None and check is not None:
                    problem = check(prompt)
                if problem is not None:
                    if on_bad_row == "error":
                        raise DatasetError(
                            f"{path}:{lineno}: {problem} (set orchestrator.dataset.on_bad_row = \"skip\" to skip)")
                    bad += 1
                    if len(bad_lines) < BAD_LINES_KEPT:
                        bad_lines.append(lineno)
                    continue
                offsets.append(start)
                lengths.append(len(raw))
                lines.append(lineno)
                if tags is not None:
                    tags.append(bool(tag(prompt)))
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(f"orchestrator.dataset.path: {path}: file not found") from None
    except (OSError, ValueError) as e:  # a directory, no permission; ValueError: a NUL byte in the path
        raise DatasetError(f"orchestrator.dataset.path: {path}: cannot read ({type(e).__name__}: {e})") from None
    if not offsets:
        raise DatasetError(f"{path}: no usable prompts ({bad} bad rows)")
    stamp = (st.st_size, st.st_mtime_ns)
    dataset = Dataset(path, offsets, lengths, lines, tags, bad, "sha256:" + sha.hexdigest(), stamp)
    dataset.bad_lines = bad_lines
    return dataset, bad


def epoch_order(seed: int, epoch: int, n: int) -> array:
    """The order of rows ``0..n-1`` in ``epoch``: ``random.Random(seed * EPOCH_SEED + epoch).shuffle`` of
    ``range(n)`` (the same draws as every earlier version, which shuffled a list: ``shuffle`` swaps by index
    whatever the container), done in place on 4-byte ints.  O(n), once per epoch."""
    order = array("I", range(n))
    random.Random(seed * EPOCH_SEED + epoch).shuffle(order)  # type: ignore[arg-type]
    return order


class EpochOrder:
    """``draw(position)``: the row index of the ``position``-th prompt of a stream over ``n`` rows; the
    permutation of the current epoch is kept, so consecutive draws cost O(1) (a new epoch: O(n) once).
    Stateless apart from that cache: the position alone (checkpointed) says where the stream is."""

    def __init__(self, seed: int, n: int):
        self.seed, self.n = seed, n
        self.epoch, self.order = -1, array("I")

    def draw(self, position: int) -> int:
        epoch, i = divmod(position, self.n)
        if epoch != self.epoch:
            self.epoch, self.order = epoch, epoch_order(self.seed, epoch, self.n)
        return self.order[i]
