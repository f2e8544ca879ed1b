"""Do the student's and the teacher's templates agree on the parts both must share?  (preflight)

On-policy scoring hands the teacher the student's prompt and completion token ids.  Two things in them
are written by the student's template and tokenizer but must mean the same to the teacher:

1. the end-of-sequence token the completion stops at (``eos_token``), and, with chat templates,
   the text that ends an assistant turn (``<|im_end|>`` in ChatML, ``<|eot_id|>`` in Llama 3);
2. with chat templates, the generation prompt: the text between the prompt and the completion
   (``<|im_start|>assistant\\n``), i.e. where the completion starts.

If they differ, the teacher scores a turn that ends or begins in a foreign way: it puts near-zero
probability on the student's stop token, the student is pulled away from ever stopping, and lengths
explode or the completion repeats, with no error anywhere.  :func:`mismatch` renders a few prompts
through both templates and returns the first difference as one line (or None); the launcher raises it
unless ``teacher.allow_template_mismatch`` is set (then it is a warning).

The same vocabulary is checked before this (``shared/models.py``), so equal strings mean equal ids.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from shared.config import Config, ConfigError
from shared.runtime import first_line

MARK = "OPD-TEMPLATE-PROBE"  # the assistant's text in the probe turn; what follows it ends the turn


def first_difference(a: str, b: str) -> str:
    """``"character i: 'x' vs 'y'"`` for the first position where ``a`` and ``b`` differ (one may end first)."""
    i = len(os.path.commonprefix([a, b]))
    return f"character {i}: {a[i:i + 1]!r} vs {b[i:i + 1]!r}"


def generation_prompt(tok: Any, text: str) -> str:
    """The text the template adds after the user turn ``text`` for the reply to start: what
    ``add_generation_prompt=True`` renders beyond ``False`` (ChatML: ``'<|im_start|>assistant\\n'``)."""
    messages = [{"role": "user", "content": text}]
    with_gp = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    without = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return with_gp[len(os.path.commonprefix([with_gp, without])):]


def turn_end(tok: Any, text: str) -> str:
    """What the template writes after an assistant reply (whitespace stripped; ChatML: ``'<|im_end|>'``)."""
    messages = [{"role": "user", "content": text}, {"role": "assistant", "content": MARK}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    return rendered[rendered.rindex(MARK) + len(MARK):].strip() if MARK in rendered else ""


def mismatch(student_tok: Any, teacher_tok: Any, chat: bool, prompts: list[str],
             student: str = "model.name", teacher: str = "teacher.name") -> str | None:
    """The first shared part on which the two tokenizers' templates disagree, as one line; None if none.

    ``chat``: whether the student's prompts are rendered through its chat template (without one, only the
    end-of-sequence tokens are compared).  ``student`` / ``teacher`` name the models in the message."""
    if (student_tok.eos_token or "") != (teacher_tok.eos_token or ""):
        return (f"{teacher}: its tokenizer ends a sequence with {teacher_tok.eos_token!r} but {student}'s with "
                f"{student_tok.eos_token!r} (first difference at "
                f"{first_difference(teacher_tok.eos_token or '', student_tok.eos_token or '')})")
    if not chat:
        return None
    if not getattr(teacher_tok, "chat_template", None):
        return (f"{teacher}: has no chat template, but the prompts are rendered with {student}'s "
                "(set model.chat_template = \"off\" to use plain text for both)")
    parts = (("ends a turn", "with", turn_end), ("starts the completion", "after", generation_prompt))
    for text in prompts:
        for what, prep, part in parts:
            try:
                s, t = part(student_tok, text), part(teacher_tok, text)
            except Exception as e:  # a template that cannot render a plain user/assistant exchange
                return f"{teacher} or {student}: the chat template cannot render a user turn ({first_line(e, 200)})"
            if s != t:
                return (f"{teacher}: its chat template {what} {prep} {t!r} but {student}'s {prep} {s!r} "
                        f"(first difference at {first_difference(t, s)})")
    return None


def check(cfg: Config, student_tok: Any, teacher_tok: Any, prompts: list[str]) -> None:
    """Preflight: a template mismatch (:func:`mismatch`) is a ConfigError, or a warning on stderr with
    ``teacher.allow_template_mismatch = true``."""
    # "on" without a template is the renderer's error (launcher.check_prompt_lengths), named by its key
    chat = bool(getattr(student_tok, "chat_template", None)) and cfg.model.chat_template != "off"
    found = mismatch(student_tok, teacher_tok, chat, prompts or ["Hello"],
                     f"model.name ({cfg.model.name})", f"teacher.name ({cfg.teacher.name})")
    if found is None:
        return
    if cfg.teacher.allow_template_mismatch:
        print(f"warning: {found}; distilling anyway (teacher.allow_template_mismatch = true)", file=sys.stderr)
        return
    raise ConfigError(f"{found}; the teacher would score the student's turns in a foreign format. Use a teacher "
                      "with the student's template, or set teacher.allow_template_mismatch = true")
