"""The answer-comparator workflow's engine-free parts: comparators (exact, BLEU, semantic), question
sources and their parser, and the transfer metrics (accuracy, reward, transfer rate, parameter ratio)."""

from __future__ import annotations

import json
import math
import shutil
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.comparator import (
    bleu_tokens,
    compare,
    compare_batch,
    exact_score,
    load_embedder,
    normalize_answer,
    outcome_reward,
    resolve_threshold,
    sentence_bleu,
)
from orchestrator.question_sources import (
    DatasetQuestions,
    TeacherQuestions,
    make_question_source,
    parse_questions,
    question_request,
)
from orchestrator.transfer import TransferTracker, count_parameters, parameter_ratio, safetensors_parameter_count
from shared.config import ComparatorConfig, ConfigError, load

# ------------------------------------------------------------------------------------------------
# exact

NORMALIZE = [
    ("Paris", "paris"),
    ("  Paris.  ", "paris"),
    ("**Paris**", "paris"),
    ('"Paris"', "paris"),
    ("`paris`!", "paris"),
    ("**Paris.**", "paris"),
    ("New   York\n", "new york"),
    ("Really?!", "really"),
    ("Ｐａｒｉｓ", "paris"),  # NFKC: full-width letters
    ("Straße", "strasse"),  # case-folded
    ("1,000", "1000"),
    ("1,234,567.50", "1234567.5"),
    ("3.50", "3.5"),
    ("2.0", "2"),
    ("+4", "4"),
    ("-0", "0"),
    ("-2.500", "-2.5"),
    ("007", "7"),
    ("12.0 apples", "12 apples"),
    ("42.", "42"),
    ("1.2.3", "1.2.3"),  # not a number
    ("v1.0", "v1.0"),  # part of a word
    ("3.14159", "3.14159"),
    ("1,2,3", "1,2,3"),  # a list, not thousands
    ("...", ""),
    ("", ""),
]


@pytest.mark.parametrize("text,expected", NORMALIZE)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_normalize_without_numbers():
    assert normalize_answer("1,000.", numbers=False) == "1,000"
    assert exact_score("1,000", "1000", numbers=False) == 0.0
    assert exact_score("1,000", "1000") == 1.0


EXACT = [
    ("Paris", "paris.", True),
    ("The answer is Paris", "Paris", False),
    ("4", "four", False),
    ("4.0", "4", True),
    ("London", "Paris", False),
    ("", "", True),
]


@pytest.mark.parametrize("student,reference,correct", EXACT)
def test_compare_exact(student, reference, correct):
    assert compare("exact", student, reference, "auto") == (float(correct), correct)


# ------------------------------------------------------------------------------------------------
# BLEU, worked by hand


def test_bleu_tokens():
    assert bleu_tokens("The cat's mat, 3.5!") == ["the", "cat", "'", "s", "mat", ",", "3", ".", "5", "!"]


def test_bleu_partial_overlap():
    # cand: the cat sat on the mat  (c = 6)     ref: the cat is on the mat  (r = 6)
    # 1-grams: the x2, cat, on, mat match              -> p1 = 5/6
    # 2-grams: the-cat, on-the, the-mat of 5           -> p2 = (3+1)/(5+1) = 4/6
    # 3-grams: on-the-mat of 4                         -> p3 = (1+1)/(4+1) = 2/5
    # 4-grams: none of 3                               -> p4 = (0+1)/(3+1) = 1/4
    # BP = 1 (c = r);  BLEU = (5/6 * 4/6 * 2/5 * 1/4)^(1/4) = (1/18)^(1/4) = 0.485492...
    assert sentence_bleu("the cat sat on the mat", "the cat is on the mat") == pytest.approx(18 ** -0.25)
    assert 18 ** -0.25 == pytest.approx(0.485492, abs=1e-6)


def test_bleu_brevity_penalty():
    # cand: the cat (c = 2), ref: the cat is on the mat (r = 6)
    # p1 = 2/2, p2 = (1+1)/(1+1), p3 = (0+1)/(0+1), p4 = (0+1)/(0+1): all 1
    # BP = exp(1 - r/c) = exp(1 - 3) = e^-2 = 0.135335...
    assert sentence_bleu("the cat", "the cat is on the mat") == pytest.approx(math.exp(-2))


