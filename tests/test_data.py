"""JSONL prompt loader: good rows load; each bad row is named by file:line or counted and skipped."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.data import DatasetError, Prompt, load_jsonl
from shared.config import ConfigError


def _write(tmp_path, text, name="data.jsonl"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_good_file(tmp_path):
    rows = [
        json.dumps({"prompt": "abc", "answer": "cba"}),
        "",  # blank lines are ignored
        json.dumps({"prompt": "hello"}),
        "   ",
        json.dumps({"prompt": "x", "answer": None, "extra": 1}),
        json.dumps({"prompt": "uni\u2028code\u0085"}, ensure_ascii=False),  # line separators inside a string
    ]
    path = _write(tmp_path, "\n".join(rows) + "\n")
    prompts, bad = load_jsonl(path)
    assert bad == 0
    assert list(prompts) == [
        Prompt(text="abc", answer="cba"),
        Prompt(text="hello", answer=None),
        Prompt(text="x", answer=None),
        Prompt(text="uni\u2028code\u0085", answer=None),
    ]


def test_crlf_line_endings(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "a"}\r\n{"prompt": "b"}\r\n')
    prompts, bad = load_jsonl(str(path))
    assert [p.text for p in prompts] == ["a", "b"] and bad == 0


GOOD = json.dumps({"prompt": "ok", "answer": "ko"})
BAD_ROWS = [
    ("invalid-json", '{"prompt": "a"', "not valid JSON"),
    ("trailing-garbage", '{"prompt": "a"} x', "not valid JSON"),
    ("not-an-object", '["prompt", "a"]', "expected a JSON object, got list"),
    ("a-bare-string", '"just text"', "expected a JSON object, got str"),
    ("missing-prompt", '{"question": "a"}', "missing field 'prompt'"),
    ("empty-prompt", '{"prompt": ""}', "'prompt' must be a non-empty string"),
    ("blank-prompt", '{"prompt": "   "}', "'prompt' must be a non-empty string"),
    ("non-string-prompt", '{"prompt": 5}', "'prompt' must be a non-empty string"),
    ("non-string-answer", '{"prompt": "a", "answer": 5}', "'answer' must be a string"),
    ("list-answer", '{"prompt": "a", "answer": ["x"]}', "'answer' must be a string"),
    ("context-a-number", '{"prompt": "a", "teacher_context": 5}',
     "'teacher_context' must be a string or a list of chat messages, got int"),
    ("context-message-a-string", '{"prompt": "a", "teacher_context": ["hi"]}', "'teacher_context'[0] must be an object"),
    ("context-unknown-role", '{"prompt": "a", "teacher_context": [{"role": "user", "content": "x"}, '
     '{"role": "tool", "content": "y"}]}', "'teacher_context'[1]: 'role' must be one of system, user, assistant"),
    ("context-content-missing", '{"prompt": "a", "teacher_context": [{"role": "user"}]}',
     "'teacher_context'[0]: 'content' must be a string"),
    ("context-extra-field", '{"prompt": "a", "teacher_context": [{"role": "user", "content": "x", "name": "n"}]}',
     "'teacher_context'[0]: unknown field 'name'"),
    ("huge-integer", '{"prompt": "a", "n": 1' + "0" * 5000 + "}", "not valid JSON"),
    ("nested-too-deep", "[" * 100_000 + "]" * 100_000, "not valid JSON"),
]


@pytest.mark.parametrize(("bad_row", "problem"), [c[1:] for c in BAD_ROWS], ids=[c[0] for c in BAD_ROWS])
def test_bad_row_error_names_file_and_line(tmp_path, bad_row, problem):
    # The bad row is on line 4 (line 2 is blank).
    path = _write(tmp_path, "\n".join([GOOD, "", GOOD, bad_row, GOOD]) + "\n")
    with pytest.raises(DatasetError) as e:
        load_jsonl(path, on_bad_row="error")
    msg = str(e.value)
    assert msg.startswith(f"{path}:4: "), msg
    assert problem in msg
    assert "on_bad_row" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(("bad_row", "problem"), [c[1:] for c in BAD_ROWS], ids=[c[0] for c in BAD_ROWS])
def test_bad_row_skip_counts_and_keeps_good(tmp_path, bad_row, problem):
    path = _write(tmp_path, "\n".join([GOOD, bad_row, "", GOOD, bad_row]) + "\n")
    prompts, bad = load_jsonl(path, on_bad_row="skip")
    assert bad == 2
    assert list(prompts) == [Prompt(text="ok", answer="ko")] * 2


def test_first_bad_line_is_reported(tmp_path):
    path = _write(tmp_path, "\n".join([GOOD, GOOD, "nope", '{"prompt": 1}']))
    with pytest.raises(DatasetError, match=r":3: not valid JSON"):
        load_jsonl(path)


def test_skip_mixed_bad_rows(tmp_path):
    path = _write(tmp_path, "\n".join(["{", GOOD, "[]", '{"x": 1}', '{"prompt": ""}', '{"prompt": "p", "answer": 1}', GOOD]))
    prompts, bad = load_jsonl(path, on_bad_row="skip")
    assert (len(prompts), bad) == (2, 5)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError) as e:
        load_jsonl(path)
    assert path in str(e.value) and "file not found" in str(e.value)


@pytest.mark.parametrize("path_kind", ["directory", "nul-byte", "not-utf8"])
def test_unreadable_file(tmp_path, path_kind):
    if path_kind == "directory":
        path = str(tmp_path)
    elif path_kind == "nul-byte":
        path = str(tmp_path / "a\x00b.jsonl")
    else:
        path = str(tmp_path / "latin1.jsonl")
        (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DatasetError, match="cannot read"):
        load_jsonl(path)


@pytest.mark.parametrize("text", ["", "\n\n  \n", "[]\n{}\n"], ids=["empty", "blank-lines", "only-bad-rows"])
@pytest.mark.parametrize("on_bad_row", ["error", "skip"])
def test_no_usable_rows(tmp_path, text, on_bad_row):
    path = _write(tmp_path, text)
    if text.strip() and on_bad_row == "error":
        with pytest.raises(DatasetError, match=r":1: "):
            load_jsonl(path, on_bad_row=on_bad_row)
        return
    with pytest.raises(DatasetError) as e:
        load_jsonl(path, on_bad_row=on_bad_row)
    assert str(e.value).startswith(f"{path}: no usable prompts")


def test_dataset_error_is_a_config_error():
    assert issubclass(DatasetError, ConfigError)


_fragments = st.sampled_from(
    ['{"prompt": "a"}', '{"prompt": ""}', '{"answer": 1}', "[", "]", "{", "}", '"', "\n", "\r\n", ",", ":",
     '"prompt"', "null", "1e999", "\u2028", "\ufeff", "NaN", " "]
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.one_of(st.text(max_size=120), st.lists(_fragments, max_size=20).map("".join)),
    on_bad_row=st.sampled_from(["error", "skip"]),
)
def test_arbitrary_content_raises_only_config_errors(tmp_path, text, on_bad_row):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        prompts, bad = load_jsonl(str(path), on_bad_row=on_bad_row)
    except ConfigError as e:
        assert isinstance(e, DatasetError)
        assert str(e).startswith(str(path)) or str(e).startswith("orchestrator.dataset.path: ")
    else:
        assert prompts and all(isinstance(p, Prompt) and p.text.strip() for p in prompts)
        assert bad >= 0 and (on_bad_row == "skip" or bad == 0)


def test_prompt_meta_defaults_to_none():
    assert Prompt(text="a").meta is None
    assert Prompt(text="a", meta={"entry": {"answer": "1"}}).meta == {"entry": {"answer": "1"}}


def test_check_rejects_rows_by_file_and_line_or_skips_them(tmp_path):
    path = _write(tmp_path, "\n".join([GOOD, json.dumps({"prompt": "no answer"}), GOOD]))

    def needs_answer(p: Prompt) -> str | None:
        return None if p.answer is not None else "missing field 'answer'"

    with pytest.raises(DatasetError, match=r":2: missing field 'answer' \(set orchestrator.dataset.on_bad_row"):
        load_jsonl(path, check=needs_answer)
    prompts, bad = load_jsonl(path, on_bad_row="skip", check=needs_answer)
    assert bad == 1 and list(prompts) == [Prompt(text="ok", answer="ko")] * 2
    assert load_jsonl(path)[1] == 0  # without a check every row is fine


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200), on_bad_row=st.sampled_from(["error", "skip"]))
def test_arbitrary_bytes_raise_only_dataset_errors(tmp_path, data, on_bad_row):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(data)
    try:
        prompts, bad = load_jsonl(str(path), on_bad_row=on_bad_row, check=lambda p: None if p.answer else "no answer")
    except DatasetError as e:
        assert "\n" not in str(e) and str(path) in str(e)
    else:
        assert prompts and all(p.answer for p in prompts)


# ----------------------------------------------------------------------------------------------
# Drawing: a seeded permutation per epoch, the same draws as before the streaming loader, resumable

# Drawn by the loader of commit 44446c1 (whole file in memory, a permutation rebuilt per prompt) from the
# files written by _pinned_files: the number in each prompt, for draws of 1, 5, 31, 40 and 3 prompts.
PINNED = {
    ("format_check", 0): [0, 19, 14, 21, 22, 17, 34, 30, 7, 5, 10, 13, 36, 1, 28, 23, 8, 3, 20, 27, 4, 33, 6, 18, 11,
                          15, 9, 35, 25, 29, 12, 31, 32, 16, 2, 26, 24, 34, 35, 2, 9, 24, 1, 21, 26, 10, 17, 11, 22, 29,
                          5, 18, 27, 33, 36, 14, 23, 19, 13, 32, 0, 30, 3, 6, 25, 12, 20, 15, 28, 31, 7, 16, 4, 8, 36,
                          2, 24, 9, 32, 26],
    ("format_check", 7): [32, 24, 11, 25, 1, 7, 0, 8, 6, 21, 36, 23, 2, 4, 10, 18, 27, 28, 33, 31, 3, 22, 35, 19, 30,
                          26, 20, 17, 5, 13, 16, 29, 15, 34, 14, 12, 9, 19, 25, 26, 10, 27, 29, 36, 23, 15, 4, 22, 0,
                          20, 9, 2, 3, 21, 12, 1, 34, 33, 17, 32, 5, 35, 8, 18, 24, 7, 28, 6, 13, 30, 31, 16, 14, 11,
                          36, 3, 30, 14, 22, 34],
    ("exact_answer", 3): [3, 57, 40, 50, 14, 28, 7, 18, 13, 33, 9, 20, 35, 23, 31, 26, 17, 4, 51, 41, 25, 6, 54, 47, 30,
                          15, 42, 10, 16, 19, 12, 56, 53, 49, 59, 48, 43, 1, 29, 5, 55, 24, 32, 46, 8, 36, 44, 0, 2, 10,
                          1, 13, 14, 26, 17, 4, 31, 16, 51, 9, 35, 33, 23, 3, 5, 48, 18, 0, 46, 54, 32, 41, 7, 8, 6, 24,
                          59, 36, 49, 20, 53, 25, 42, 55, 15, 2, 43, 12, 30, 44, 29, 50, 19, 47, 57, 28, 56, 40, 56, 32],
}
PINNED_EVAL = [11, 21, 22, 27, 34, 37, 38, 39, 45, 52, 58]  # exact_answer's held-out rows, in file order


def _pinned_files(tmp_path):
    """37 open questions with a bad row after the 11th and a blank line after the 21st; 60 question/answer rows."""
    a = tmp_path / "a.jsonl"
    with a.open("w") as f:
        for i in range(37):
            f.write(json.dumps({"prompt": f"Tell me about thing {i}."}) + "\n")
            f.write("not json\n" if i == 10 else "\n" if i == 20 else "")
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({"prompt": f"Capital number {i}?", "answer": f"City {i}"}) + "\n" for i in range(60)))
    return str(a), str(b)


def _number(p: Prompt) -> int:
    return int(p.text.split()[-1][:-1])


def _env(name, seed, path, on_bad_row="error"):
    from orchestrator.environments import make
    from tests.test_environments import cfg_for

    return make(cfg_for(name, seed=seed, dataset=path, on_bad_row=on_bad_row))


def test_draws_are_those_of_the_previous_loader(tmp_path):
    a, b = _pinned_files(tmp_path)
    for seed in (0, 7):
        env = _env("format_check", seed, a, "skip")
        assert env.bad_rows == 1
        draws = [_number(p) for n in (1, 5, 31, 40, 3) for p in env.next_prompts(n)]
        assert draws == PINNED[("format_check", seed)]
    env = _env("exact_answer", 3, b)
    assert [_number(p) for p in env.next_prompts(100)] == PINNED[("exact_answer", 3)]
    assert [_number(p) for p in env.eval_prompts(100)] == PINNED_EVAL


def test_one_shuffle_per_epoch(tmp_path, monkeypatch):
    from orchestrator import data

    calls = []
    real = data.epoch_order
    monkeypatch.setattr(data, "epoch_order", lambda seed, epoch, n: calls.append((seed, epoch, n)) or real(seed, epoch, n))
    env = _env("format_check", 0, _pinned_files(tmp_path)[0], "skip")
    for _ in range(37 * 3 // 4 + 1):  # 112 prompts in draws of 4: epochs 0, 1, 2 and the first of epoch 3
        env.next_prompts(4)
    assert calls == [(0, 0, 37), (0, 1, 37), (0, 2, 37), (0, 3, 37)]


def test_resume_continues_at_the_same_data_position(tmp_path):
    from orchestrator import checkpoint

    a, _ = _pinned_files(tmp_path)
    env = _env("format_check", 7, a, "skip")
    env.next_prompts(50)  # into the second epoch
    saved = msgspec.msgpack.decode(msgspec.msgpack.encode(checkpoint.state_of(env)))
    assert saved["position"] == 50 and saved["data_digest"].startswith("sha256:")
    fresh = _env("format_check", 7, a, "skip")
    checkpoint.restore(fresh, saved)
    assert [_number(p) for p in fresh.next_prompts(30)] == PINNED[("format_check", 7)][50:80]


def test_resume_with_another_file_is_refused(tmp_path):
    from orchestrator import checkpoint

    a, _ = _pinned_files(tmp_path)
    env = _env("format_check", 0, a, "skip")
    env.next_prompts(3)
    saved = checkpoint.state_of(env)
    other = tmp_path / "other.jsonl"
    other.write_text(Path(a).read_text().replace("thing 3.", "thing 3!"))
    with pytest.raises(ConfigError, match=r"^resume: orchestrator.dataset.path: .*other.jsonl is not the data the "
                                          r"checkpoint was written with \(sha256:"):
        checkpoint.restore(_env("format_check", 0, str(other), "skip"), saved)
    old = {k: v for k, v in saved.items() if k != "data_digest"}  # a checkpoint written before the digest existed
    assert checkpoint.restore(_env("format_check", 0, a, "skip"), old).position == 3


def test_a_file_changed_after_loading_is_refused_by_line(tmp_path):
    path = _write(tmp_path, "".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(5)))
    rows, _ = load_jsonl(path)
    assert rows[4].text == "p4"
    Path(path).write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(5)) + "x\n")
    with pytest.raises(DatasetError, match=rf"^{re.escape(path)}:2: the file changed since it was loaded"):
        rows[1]


def test_index_is_16_bytes_a_row_and_rows_read_back_exactly(tmp_path):
    texts = [f"row {i} " + "\u00e9\u2028x" * (i % 7) for i in range(1000)]
    path = _write(tmp_path, "".join(json.dumps({"prompt": t, "answer": str(i)}, ensure_ascii=i % 2 == 0) + "\r\n"
                                    for i, t in enumerate(texts)))
    rows, bad = load_jsonl(path)
    assert bad == 0 and len(rows) == 1000 and list(rows.lines[:3]) == [1, 2, 3]
    assert [r.text for r in rows] == texts and rows[999].answer == "999"
    assert rows.offsets.itemsize + rows.lengths.itemsize + rows.lines.itemsize == 16 and rows.tags is None
    assert rows.raw(5) == Path(path).read_bytes().split(b"\r\n")[5] + b"\n"


def test_teacher_context_rows_load_and_survive_a_checkpoint(tmp_path):
    """A row's teacher_context (a string or chat messages) is kept on its Prompt; "" and [] are none; a batch
    of such prompts comes back from a checkpoint's msgpack state unchanged (orchestrator/pipeline.py)."""
    from orchestrator.pipeline import Batch

    turns = [{"role": "user", "content": "Hint?"}, {"role": "assistant", "content": "Carry the 1."}]
    rows = [{"prompt": "a", "teacher_context": "The answer is 7."}, {"prompt": "b", "teacher_context": turns},
            {"prompt": "c", "teacher_context": ""}, {"prompt": "d", "teacher_context": []},
            {"prompt": "e", "teacher_context": None}]
    prompts, bad = load_jsonl(_write(tmp_path, "".join(json.dumps(r) + "\n" for r in rows)))
    assert bad == 0
    assert [p.teacher_context for p in prompts] == ["The answer is 7.", turns, None, None, None]
    state = msgspec.msgpack.decode(msgspec.msgpack.encode(
        Batch(step=3, prompts=list(prompts), base=0, rollouts=[]).state()))
    assert Batch.from_state(state).prompts == list(prompts)
