"""JSONL prompt loader: good rows load; each bad row is named by file:line or counted and skipped."""

from __future__ import annotations

import json

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
    assert prompts == [
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
    assert prompts == [Prompt(text="ok", answer="ko")] * 2


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
    assert bad == 1 and prompts == [Prompt(text="ok", answer="ko")] * 2
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