def test_bleu_case_and_punctuation_tokens():
    # cand: the cat sat on the mat .  (c = 7; "The" case-folded, "." its own token)  ref as above (r = 6)
    # p1 = 5/7;  2-grams of 6 with 3 matches -> p2 = 4/7;  3-grams of 5 with 1 -> p3 = 2/6;  4-grams of 4, 0 -> p4 = 1/5
    # BP = 1 (c > r);  BLEU = (5/7 * 4/7 * 1/3 * 1/5)^(1/4) = (4/147)^(1/4) = 0.406157...
    assert sentence_bleu("The cat sat on the mat.", "the cat is on the mat") == pytest.approx((4 / 147) ** 0.25)


def test_bleu_clips_repeated_words():
    # cand: the the the (c = 3), ref: the cat (r = 2)
    # p1: "the" clipped to its 1 reference count -> 1/3;  2-grams the-the x2, 0 match -> p2 = 1/3
    # 3-grams: 1, 0 match -> p3 = 1/2;  4-grams: none -> p4 = 1/1;  BP = 1
    # BLEU = (1/3 * 1/3 * 1/2 * 1)^(1/4) = (1/18)^(1/4)
    assert sentence_bleu("the the the", "the cat") == pytest.approx(18 ** -0.25)


@pytest.mark.parametrize(
    "cand,ref,expected",
    [
        ("the cat is on the mat", "the cat is on the mat", 1.0),
        ("The cat is on the mat", "the cat is on the mat", 1.0),
        ("dogs bark loudly", "the cat is on the mat", 0.0),  # no unigram in common
        ("", "the cat", 0.0),
        ("the cat", "", 0.0),
        ("", "", 1.0),
    ],
)
def test_bleu_edge_cases(cand, ref, expected):
    assert sentence_bleu(cand, ref) == pytest.approx(expected)


def test_compare_bleu_threshold():
    assert compare("bleu", "the cat sat on the mat", "the cat is on the mat", "auto") == (
        pytest.approx(18 ** -0.25), False  # 0.485 < 0.5
    )
    assert compare("bleu", "the cat sat on the mat", "the cat is on the mat", 0.48)[1] is True


def test_compare_unknown_kind():
    with pytest.raises(ValueError, match="exact, bleu, semantic"):
        compare("fuzzy", "a", "b", 0.5)


# ------------------------------------------------------------------------------------------------
# semantic


@pytest.fixture(scope="module")
def smollm2_embedder():
    start = time.monotonic()
    emb = load_embedder("smollm2-135m-instruct")
    print(f"SmolLM2 embedder ready in {time.monotonic() - start:.1f} s")
    return emb


def test_semantic_orders_identical_paraphrase_unrelated(smollm2_embedder):
    # Few forward passes: on a busy 2-core machine each costs seconds.
    ref = "The capital of France is Paris."
    para, unrelated = "Paris is the capital city of France.", "Bananas are rich in potassium."
    same, close, far = smollm2_embedder.similarities([ref, para, unrelated], [ref] * 3)
    assert same == pytest.approx(1.0, abs=1e-5)
    assert same > close > far
    assert close >= 0.9 > far  # the "auto" threshold separates them
    # batched through the config (with padding, and an empty answer) and one at a time agree
    batch = compare_batch(ComparatorConfig(kind="semantic"), [para, unrelated, ""], [ref] * 3)
    assert [c for _, c in batch] == [True, False, False]
    assert batch[0][0] == pytest.approx(close, abs=1e-4) and batch[1][0] == pytest.approx(far, abs=1e-4)
    score, correct = compare("semantic", para, ref, 0.95)
    assert score == pytest.approx(close, abs=1e-4) and correct == (close >= 0.95)


def test_parameter_count_of_a_tied_model(smollm2_embedder):
    # SmolLM2 ties its LM head to the embeddings: the header counts it once, like parameters() does.
    loaded = sum(p.numel() for p in smollm2_embedder.model.parameters())
    assert count_parameters(smollm2_embedder.model_dir) == loaded


