"""Template and EOS preflight (shared/chat_templates.py): the student's and the teacher's templates must agree
on the end of a turn, the end of a sequence and where the completion starts; a mismatch is one line, exit 2.

No engine starts: the tokenizers are the cached SmolLM2 and tiny pair, and copies whose template or
end-of-sequence token is edited."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.chat_templates import check, first_difference, generation_prompt, mismatch, turn_end
from shared.config import ConfigError, from_dict
from tests.conftest import ROOT
from tests.test_bad_input import run_rl

EXPERIMENT = str(ROOT / "experiments" / "context_distill" / "per_example.toml")
PROMPTS = ["What is 3 + 4?", "What is 12 - 5?"]


@pytest.fixture(scope="module")
def smol() -> Path:
    from shared.builders.smollm2 import prepare

    return Path(prepare())


def _tok(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _copy(src: Path, dst: Path, template: tuple[str, str] | None = None, eos: str | None = None) -> Path:
    """A model directory that shares ``src``'s weights (linked) and config, with an edited tokenizer."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            (dst / f.name).symlink_to(f)
        elif f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    if template:
        jinja = dst / "chat_template.jinja"
        jinja.write_text(jinja.read_text().replace(*template))
    if eos:
        cfg = json.loads((dst / "tokenizer_config.json").read_text())
        (dst / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": eos}))
    return dst


def test_first_difference():
    assert first_difference("<|im_end|>", "<|eot_id|>") == "character 2: 'i' vs 'e'"
    assert first_difference("abc", "ab") == "character 2: 'c' vs ''"


def test_the_parts_of_smollm2s_template(smol):
    tok = _tok(smol)
    assert turn_end(tok, PROMPTS[0]) == "<|im_end|>"
    assert generation_prompt(tok, PROMPTS[0]) == "<|im_start|>assistant\n"
    assert mismatch(tok, tok, True, PROMPTS) is None


def test_tiny_pair_has_no_template_and_passes(tiny_pair):
    teacher, student = (_tok(p) for p in tiny_pair)
    assert not getattr(student, "chat_template", None)
    assert mismatch(student, teacher, False, ["abc="]) is None
    check(from_dict({}), student, teacher, ["abc="])  # the default config is the tiny pair's


def test_each_mismatch_is_one_line_naming_both(smol, tmp_path):
    s = _tok(smol)
    ends = _tok(_copy(smol, tmp_path / "ends", template=("<|im_end|>", "<|endoftext|>")))
    assert mismatch(s, ends, True, PROMPTS, "student", "teacher") == (
        "teacher: its chat template ends a turn with '<|endoftext|>' but student's with '<|im_end|>' "
        "(first difference at character 2: 'e' vs 'i')")
    starts = _tok(_copy(smol, tmp_path / "starts", template=("<|im_start|>assistant", "<|im_start|>bot")))
    assert mismatch(s, starts, True, PROMPTS, "student", "teacher") == (
        "teacher: its chat template starts the completion after '<|im_start|>bot\\n' but student's after "
        "'<|im_start|>assistant\\n' (first difference at character 12: 'b' vs 'a')")
    eos = _tok(_copy(smol, tmp_path / "eos", eos="<|endoftext|>"))
    assert mismatch(s, eos, False, PROMPTS, "student", "teacher") == (
        "teacher: its tokenizer ends a sequence with '<|endoftext|>' but student's with '<|im_end|>' "
        "(first difference at character 2: 'e' vs 'i')")
    s_plain = _tok(smol)
    s_plain.chat_template = None
    assert mismatch(s_plain, _tok(smol), False, PROMPTS) is None  # no chat: only the eos tokens count
    assert "has no chat template" in mismatch(s, s_plain, True, PROMPTS)


@pytest.mark.parametrize(("edit", "expected"), [
    (dict(template=("<|im_end|>", "<|endoftext|>")), "its chat template ends a turn with '<|endoftext|>' but "
                                                     "model.name (smollm2-135m-instruct)'s with '<|im_end|>'"),
    (dict(eos="<|endoftext|>"), "its tokenizer ends a sequence with '<|endoftext|>' but "
                                "model.name (smollm2-135m-instruct)'s with '<|im_end|>'"),
], ids=["turn-end", "eos"])
def test_dry_run_refuses_a_mismatch_in_one_line(smol, tmp_path, edit, expected):
    teacher = _copy(smol, tmp_path / "teacher", **edit)
    p = run_rl("@", EXPERIMENT, "--teacher.name", str(teacher), "--output_dir", str(tmp_path / "out"), "--dry_run")
    assert p.returncode == 2, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert lines[0].startswith(f"error: teacher.name ({teacher}): {expected}"), lines[0]
    assert "teacher.allow_template_mismatch = true" in lines[0]


def test_smollm2_against_itself_and_an_allowed_mismatch_pass(smol, tmp_path, capfd):
    from orchestrator.cli import main

    args = ["@", EXPERIMENT, "--output_dir", str(tmp_path / "out"), "--dry_run"]
    assert main(args) == 0
    assert "template" not in capfd.readouterr().err
    teacher = _copy(smol, tmp_path / "teacher", eos="<|endoftext|>")
    assert main([*args, "--teacher.name", str(teacher), "--teacher.allow_template_mismatch", "true"]) == 0
    err = capfd.readouterr().err
    assert "warning: teacher.name" in err and "distilling anyway (teacher.allow_template_mismatch = true)" in err


def test_check_raises_a_config_error(smol, tmp_path):
    cfg = from_dict({"model": {"name": "s"}, "teacher": {"name": "t"}})
    with pytest.raises(ConfigError, match=r"^teacher\.name \(t\): its tokenizer ends a sequence"):
        check(cfg, _tok(smol), _tok(_copy(smol, tmp_path / "eos", eos="<|endoftext|>")), PROMPTS)
