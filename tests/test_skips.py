"""Nothing skipped in silence (orchestrator/skips.py): dataset rows skipped at start are named on the console,
logged in the step-0 row and totalled in the report with every per-step skip counter; prompts and scoring
requests longer than the context are dropped before an engine sees them."""

import json
import subprocess

from orchestrator import skips
from orchestrator.report import write_report
from tests.conftest import RL, ROOT


def test_fitting_leaves_room_for_max_tokens():
    # max_model_len 32, max_tokens 12: a prompt of 20 tokens fits exactly (20 + 12 = 32), 21 does not
    assert skips.fitting([20, 21, 5, 32, 0], 32, 12) == [0, 2, 4]


def test_scorable_never_asks_for_more_than_max_model_len_positions():
    prompts, completions = [[1] * 20, [1] * 20, [1] * 30], [[2] * 12, [2] * 13, []]
    assert skips.scorable(prompts, completions, 32) == [0, 2]  # 32 and 30 positions; 33 is one too many


def test_scores_of_marks_what_was_not_sent_as_unscored():
    from orchestrator.roles import scores_of
    from shared.wire import ScoreResult, encode

    # items 0 and 2 were sent (one engine each); item 1 was too long; the second engine failed item 2
    replies = [encode(ScoreResult(logprobs=[[-1.0, -2.0]])), encode(ScoreResult(logprobs=[[]], failed=[0]))]
    assert scores_of([[0], [2]], replies, 3).logprobs == [[-1.0, -2.0], None, None]


def test_rows_line_names_the_first_rows_and_counts_all():
    assert skips.rows_line("d.jsonl", 3, 28, [4, 9, 17], "malformed") == (
        'dataset: 3 of 28 rows skipped (malformed): d.jsonl:4, d.jsonl:9, d.jsonl:17 '
        '(orchestrator.dataset.on_bad_row = "skip")')
    line = skips.rows_line("d.jsonl", 8, 9, [1, 2, 3, 4, 5, 6], "malformed")
    assert "d.jsonl:5 and 3 more" in line and "d.jsonl:6" not in line


def test_report_totals_every_skip_counter_over_the_final_rows(tmp_path):
    rows = [{"step": 0, "time/startup_inference": 1.0, **skips.data_metrics({"malformed": 3, "too_long": 2})}]
    for step in (1, 2, 3):
        rows.append({"step": step, "teacher_kl": 0.5, "time/step": 1.0, "rollouts/empty": float(step == 2),
                     "rollouts/too_long": 4.0 * (step == 3), "async/dropped_rollouts": 0.0,
                     "teacher/score_failed": 1.0, "judge/unparseable": 2.0, "skipped_step": float(step == 1)})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report(tmp_path, {"wall_seconds": 3.0}, "").read_text()
    section = report.split("## Skipped", 1)[1].split("##", 1)[0]
    expected = [("dataset rows skipped (malformed)", "data/skipped_malformed", "3"),
                ("dataset rows skipped (too long for model.max_model_len - inference.max_tokens)",
                 "data/skipped_too_long", "2"),
                ("empty rollouts (no completion token)", "rollouts/empty", "1"),
                ("rollouts not sampled: prompt + inference.max_tokens longer than model.max_model_len",
                 "rollouts/too_long", "4"),
                ("rollouts dropped: staler than max_async_level", "async/dropped_rollouts", "0"),
                ("rollouts dropped: the teacher could not score them", "teacher/score_failed", "3"),
                ("judge replies without a verdict", "judge/unparseable", "6"),
                ("training steps skipped (non-finite, or no usable samples)", "skipped_step", "1")]
    assert [ln for ln in section.splitlines() if ln.startswith("| ") and "`" in ln] == \
        [f"| {what} | `{key}` | {total} |" for what, key, total in expected]


def test_a_dataset_with_malformed_rows_says_so_at_start(tiny_pair, tmp_path):
    """The real CLI (``--dry_run`` runs the same preflight): 3 malformed rows among 28 with on_bad_row = "skip"
    are one line on stderr naming each, and the dry run succeeds."""
    good = [json.dumps({"prompt": f"{w}=", "answer": w[::-1]}) for w in ("abc", "dcb", "xyz", "pq", "mnop") * 5]
    lines = good[:4] + ['{"prompt": '] + good[4:10] + ['{"answer": "x"}'] + good[10:] + ["[1, 2]"]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(lines) + "\n")
    p = subprocess.run([RL, "@", "experiments/reverse_text/rl.toml", "--dry_run", "--output_dir", str(tmp_path / "out"),
                        "--model.name", str(tiny_pair[1]), "--teacher.name", str(tiny_pair[0]),
                        "--orchestrator.dataset.path", str(data), "--orchestrator.dataset.on_bad_row", "skip"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(lines) == 28
    assert [ln for ln in p.stderr.splitlines() if ln.startswith("dataset: ")] == [
        f'dataset: 3 of 28 rows skipped (malformed): {data}:5, {data}:12, {data}:28 '
        '(orchestrator.dataset.on_bad_row = "skip")']
