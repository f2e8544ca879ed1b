"""benchmarks/cross_vocab.py: its reading of a run and its table, against hand-made metrics rows (no run)."""

import json
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import cross_vocab  # noqa: E402


def _write(path, rows):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_summarise_averages_the_first_and_last_steps(tmp_path):
    rows = [{"step": 0, "eval/reverse_text/avg": 0.19}]
    for step in range(1, 21):  # teacher_kl 5.0 at steps 1-10, 2.0 at 11-20; align/kl 0.5 above it
        kl = 5.0 if step <= 10 else 2.0
        rows.append({"step": step, "teacher_kl": kl, "align/kl": kl + 0.5, "align/multi_token_frac": 0.75,
                     "align/teacher_per_student": 0.7, "align/respelled": 1.0 if step == 3 else 0.0})
    rows.append({"step": 20, "eval/reverse_text/avg": 0.6})
    _write(tmp_path / "r", rows)
    s = cross_vocab.summarise(tmp_path / "r")
    assert s["accuracy_start"] == 0.19 and s["accuracy_end"] == 0.6
    assert s["teacher_kl_first"] == 5.0 and s["teacher_kl_last"] == 2.0
    assert s["align_kl_first"] == 5.5 and s["align_kl_last"] == 2.5
    assert s["multi_token_frac"] == pytest.approx(0.75) and s["align_respelled"] == 1.0


def test_the_report_says_up_and_down(tmp_path):
    run = {"accuracy_start": 0.19, "accuracy_end": 0.5, "teacher_kl_first": 5.0, "teacher_kl_last": 2.0,
           "align_kl_first": 5.0, "align_kl_last": 2.0, "multi_token_frac": 0.8, "teacher_per_student": 0.7,
           "align_respelled": 3.0, "seconds": 100.0}
    same = dict(run, align_kl_first=None, align_kl_last=None, multi_token_frac=None, teacher_per_student=None,
                align_respelled=0.0)
    result = {"date": "2026-12-02", "machine": "m", "load_before": "1", "load_after": "2", "wall_s": 200.0,
              "command": "c", "steps": 20,
              "teacher_accuracy": {"tiny-reverse-teacher-pairs": 0.99, "tiny-reverse-teacher": 0.995},
              "runs": {"cross": {"args": cross_vocab.RUNS["cross"], **run},
                       "same": {"args": cross_vocab.RUNS["same"], **same}}}
    text = cross_vocab.report(result)
    assert "| cross | tiny-reverse-teacher-pairs (0.990) | align | 0.19 → 0.50 | 5.000 → 2.000 | 5.000 → 2.000 | " \
           "0.800 | 0.700 | 3 | 100 |" in text
    assert "| same | tiny-reverse-teacher (0.995) | same | 0.19 → 0.50 | 5.000 → 2.000 | — → — | — | — | 0 | 100 |" in text
    assert "0.19 → 0.50 (up), aligned KL 5.000 → 2.000 (down)" in text
