"""Teacher log-probs on the student's tokens when the two models tokenize differently (``teacher.vocabulary = "align"``).

The student sampled token ids ``s_1..s_n``; their text ``y`` is re-tokenized by the teacher's tokenizer into
``t_1..t_m`` and the teacher scores those (after its own rendering of the prompt).  Both are segmentations of
the same characters, so wherever a student token and a teacher token *end at the same character* the two
sequences can be cut.  The pieces between consecutive common cuts are the *groups*: student tokens
``s_a..s_b`` and teacher tokens ``t_c..t_d`` spelling the same text, so::

    S_G = sum_{i=a..b} log p_S(s_i | ...)      T_G = sum_{j=c..d} log p_T(t_j | ...)

are the log-probs of one piece of text under each model (each given the text before it).  Summed over the
groups, ``S_G - T_G`` gives the sequence's log-ratio, whose mean over the student's samples estimates the
reverse KL.  :func:`spread` gives each student token of a group the student's own log-prob plus an equal share of
the group's log-ratio, ``lp_i = log p_S(s_i) + (T_G - S_G) / k`` (``k`` student tokens in the group), so that

- a group of one token on each side is exactly the same-vocabulary estimator (``lp_i = T_G``);
- the per-token reverse-KL terms ``log p_S(s_i) - lp_i = (S_G - T_G) / k`` sum to the group's log-ratio,
  and the teacher log-probs of a group sum to ``T_G``;
- no token of a group gets another token's whole penalty (putting ``T_G`` on the group's last token and 0 on
  the others would reward every earlier token with ``-log p_S(s_i)`` and charge the last with the group).

A teacher token may also say something about the character after it (a pair tokenizer writes a single letter
only before a non-letter); such a cut is dropped by the caller (:func:`merge`, with the tokenizer's probe in
``orchestrator/vocabulary.py``), so that the stop and the letter before it share one group.

Worked example and the estimator's bias: docs/teachers-and-endpoints.md ("A teacher with another vocabulary").

Token ends are found by decoding prefixes (:func:`token_ends`), so any tokenizer works that decodes a prefix
of its ids to a prefix of the text: a token that ends inside a character (one byte of a multi-byte UTF-8
character in a byte-level BPE) decodes to a replacement character there and offers no cut; it joins the
group of the token that completes the character.  Pure Python: no role imports, no tokenizer imports.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

REPLACEMENT = "\ufffd"  # what a decoder writes for an incomplete UTF-8 sequence


@dataclass(frozen=True)
class Group:
    """Student tokens ``[s0, s1)`` and teacher tokens ``[t0, t1)`` that spell the same characters."""

    s0: int
    s1: int
    t0: int
    t1: int

    @property
    def multi(self) -> bool:
        """More than one token on either side (a pair that is not one-to-one)."""
        return self.s1 - self.s0 > 1 or self.t1 - self.t0 > 1


def token_ends(decode: Callable[[list[int]], str], ids: Sequence[int]) -> list[int | None]:
    """The character at which each token ends in ``decode(ids)``: ``len(decode(ids[:i+1]))``, or None where that
    prefix is not a prefix of the whole text (a token ending inside a character).  The last token ends at the
    end of the text.  ``O(n^2)`` decoding, fine for completions of a few hundred tokens."""
    text = decode(list(ids))
    ends: list[int | None] = []
    for i in range(len(ids)):
        prefix = decode(list(ids[: i + 1]))
        clean = text.startswith(prefix) and not (prefix.endswith(REPLACEMENT) and i + 1 < len(ids))
        ends.append(len(prefix) if clean else None)
    if ends:
        ends[-1] = len(text)
    return ends


def boundary_map(student_text: str, teacher_text: str) -> dict[int, int]:
    """Character positions of ``teacher_text`` that are positions of ``student_text`` too, teacher -> student.

    The two are equal unless the teacher's tokenizer cannot spell some of the student's text (a character it
    maps to ``<unk>``, a normalisation): then the longest matching blocks (``difflib``) line them up, every
    position inside or at the edge of a matching block maps, and what lies between two blocks is one region on
    each side, so it ends up in one group (the rest of the completion still aligns token by token)."""
    if student_text == teacher_text:
        return {i: i for i in range(len(student_text) + 1)}
    matcher = difflib.SequenceMatcher(None, student_text, teacher_text, autojunk=False)
    return {b + i: a + i for a, b, size in matcher.get_matching_blocks() for i in range(size + 1)}


def group(student_ends: Sequence[int | None], teacher_ends: Sequence[int | None]) -> list[Group]:
    """Cut both token sequences at every character where a student token and a teacher token both end (after
    the last token ending there, so a token that adds no characters joins the group before it).  Both must
    spell the same text (their last ends equal); every group has at least one token on each side."""
    if not student_ends or not teacher_ends or student_ends[-1] != teacher_ends[-1]:
        raise ValueError(f"the two tokenizations spell different texts ({len(student_ends)} student tokens ending "
                         f"at {student_ends[-1] if student_ends else None}, {len(teacher_ends)} teacher tokens "
                         f"ending at {teacher_ends[-1] if teacher_ends else None})")

    def last_index(ends: Sequence[int | None]) -> dict[int, int]:
        return {e: i for i, e in enumerate(ends) if e is not None}

    s_last, t_last = last_index(student_ends), last_index(teacher_ends)
    out, s0, t0 = [], 0, 0
    for cut in sorted(s_last.keys() & t_last.keys()):
        s1, t1 = s_last[cut] + 1, t_last[cut] + 1
        if s1 > s0 and t1 > t0:  # a cut before either side's previous cut (ends out of order) is skipped
            out.append(Group(s0, s1, t0, t1))
            s0, t0 = s1, t1
    if s0 < len(student_ends) or t0 < len(teacher_ends):  # cannot happen with ordered ends; kept as a guard
        out.append(Group(s0, len(student_ends), t0, len(teacher_ends)))
    return out


def merge(groups: Sequence[Group], closed: Sequence[bool]) -> list[Group]:
    """Join each group to the next where ``closed[i]`` is False (the cut after group ``i`` is not kept)."""
    out: list[Group] = []
    for i, g in enumerate(groups):
        if out and not closed[i - 1]:
            prev = out.pop()
            g = Group(prev.s0, g.s1, prev.t0, g.t1)
        out.append(g)
    return out


def spread(groups: Sequence[Group], teacher_lp: Sequence[float], student_lp: Sequence[float]) -> list[float]:
    """Teacher log-probs on the student's tokens: ``lp_i = student_lp[i] + (T_G - S_G) / k`` for each student
    token ``i`` of group ``G`` (module docstring).  ``teacher_lp``: one per teacher token; ``student_lp``: the
    sampler's, one per student token.  Returns one per student token."""
    out = [0.0] * len(student_lp)
    for g in groups:
        k, t_g = g.s1 - g.s0, sum(teacher_lp[g.t0:g.t1])
        if k == 1:  # exactly T_G (s + (T - s) can differ from T in the last bit)
            out[g.s0] = t_g
            continue
        share = (t_g - sum(student_lp[g.s0:g.s1])) / k
        for i in range(g.s0, g.s1):
            out[i] = student_lp[i] + share
    return out


