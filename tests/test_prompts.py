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


# ----------------------------------------------------------------------------------------------
# A context per prompt (Prompt.teacher_context): only the teacher sees it, after the run-wide one

SOLUTION = "3 + 4 = 7. The answer is 7."
TURNS = [{"role": "user", "content": "Hint?"}, {"role": "assistant", "content": "Add them."}]
RUN_WIDE = [TeacherModelConfig(), TeacherModelConfig(context="Worked solution:"),
            TeacherModelConfig(context="Be brief.", context_mode="system"),
            TeacherModelConfig(context_mode="fewshot", context_messages=[ChatMessage(role="user", content="Hi"),
                                                                         ChatMessage(role="assistant", content="Hello")])]


@pytest.mark.parametrize("own", [SOLUTION, TURNS], ids=["string", "messages"])
@pytest.mark.parametrize("run_wide", RUN_WIDE, ids=["none", "user_prefix", "system", "fewshot"])
def test_the_students_ids_never_contain_the_prompts_context(chat_tok, own, run_wide):
    r = Renderer(chat_tok, "auto", run_wide)
    bare, with_own = Prompt(text="What is 3 + 4?", answer="7"), Prompt(text="What is 3 + 4?", answer="7", teacher_context=own)
    assert r.ids(with_own) == r.ids(bare)
    assert r.ids(with_own).messages == [{"role": "user", "content": "What is 3 + 4?"}]
    assert r.ids(with_own, teacher=True) != r.ids(bare, teacher=True) and r.teacher_differs(with_own)


def test_the_prompts_context_follows_the_run_wide_one(chat_tok):
    """The teacher's turns for each context_mode, hand-written (prompts.py's table)."""
    p = Prompt(text="What is 3 + 4?", teacher_context=SOLUTION)
    user = {"role": "user", "content": f"{SOLUTION} What is 3 + 4?"}
    none, prefix, system, fewshot = (Renderer(chat_tok, "auto", c) for c in RUN_WIDE)
    assert none.ids(p, teacher=True).messages == [user]
    assert prefix.ids(p, teacher=True).messages == [{"role": "user", "content": f"Worked solution: {SOLUTION} What is 3 + 4?"}]
    assert system.ids(p, teacher=True).messages == [{"role": "system", "content": f"Be brief.\n\n{SOLUTION}"},
                                                    {"role": "user", "content": "What is 3 + 4?"}]
    assert fewshot.ids(p, teacher=True).messages == [{"role": "user", "content": "Hi"},
                                                     {"role": "assistant", "content": "Hello"}, user]
    turns = Prompt(text="What is 3 + 4?", teacher_context=TURNS)
    assert system.ids(turns, teacher=True).messages == [{"role": "system", "content": "Be brief."}, *TURNS,
                                                        {"role": "user", "content": "What is 3 + 4?"}]
    text = _text(chat_tok, prefix.ids(p, teacher=True))  # through SmolLM2's template: its default system message stays
    assert text == _text(chat_tok, prefix.ids(p)).replace("What is 3 + 4?", f"Worked solution: {SOLUTION} What is 3 + 4?")
    assert not none.teacher_differs(Prompt(text="What is 3 + 4?")) and prefix.teacher_differs(Prompt(text="x"))


def test_plain_tokenizer_prepends_the_prompts_context(plain_tok):
    r = Renderer(plain_tok, "auto", TeacherModelConfig(context="a"))
    assert r.ids(Prompt(text="cd=", teacher_context="b"), teacher=True) == plain_tok("abcd=").input_ids
    assert r.ids(Prompt(text="cd=", teacher_context="b")) == plain_tok("cd=").input_ids
    turns = [{"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}]
    assert r.ids(Prompt(text="cd=", teacher_context=turns), teacher=True) == plain_tok("ae\n\nf\n\ncd=").input_ids


def test_the_pipeline_renders_the_teachers_view_only_where_a_context_applies(chat_tok):
    """Pipeline.render_batch: without a run-wide context, the teacher's ids differ from the student's exactly
    for the prompts with their own context (the others are the same list object: nothing rendered twice)."""
    from orchestrator.pipeline import Batch, Pipeline

    r = Renderer(chat_tok, "auto", TeacherModelConfig())
    pipe = object.__new__(Pipeline)  # render_batch needs only these two (the roles are not involved)
    pipe.render, pipe.has_context = (lambda p, teacher: r.ids(p, teacher=teacher)), r.has_context
    batch = Batch(step=1, prompts=[Prompt(text="What is 1 + 1?"), Prompt(text="What is 3 + 4?", teacher_context=SOLUTION)],
                  base=0)
    pipe.render_batch(batch)
    assert batch.teacher_ids[0] is batch.prompt_ids[0]
    assert batch.teacher_ids[1] == r.ids(batch.prompts[1], teacher=True) != batch.prompt_ids[1]
