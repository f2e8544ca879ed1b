"""A 2-step SmolLM2 context-distillation run (small batch, short completions) with its report."""

import pytest

from shared.metrics import read_metrics
from tests.test_e2e import run_rl

pytestmark = pytest.mark.engine


def test_context_distill_two_steps(tmp_path):
    out = tmp_path / "cd"
    p = run_rl("@", "experiments/context_distill/rl.toml", "--max_steps", "2", "--output_dir", str(out),
               "--orchestrator.batch_size", "2", "--orchestrator.group_size", "2", "--inference.max_tokens", "16",
               "--orchestrator.eval.num_prompts", "4", "--wandb.mode", "disabled", timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    base = next(r for r in rows if "eval/french/baseline_student/avg" in r)
    assert base["step"] == 0
    assert base["eval/french/baseline_diff"] == pytest.approx(
        base["eval/french/baseline_teacher/avg"] - base["eval/french/baseline_student/avg"])
    train = [r for r in rows if "teacher_kl" in r]
    assert [r["step"] for r in train] == [1, 2]
    # the teacher sees "Answer in French." and the student does not: the student's own samples are
    # less likely under the teacher than under itself on average (measured ~0.3 nats/token).
    assert all(r["teacher_kl"] > 0 for r in train)
    report = (out / "report.md").read_text()
    assert "| student (start) | teacher (with its context) | student (end) |" in report and "teacher_kl" in report
    assert "baseline_teacher" not in report.split("Before/after")[0]  # logged once: not a start/end row
    assert (out / "teacher_kl.png").stat().st_size > 1000
    assert "| student (start) | teacher (with its context) | student (end) |" in p.stdout
