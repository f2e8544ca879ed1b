"""The teacher's vocabulary against the student's (``teacher.vocabulary``): one module, so nothing else asks.

``"same"``: the teacher scores the student's own token ids; preflight checks the two vocabularies are equal
and their templates agree (``shared/models.py``, ``shared/chat_templates.py``).

``"align"``: another vocabulary.  For each completion to score (:meth:`Aligned.to_teacher`), the teacher gets its
own rendering of the prompt (the chat messages the student's prompt was rendered from, through the teacher's
template; plain text without one) followed by the completion's text re-tokenized by the teacher's tokenizer
(tokenized on its own, as the student sampled it: no merge across the prompt/completion boundary).  A trailing
end-of-sequence token is not text: it becomes the teacher's
``eos_token_id``, a group of its own.  The teacher's log-probs come back per teacher token and
:meth:`Aligned.to_student` maps them onto the student's tokens by character spans (``shared/align.py``), so the
advantage and ``teacher_kl`` downstream are unchanged.  Both the in-cluster engine and a ``vllm serve``
endpoint score token ids, so both work unchanged (the endpoint's tokenizer is probed against the local
teacher tokenizer, as before).

The step's row gets ``align/*`` (:class:`shared.align.AlignStats`) over the completions mapped since the last row.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from shared import align
from shared.config import Config, ConfigError

LogProbs = list[list[float] | None]


class SameVocabulary:
    """The teacher reads the student's token ids: nothing to translate."""

    def to_teacher(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> tuple[list, list]:
        return prompt_ids, completion_ids

    def to_student(self, completion_ids: list[list[int]], teacher_lp: LogProbs,
                   student_lp: list[list[float]] | None = None) -> LogProbs:
        return teacher_lp

    def metrics(self) -> dict[str, float]:
        return {}


class Aligned:
    """Another vocabulary: re-tokenize, score, map back by character spans (module docstring)."""

    def __init__(self, cfg: Config, student_dir: str, teacher_dir: str, student_tok: Any = None,
                 teacher_tok: Any = None):
        self.cfg, self.student_dir, self.teacher_dir = cfg, student_dir, teacher_dir
        self._s, self._t = student_tok, teacher_tok
        self.stats = align.AlignStats()

    @property
    def s_tok(self) -> Any:
        if self._s is None:
            from transformers import AutoTokenizer

            self._s = AutoTokenizer.from_pretrained(self.student_dir)
        return self._s

    @property
    def t_tok(self) -> Any:
        if self._t is None:
            from transformers import AutoTokenizer

            self._t = AutoTokenizer.from_pretrained(self.teacher_dir)
        return self._t

    # -- the teacher's view ------------------------------------------------------------------------------
    def teacher_prompt(self, ids: list[int]) -> list[int]:
        """The prompt through the teacher's own template (chat messages kept by ``orchestrator.prompts.ChatIds``);
        a bare id list (no messages) is decoded by the student and re-encoded by the teacher."""
        from orchestrator.prompts import render_messages

        messages = getattr(ids, "messages", None)
        if messages is None:
            return self.t_tok(self.s_tok.decode(list(ids)), add_special_tokens=False).input_ids
        chat = self.cfg.model.chat_template != "off" and bool(getattr(self.t_tok, "chat_template", None))
        return render_messages(self.t_tok, messages, chat)

    def _split(self, completion: list[int]) -> tuple[list[int], bool]:
        """The completion's text tokens, and whether it stopped at the student's EOS (mapped to the teacher's)."""
        stops = bool(completion) and completion[-1] == self.s_tok.eos_token_id
        return (completion[:-1], True) if stops else (completion, False)

    def _decode_s(self, ids: list[int]) -> str:
        return self.s_tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _decode_t(self, ids: list[int]) -> str:
        return self.t_tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _teacher_body(self, completion: list[int]) -> tuple[list[int], str, list[int], bool]:
        """(the student's text tokens, their text, the teacher's tokens of that text, whether it stopped at EOS)."""
        body, stops = self._split(completion)
        text = self._decode_s(body)
        return body, text, self.t_tok(text, add_special_tokens=False).input_ids if text else [], stops

    def teacher_ids(self, completion: list[int]) -> list[int]:
        """The teacher's tokens of the completion (its EOS for the student's)."""
        _, _, t_body, stops = self._teacher_body(completion)
        return t_body + ([self.t_tok.eos_token_id] if stops else [])

    def teacher_completion(self, completion: list[int]) -> tuple[list[int], list[align.Group], bool]:
        """The teacher's tokens of the completion, the groups, and whether the teacher's tokens spell another text
        than the student's (a character the teacher cannot spell: the differing stretch is one group,
        :func:`shared.align.boundary_map`)."""
        body, text, t_body, stops = self._teacher_body(completion)
        t_ids = t_body + ([self.t_tok.eos_token_id] if stops else [])
        t_text = self._decode_t(t_body)
        if body and t_body:
            to_s = align.boundary_map(text, t_text)
            t_ends = [to_s.get(e) if e is not None else None for e in align.token_ends(self._decode_t, t_body)]
            groups = align.group(align.token_ends(self._decode_s, body), t_ends)
        else:  # one side spells nothing: one group (or none)
            groups = [align.Group(0, len(body), 0, len(t_body))] if body or t_body else []
        if stops:
            groups.append(align.Group(len(body), len(body) + 1, len(t_body), len(t_body) + 1))
        if body and t_body:
            s_ends = align.token_ends(self._decode_s, body)
            groups = align.merge(groups, [self._closed(text, s_ends[g.s1 - 1], t_body[:g.t1]) for g in groups[:-1]])
        return t_ids, groups, t_text != text

    def _closed(self, text: str, cut: int | None, t_prefix: list[int]) -> bool:
        """Whether the teacher's tokens up to character ``cut`` stay the same when another character follows
        (the last one again): if not, the teacher's last token there says something about the next character
        (a pair tokenizer writes a single letter only before a non-letter), so the cut is not kept."""
        if cut is None or cut == 0:
            return False
        probe = self.t_tok(text[:cut] + text[cut - 1], add_special_tokens=False).input_ids
        return probe[:len(t_prefix)] == t_prefix

    # -- the interface ----------------------------------------------------------------------------------
    def to_teacher(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> tuple[list, list]:
        return ([self.teacher_prompt(p) for p in prompt_ids],
                [self.teacher_ids(list(c)) for c in completion_ids])

    def to_student(self, completion_ids: list[list[int]], teacher_lp: LogProbs,
                   student_lp: list[list[float]] | None = None) -> LogProbs:
        """``teacher_lp`` (per teacher token, None where unscored) onto the student's tokens.  ``student_lp``: the
        sampler's log-probs of each completion; without them (a scorer that has none) a group's teacher log-prob
        is split evenly over its student tokens."""
        out: LogProbs = []
        for i, (completion, tlp) in enumerate(zip(completion_ids, teacher_lp)):
            if tlp is None:
                out.append(None)
                continue
            completion = list(completion)
            _, groups, differs = self.teacher_completion(completion)
            self.stats.respelled += differs
            slp = list(student_lp[i]) if student_lp is not None else [0.0] * len(completion)
            out.append(align.spread(groups, tlp, slp))
            if student_lp is not None:
                self.stats.add(groups, tlp, slp)
        return out

    def metrics(self) -> dict[str, float]:
        """The ``align/*`` entries over the completions mapped since the last call (then reset)."""
        if not self.stats.student_tokens:
            return {}
        row, self.stats = self.stats.row(), align.AlignStats()
        return row


def make(cfg: Config, student_dir: str, teacher_dir: str) -> SameVocabulary | Aligned:
    """The one place that reads ``teacher.vocabulary``."""
    return Aligned(cfg, student_dir, teacher_dir) if cfg.teacher.vocabulary == "align" else SameVocabulary()


def preflight(cfg: Config, student: Path, teacher: Path, s_tok: Any, t_tok: Any, prompts: list[str]) -> None:
    """Before any engine starts.  ``same``: one vocabulary and agreeing templates (one-line ConfigErrors).
    ``align``: both tokenizers decode what they encode (character spans need it), checked on ``prompts``."""
    from shared import chat_templates, models

    if cfg.teacher.vocabulary == "same":
        models.check_same_vocab(student, teacher, s_tok, t_tok)
        chat_templates.check(cfg, s_tok, t_tok, prompts)
        return
    for text in prompts:
        for key, path, tok in (("model.name", student, s_tok), ("teacher.name", teacher, t_tok)):
            back = tok.decode(tok(text, add_special_tokens=False).input_ids, skip_special_tokens=False,
                              clean_up_tokenization_spaces=False)
            if back != text:
                raise ConfigError(f"{key}: the tokenizer in {path} does not decode what it encodes ({text[:40]!r} -> "
                                  f"{back[:40]!r}); teacher.vocabulary = \"align\" maps log-probs by characters")
    if t_tok.eos_token_id is None:
        raise ConfigError(f"teacher.name: the tokenizer in {teacher} has no eos_token; teacher.vocabulary = \"align\" "
                          "maps the student's end of sequence to it")
    print(f"teacher.vocabulary = \"align\": {teacher} ({len(t_tok)} tokens) scores the student's completions "
          f"re-tokenized ({student}: {len(s_tok)} tokens)", file=sys.stderr)
