"""Prompt → token ids for the student and for the teacher (who may also see an extra context).

With a chat template the prompt is one user turn; the teacher's context goes in as a prefix of that
turn (``user_prefix``), as a system message (``system``), or as few-shot turns before it (``fewshot``).
Without a chat template the prompt text is used as is and the context is prepended to it.
Both sides otherwise get identical text (e.g. the same default system message), so the only
difference the student is pulled towards is the context's effect.

Two contexts can apply to one prompt: the run-wide one (``orchestrator.teacher_model``) and the
prompt's own (``Prompt.teacher_context``: a dataset row's, or one an environment made, e.g. the worked
solution of an arithmetic item).  Both are used, the run-wide one first (it frames, the prompt's own is
closer to the question), in the teacher's view of ``[system] [shots] [own turns] user``:

==================  =====================================  ==============================================
``context_mode``    run-wide ``context``                   the prompt's own string
==================  =====================================  ==============================================
``user_prefix``     ``"{run} {own} {prompt}"``             after the run-wide prefix
``system``          the system message                     the same system message, after a blank line
``fewshot``         (``context_messages``: turns first)    a prefix of the user turn: ``"{own} {prompt}"``
==================  =====================================  ==============================================

The prompt's own list of chat messages goes in as turns right before the user turn, whatever the mode
(after the run-wide system message and shots).  Without a chat template the teacher's text is
``run + own + prompt`` (a list's contents joined by blank lines, then a blank line).  The student's view
never contains either context: its ids are those of the prompt alone.
"""

from __future__ import annotations

from typing import Any

from orchestrator.data import Prompt
from shared.config import ConfigError, TeacherModelConfig


class Renderer:
    def __init__(self, tokenizer: Any, chat_template: str, context: TeacherModelConfig):
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template == "on" and not has_template:
            raise ConfigError("model.chat_template: \"on\" but the student's tokenizer has no chat template")
        if context.context_mode in ("system", "fewshot") and not has_template:
            raise ConfigError(
                f"orchestrator.teacher_model.context_mode: {context.context_mode!r} needs a chat template, "
                "and the tokenizer has none (use \"user_prefix\")"
            )
        self.tok = tokenizer
        self.chat = has_template if chat_template == "auto" else chat_template == "on"
        self.context = context

    def _messages(self, prompt: Prompt, with_context: bool) -> list[dict[str, str]]:
        """The chat turns of ``prompt``: its user turn, and for the teacher both contexts (module docstring)."""
        if not with_context:
            return [{"role": "user", "content": prompt.text}]
        run, own = self.context, prompt.teacher_context
        mode = run.context_mode
        own_text = own if isinstance(own, str) else ""
        if mode == "system":
            system, prefix = [c for c in (run.context, own_text) if c], []
        else:  # fewshot: the run-wide context is its turns, not a prefix
            system, prefix = [], [c for c in (run.context if mode == "user_prefix" else "", own_text) if c]
        turns = [{"role": "system", "content": "\n\n".join(system)}] if system else []
        if mode == "fewshot":
            turns += [{"role": m.role, "content": m.content} for m in run.context_messages]
        if isinstance(own, list):
            turns += [{"role": m["role"], "content": m["content"]} for m in own]
        return turns + [{"role": "user", "content": " ".join([*prefix, prompt.text])}]

    def _plain_text(self, prompt: Prompt, with_context: bool) -> str:
        """Without a chat template: the prompt text, after the run-wide and the prompt's own context."""
        if not with_context:
            return prompt.text
        own = prompt.teacher_context
        if isinstance(own, list):
            own = "\n\n".join(m["content"] for m in own) + "\n\n"
        return f"{self.context.context}{own or ''}{prompt.text}"

    def ids(self, prompt: Prompt, teacher: bool = False) -> "ChatIds":
        if self.chat:
            messages = self._messages(prompt, teacher)
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return ChatIds(self.tok(text, add_special_tokens=False).input_ids, messages)
        text = self._plain_text(prompt, teacher)
        return ChatIds(self.tok(text).input_ids, [{"role": "user", "content": text}])

    def teacher_differs(self, prompt: Prompt) -> bool:
        """Whether the teacher's view of ``prompt`` differs from the student's (some context applies)."""
        return self.has_context or bool(prompt.teacher_context)

    @property
    def has_context(self) -> bool:
        return bool(self.context.context or self.context.context_messages)


class ChatIds(list):
    """Token ids of a rendered prompt that remember the chat ``messages`` they were rendered from, so a
    teacher behind a chat API (``teacher.endpoint_api = "chat"``) gets the messages instead of ids."""

    def __init__(self, ids: list[int], messages: list[dict[str, str]]):
        super().__init__(ids)
        self.messages = messages

    def __reduce__(self):  # pickled (Ray) with its messages
        return (ChatIds, (list(self), self.messages))


def render_messages(tokenizer: Any, messages: list[dict[str, str]], chat: bool) -> list[int]:
    """Token ids of chat ``messages``: the tokenizer's chat template (generation prompt added), or without
    one the contents joined by blank lines as plain text."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return ChatIds(tokenizer(text, add_special_tokens=False).input_ids, messages)
    return ChatIds(tokenizer("\n\n".join(m["content"] for m in messages)).input_ids, messages)