@dataclass
class AlignStats:
    """Sums over aligned completions, for the step's row (:meth:`row`)."""

    kl_sum: float = 0.0  # sum over groups of S_G - T_G
    student_tokens: int = 0
    teacher_tokens: int = 0
    multi_tokens: int = 0  # student tokens in groups that are not one-to-one
    groups: int = 0
    respelled: int = 0  # completions the teacher's tokenizer spells otherwise (a differing stretch: one group)

    def add(self, groups: Sequence[Group], teacher_lp: Sequence[float], student_lp: Sequence[float]) -> None:
        for g in groups:
            self.kl_sum += sum(student_lp[g.s0:g.s1]) - sum(teacher_lp[g.t0:g.t1])
            self.multi_tokens += (g.s1 - g.s0) if g.multi else 0
        self.groups += len(groups)
        self.student_tokens += len(student_lp)
        self.teacher_tokens += len(teacher_lp)

    def row(self) -> dict[str, float]:
        """``align/kl``: the aligned reverse-KL estimate per student token (sum over groups of ``S_G - T_G``,
        divided by the student tokens); ``align/multi_token_frac``: the fraction of student tokens in groups that
        are not one-to-one; ``align/teacher_per_student``: teacher tokens per student token;
        ``align/respelled``: completions whose text the teacher's tokens spell otherwise (``<unk>``), each
        differing stretch one group (:func:`boundary_map`)."""
        n = max(self.student_tokens, 1)
        return {"align/kl": self.kl_sum / n, "align/multi_token_frac": self.multi_tokens / n,
                "align/teacher_per_student": self.teacher_tokens / n, "align/respelled": float(self.respelled)}