def test_semantic_with_a_model_dir_from_config(tiny_pair):
    _, student_dir = tiny_pair
    score, correct = compare("semantic", "abcd", "abcd", 0.99, embedding_model=str(student_dir))
    assert score == pytest.approx(1.0, abs=1e-5) and correct


def test_semantic_missing_model_dir_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        compare("semantic", "a", "b", 0.5, embedding_model=str(tmp_path / "nope"))
    msg = str(e.value)
    assert msg.startswith("orchestrator.comparator.embedding_model: model path") and "does not exist" in msg
    assert "\n" not in msg


def test_semantic_not_a_model_dir_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^orchestrator\.comparator\.embedding_model: .*\(no config\.json\)"):
        compare("semantic", "a", "b", 0.5, embedding_model=str(tmp_path))


def test_semantic_unloadable_model_dir_is_a_config_error(tmp_path, tiny_pair):
    # a real model folder (config, tokenizer) whose weights file is garbage
    for f in tiny_pair[1].iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / f.name)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError) as e:
        compare("semantic", "a", "b", 0.5, embedding_model=str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(f"orchestrator.comparator.embedding_model: cannot load '{tmp_path}'") and "\n" not in msg


# ------------------------------------------------------------------------------------------------
# thresholds and rewards


def test_resolve_threshold_and_rewards():
    assert resolve_threshold("exact", "auto") == 1.0
    assert resolve_threshold("bleu", "auto") == 0.5
    assert resolve_threshold("semantic", "auto") == 0.9
    assert resolve_threshold("bleu", 0.3) == 0.3
    cfg = ComparatorConfig(reward_correct=2.0, reward_wrong=-0.5)
    assert (outcome_reward(cfg, True), outcome_reward(cfg, False)) == (2.0, -0.5)


def test_compare_batch_exact_and_length_check():
    cfg = ComparatorConfig()
    assert compare_batch(cfg, ["Paris", "Rome"], ["paris.", "Paris"]) == [(1.0, True), (0.0, False)]
    assert compare_batch(cfg, [], []) == []
    with pytest.raises(ValueError, match="2 answers but 1 references"):
        compare_batch(cfg, ["a", "b"], ["a"])


def test_comparator_config_defaults_and_errors(tmp_path):
    c = load([]).orchestrator.comparator
    assert (c.kind, c.reward_threshold, c.embedding_model, c.question_source, c.num_questions) == (
        "exact", "auto", "smollm2-135m-instruct", "generator", 8
    )
    assert load(["--orchestrator.comparator.reward_threshold", "0.75"]).orchestrator.comparator.reward_threshold == 0.75
    cases = [
        (["--orchestrator.comparator.reward_threshold", "1.5"], "orchestrator.comparator.reward_threshold: expected float <= 1.0"),
        (["--orchestrator.comparator.reward_threshold", "high"],
         'orchestrator.comparator.reward_threshold: expected a number in [-1, 1] or "auto", got "high"'),
        (["--orchestrator.comparator.kind", "rouge"], 'orchestrator.comparator.kind: expected one of "exact", "bleu", "semantic"'),
        (["--orchestrator.comparator.question_prompt", "Write questions."],
         "orchestrator.comparator.question_prompt: must contain the placeholder {n}"),
        (["--orchestrator.comparator.question_prompt", "Write {n} {topic} questions."],
         "orchestrator.comparator.question_prompt: unknown placeholder {topic} (allowed: {n})"),
        (["--orchestrator.workflow", "comparator", "--orchestrator.comparator.question_source", "dataset"],
         'orchestrator.comparator.question_source: "dataset" needs orchestrator.dataset.path'),
    ]
    for argv, message in cases:
        with pytest.raises(ConfigError) as e:
            load(argv)
        assert str(e.value).startswith(message), (argv, str(e.value))


# ------------------------------------------------------------------------------------------------
# question sources

PARSE = [
    ("1. What is 2+2?\n2. Who wrote Hamlet?", ["What is 2+2?", "Who wrote Hamlet?"]),
    ("Here are 3 questions:\n\n1) What is the capital of Peru?\n2) How many legs does a spider have?\n3) What is H2O?",
     ["What is the capital of Peru?", "How many legs does a spider have?", "What is H2O?"]),
    ("(1) First?\n(2) Second?", ["First?", "Second?"]),
    ("Q1: First?\nQ2. Second?\nQuestion 3: Third?", ["First?", "Second?", "Third?"]),
    ("**1.** **What is gold's symbol?**\n**2.** \"What is 7*6?\"", ["What is gold's symbol?", "What is 7*6?"]),
    ("1.What is a noun?\n2.   Why   is the sky blue?  ", ["What is a noun?", "Why is the sky blue?"]),
    ("1. What is 2+2?\n   - Answer: 4\n2. What is 3+3?\n   - Answer: 6", ["What is 2+2?", "What is 3+3?"]),
    ("1. What is 2+2?\n2. what is 2+2?\n3. What  is 2+2?\n4.\n5. Other?", ["What is 2+2?", "Other?"]),
    ("- Alpha?\n* Beta?\n• Gamma?\n+ Delta?\n-\n- alpha?", ["Alpha?", "Beta?", "Gamma?", "Delta?"]),
    ("Sure! Some questions\nWhat is X?\nthis is not one\nWhy is Y?", ["What is X?", "Why is Y?"]),
    ("3.14 is pi\nWhat is e?", ["What is e?"]),  # "3.14" is no list number
    ("", []),
    ("No questions here.", []),
]


@pytest.mark.parametrize("text,expected", PARSE, ids=[repr(t)[:30] for t, _ in PARSE])
def test_parse_questions(text, expected):
    assert parse_questions(text) == expected


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_questions_never_raises(text):
    out = parse_questions(text)
    assert all(q and q == q.strip() for q in out)
    assert len({q.casefold() for q in out}) == len(out)


_LIST_PIECES = st.sampled_from(["1.", "2)", "(3)", "Q4:", "- ", "* ", "•", "**", " ", "\n", "What", "?", "is", "3.14", ""])


@settings(max_examples=300, deadline=None)
@given(st.lists(_LIST_PIECES, max_size=40).map("".join))
def test_parse_questions_never_raises_on_list_like_text(text):
    out = parse_questions(text)
    assert len({q.casefold() for q in out}) == len(out)


def test_question_request_and_teacher_source():
    cfg = ComparatorConfig(num_questions=3)
    msgs = question_request(cfg)
    assert msgs == [{"role": "user", "content": cfg.question_prompt.replace("{n}", "3")}]
    replies = iter(["1. A?\n2. B?\n3. C?", "Sorry, I cannot.", "1. C?\n2. D?\n3. E?"])
    asked = []

    def generate(messages):
        asked.append(messages)
        return next(replies)

    source = TeacherQuestions(cfg, generate)
    assert [p.text for p in source.next_prompts(2)] == ["A?", "B?"]
    assert [p.text for p in source.next_prompts(3)] == ["C?", "D?", "E?"]  # "C?" is not repeated
    assert (source.requests, source.empty_replies, len(asked)) == (3, 1, 3)
    assert all(m == msgs for m in asked)


def test_teacher_source_gives_up_on_useless_replies():
    source = TeacherQuestions(ComparatorConfig(), lambda messages: "I don't know.", max_empty=3)
    with pytest.raises(RuntimeError, match="no new question in 3 replies"):
        source.next_prompts(1)


def test_dataset_and_generator_sources(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Q{i}?"}) for i in range(3)) + "\n")
    cfg = load(["--orchestrator.dataset.path", str(path), "--orchestrator.comparator.question_source", "dataset"])
    source = make_question_source(cfg)
    assert isinstance(source, DatasetQuestions)
    first = [p.text for p in source.next_prompts(3)]
    assert sorted(first) == ["Q0?", "Q1?", "Q2?"]  # one epoch, shuffled
    assert sorted(p.text for p in source.next_prompts(3)) == sorted(first)

    gen = make_question_source(load([]))  # reverse_text's own prompts
    prompts = gen.next_prompts(2)
    assert len(prompts) == 2 and all(p.text.endswith("=") for p in prompts)

    with pytest.raises(ConfigError, match="needs orchestrator.dataset.path"):
        DatasetQuestions(load([]))
    with pytest.raises(ValueError, match="generate"):
        make_question_source(load(["--orchestrator.comparator.question_source", "teacher"]))
    teacher = make_question_source(load(["--orchestrator.comparator.question_source", "teacher"]), lambda m: "1. X?")
    assert [p.text for p in teacher.next_prompts(1)] == ["X?"]


# ------------------------------------------------------------------------------------------------
# transfer metrics


def test_parameter_ratio_matches_transformers(tiny_pair):
    from transformers import AutoModelForCausalLM

    teacher_dir, student_dir = tiny_pair
    counts = {}
    for d in (teacher_dir, student_dir):
        model = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True)
        counts[d] = sum(p.numel() for p in model.parameters())
        assert count_parameters(d) == counts[d]
    assert parameter_ratio(student_dir, teacher_dir) == pytest.approx(counts[student_dir] / counts[teacher_dir])
    assert 0 < parameter_ratio(student_dir, teacher_dir) < 1


def _write_safetensors(path, header: dict) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def test_safetensors_header_counting(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5), "c": torch.zeros(())}, str(tmp_path / "model-1.safetensors"),
              metadata={"format": "pt"})
    save_file({"d": torch.zeros(2, 2, 2)}, str(tmp_path / "model-2.safetensors"))
    assert safetensors_parameter_count(tmp_path / "model-1.safetensors") == 12 + 5 + 1
    assert count_parameters(tmp_path) == 18 + 8  # all shards

    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        count_parameters(bad)
    (bad / "x.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match="shorter than 8 bytes"):
        count_parameters(bad)
    (bad / "x.safetensors").write_bytes(struct.pack("<Q", 2**40))
    with pytest.raises(ValueError, match="header of"):
        count_parameters(bad)
    (bad / "x.safetensors").write_bytes(struct.pack("<Q", 100) + b"{}")
    with pytest.raises(ValueError, match="truncated"):
        count_parameters(bad)
    _write_safetensors(bad / "x.safetensors", {"w": {"dtype": "F32", "shape": "big"}})
    with pytest.raises(ValueError, match="no valid shape"):
        count_parameters(bad)


def test_transfer_tracker():
    t = TransferTracker(param_ratio=0.25)
    row = t.update([True, False, False, False], [1, 0, 0, 0])  # the start: accuracy 0.25
    assert row == {
        "comparator/accuracy": 0.25,
        "comparator/accuracy_window": 0.25,
        "comparator/cumulative_reward": 1.0,
        "comparator/samples": 4.0,
        "comparator/transfer_rate_per_1k": 0.0,
        "comparator/param_ratio": 0.25,
    }
    row = t.update([True, True, True, False], [1, 1, 1, 0])  # 0.75 after 4 more samples
    assert row["comparator/accuracy"] == 0.75
    assert row["comparator/cumulative_reward"] == 4.0
    # (0.75 - 0.25) per 4 samples = 0.5 * 1000 / 4 = 125 per 1k samples
    assert row["comparator/transfer_rate_per_1k"] == pytest.approx(125.0)
    row = t.update([], [])  # a step with no samples changes nothing but the step count
    assert math.isnan(row["comparator/accuracy"]) and row["comparator/transfer_rate_per_1k"] == pytest.approx(125.0)


def test_transfer_tracker_with_baseline_and_window():
    t = TransferTracker(start_accuracy=0.5, window=2)
    t.update([True, False], [1.0, 0.0])  # 0.5
    row = t.update([True, True], [1.0, 1.0])  # 1.0; window accuracy (1 + 2) / 4 = 0.75
    assert row["comparator/accuracy"] == 1.0 and row["comparator/accuracy_window"] == 0.75
    # (0.75 - 0.5) * 1000 / 4 samples = 62.5
    assert row["comparator/transfer_rate_per_1k"] == pytest.approx(62.5)
    assert "comparator/param_ratio" not in row
    with pytest.raises(ValueError):
        TransferTracker(window=0)
