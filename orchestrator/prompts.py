"""Prompt → token ids for the student and for the teacher (who may also see an extra context).

With a chat template the prompt is one user turn; the teacher's context goes in as a prefix of that
turn (``user_prefix``), as a system message (``system``), or as few-shot turns before it (``fewshot``).
Without a chat template the prompt text is used as is and the context is prepended to it.
Both sides otherwise get identical text (e.g. the same default system message), so the only
difference the student is pulled towards is the context's effect.
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

    def _messages(self, text: str, with_context: bool) -> list[dict[str, str]]:
        ctx = self.context
        if not with_context or (not ctx.context and not ctx.context_messages):
            return [{"role": "user", "content": text}]
        if ctx.context_mode == "system":
            return [{"role": "system", "content": ctx.context}, {"role": "user", "content": text}]
        if ctx.context_mode == "fewshot":
            shots = [{"role": m.role, "content": m.content} for m in ctx.context_messages]
            return shots + [{"role": "user", "content": text}]
        return [{"role": "user", "content": f"{ctx.context} {text}"}]

    def ids(self, prompt: Prompt, teacher: bool = False) -> "ChatIds":
        if self.chat:
            messages = self._messages(prompt.text, teacher)
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return ChatIds(self.tok(text, add_special_tokens=False).input_ids, messages)
        text = prompt.text
        if teacher and self.context.context:
            text = f"{self.context.context}{text}"
        return ChatIds(self.tok(text).input_ids, [{"role": "user", "content": text}])

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
