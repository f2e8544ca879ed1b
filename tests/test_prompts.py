"""Prompt rendering for student and teacher (context distillation) and the French-answer check."""

import pytest

from orchestrator.data import Prompt
from orchestrator.environments.questions import HELDOUT, TRAIN, is_french
from orchestrator.prompts import Renderer
from shared.config import ChatMessage, ConfigError, TeacherModelConfig


@pytest.fixture(scope="module")
def chat_tok():
    from shared.builders.smollm2 import prepare
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(prepare()))


@pytest.fixture(scope="module")
def plain_tok(tiny_pair):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_pair[1]))


def _text(tok, ids):
    return tok.decode(ids)


def test_user_prefix_only_changes_the_user_turn(chat_tok):
    r = Renderer(chat_tok, "auto", TeacherModelConfig(context="Answer in French."))
    p = Prompt(text="What is bread?")
    student, teacher = _text(chat_tok, r.ids(p)), _text(chat_tok, r.ids(p, teacher=True))
    assert "Answer in French." not in student
    assert teacher == student.replace("What is bread?", "Answer in French. What is bread?")
    assert student.endswith("<|im_start|>assistant\n")
    assert student.count("<|im_start|>system") == 1  # the same default system message on both sides


def test_system_and_fewshot_contexts(chat_tok):
    p = Prompt(text="What is bread?")
    sys_r = Renderer(chat_tok, "auto", TeacherModelConfig(context="Réponds en français.", context_mode="system"))
    t = _text(chat_tok, sys_r.ids(p, teacher=True))
    assert t.startswith("<|im_start|>system\nRéponds en français.<|im_end|>")
    shots = [ChatMessage(role="user", content="Hi"), ChatMessage(role="assistant", content="Answer: hello")]
    fs = Renderer(chat_tok, "auto", TeacherModelConfig(context_mode="fewshot", context_messages=shots))
    t = _text(chat_tok, fs.ids(p, teacher=True))
    assert t.index("Answer: hello") < t.index("What is bread?")
    assert "Answer: hello" not in _text(chat_tok, fs.ids(p))


def test_plain_tokenizer_prefixes_text(plain_tok):
    r = Renderer(plain_tok, "auto", TeacherModelConfig(context="ab"))
    assert not r.chat
    assert r.ids(Prompt(text="cd=")) == plain_tok("cd=").input_ids
    assert r.ids(Prompt(text="cd="), teacher=True) == plain_tok("abcd=").input_ids


def test_chat_contexts_need_a_template(plain_tok):
    with pytest.raises(ConfigError, match="orchestrator.teacher_model.context_mode"):
        Renderer(plain_tok, "auto", TeacherModelConfig(context="x", context_mode="system"))
    with pytest.raises(ConfigError, match="model.chat_template"):
        Renderer(plain_tok, "on", TeacherModelConfig())


def test_french_detector_and_split():
    assert is_french("Le pain est un aliment fait de farine, d'eau et de sel. Il est cuit au four.")
    assert not is_french("Bread is a food made of flour, water and salt. It is baked in an oven.")
    assert not is_french("")
    assert set(TRAIN).isdisjoint(HELDOUT) and len(HELDOUT) >= 32


def test_rendered_ids_remember_their_chat_messages_through_pickling(chat_tok, plain_tok):
    """A teacher behind a chat API gets the messages each prompt was rendered from (ChatIds), also after
    Ray has pickled the ids to the teacher actor."""
    import pickle

    from orchestrator.prompts import ChatIds
    from orchestrator.prompts import render_messages
    tok = chat_tok
    r = Renderer(tok, "auto", TeacherModelConfig(context="Answer in French.", context_mode="system"))
    ids = r.ids(Prompt(text="What is rain?"), teacher=True)
    assert isinstance(ids, ChatIds) and ids == tok(tok.apply_chat_template(
        ids.messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False).input_ids
    assert ids.messages == [{"role": "system", "content": "Answer in French."},
                            {"role": "user", "content": "What is rain?"}]
    back = pickle.loads(pickle.dumps([ids]))[0]
    assert isinstance(back, ChatIds) and back == ids and back.messages == ids.messages
    judge = render_messages(plain_tok, [{"role": "user", "content": "ab="}], chat=True)  # no template: plain text
    assert judge.messages == [{"role": "user", "content": "ab="}] and judge == plain_tok("ab=").input_ids
    plain = Renderer(plain_tok, "auto", TeacherModelConfig(context="x")).ids(Prompt(text="ab="), teacher=True)
    assert plain == plain_tok("xab=").input_ids and plain.messages == [{"role": "user", "content": "xab="}]
