"""W&B: one run per launch, grouped by experiment, resolved config attached, namespaced metric names,
and the shipped dashboard (shared/wandb_panels.json). Real wandb in offline mode; the run file it writes
is read back with shared.metrics.read_wandb_offline (no W&B server involved)."""

import json
import re
from pathlib import Path

import msgspec
import pytest

from shared.config import Config, load
from shared.metrics import (
    WANDB_SECTIONS,
    MetricsLogger,
    read_metrics,
    read_wandb_offline,
    wandb_key,
    wandb_row,
)
from tests.conftest import ROOT

PANELS = ROOT / "shared" / "wandb_panels.json"

# Rows as the orchestrator writes them (orchestrator/orchestrator.py: run, _train_step, _eval_row).
STARTUP = {"step": 0, "time/startup_inference": 21.0, "time/startup_teacher": 19.5, "time/startup_trainer": 8.0}
EVAL0 = {"step": 0, "eval/reverse_text/avg": 0.19, "eval/reverse_text/baseline_student/avg": 0.19,
         "eval/reverse_text/baseline_teacher/avg": 0.98, "eval/reverse_text/baseline_diff": 0.79}


def train_row(step: int) -> dict:
    return {"step": step, "teacher_kl": 4.0 / step, "teacher_kl/seq": 20.0 / step, "combined_advantage": -4.0,
            "loss/policy": 3.9, "reward/mean": 0.1 * step, "seq_len/mean": 5.0, "grad_norm": 1.5,
            "train/lr": 2e-3, "skipped_step": 0.0, "masked/low_frac": 0.0, "masked/high_frac": 0.01,
            "masked/low": 0.0, "masked/high": 1.0, "ratio/mean": 1.0, "teacher/logprob_clipped": 0.0,
            "rollouts/empty": 0.0, "tokens/step": 160.0, "time/step": 4.0, "time/inference": 2.0,
            "time/teacher": 1.0, "time/trainer": 0.8, "time/weight_update": 0.2, "time/reward": 0.0}


def panel_problems(history: list[dict], include_when: bool, when: tuple[str, ...] = ()) -> list[str]:
    """Panels of shared/wandb_panels.json whose metrics the run's W&B history lacks: the panels for every
    run, and those whose `when` mentions one of ``when`` (or all, with ``include_when``)."""
    keys = {k for row in history for k in row if not k.startswith("_")}
    problems = []
    for section in json.loads(PANELS.read_text())["sections"]:
        for panel in section["panels"]:
            if "when" in panel and not include_when and not any(w in panel["when"] for w in when):
                continue
            if "y" in panel:
                missing = [y for y in panel["y"] if y not in keys]
                if missing:
                    problems.append(f"{panel['title']}: {missing}")
            elif not any(re.search(panel["y_regex"], k) for k in keys):
                problems.append(f"{panel['title']}: nothing matches {panel['y_regex']}")
    return problems


def check_real_run(out: Path, experiment: str, steps: int, when: tuple[str, ...] = ()) -> dict:
    """What a real `rl` run left in W&B: one offline run, grouped by experiment, with the resolved config
    and namespaced history; every dashboard panel that applies to every run has data (used by
    tests/test_slurm.py on the run its Slurm job made)."""
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    run = read_wandb_offline(runs[0])
    assert run["group"] == experiment and run["project"] == "opd"
    assert run["config"]["max_steps"] == steps and run["config"]["output_dir"] == str(out)
    assert run["config"]["model"]["name"] and "trainer" in run["config"]
    keys = {k for row in run["history"] for k in row if not k.startswith("_")}
    assert all(k.split("/")[0] in WANDB_SECTIONS and "/" in k for k in keys), sorted(keys)
    assert sum(1 for row in run["history"] if "teacher/kl" in row) == steps
    assert panel_problems(run["history"], include_when=False, when=when) == []
    return run


def test_key_mapping():
    assert wandb_key("teacher_kl") == "teacher/kl"
    assert wandb_key("teacher_kl/seq") == "teacher/kl_seq"
    assert wandb_key("loss/policy") == "train/loss/policy"
    assert wandb_key("grad_norm") == "train/grad_norm"
    assert wandb_key("reward/mean") == "train/reward/mean"
    assert wandb_key("train/lr") == "train/lr"  # already namespaced: unchanged, never train/train/
    for key in ("eval/reverse_text/avg", "time/step", "teacher/logprob_clipped", "judge/agreement",
                "comparator/accuracy", "continual/gate_failed"):
        assert wandb_key(key) == key
    assert wandb_key("busy/trainer") == "util/trainer" and wandb_key("async/staleness") == "async/staleness"
    measured = wandb_row({**train_row(1), "busy/inference": 0.9})
    assert measured["util/inference"] == 0.9 and measured["util/teacher"] == 0.25  # measured wins; the rest derived
    row = wandb_row({**train_row(1), "teacher_kl": None})
    assert "teacher/kl" not in row and "step" not in row  # nulls and the step are not W&B values
    assert row["util/inference"] == 0.5 and row["util/teacher"] == 0.25 and row["util/trainer"] == 0.2


def test_offline_run_has_group_config_and_namespaced_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_TEST_API_KEY", "sk-not-a-real-key-1234567890")
    cfg = load(["@", str(ROOT / "experiments" / "reverse_text" / "rl.toml"), "--output_dir", str(tmp_path / "run"),
                "--max_steps", "2"])
    run_config = msgspec.to_builtins(cfg)
    run_config["teacher"]["endpoint"] = "http://127.0.0.1:9/v1?key=sk-not-a-real-key-1234567890"
    logger = MetricsLogger(cfg.output_dir, msgspec.to_builtins(cfg.wandb), run_config, experiment="reverse_text")
    rows = [STARTUP, EVAL0, train_row(1), train_row(2), {"step": 2, "eval/reverse_text/avg": 0.5}]
    for row in rows:
        logger.log(row)
    logger.close()

    # metrics.jsonl keeps the flat keys the report and the progress bar read
    assert read_metrics(Path(cfg.output_dir) / "metrics.jsonl") == rows
    runs = list((Path(cfg.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run = read_wandb_offline(runs[0])
    assert run["project"] == "opd" and run["group"] == "reverse_text" and run["name"] == "run"
    assert run["job_type"] == "distill"
    assert run["config"]["max_steps"] == 2 and run["config"]["trainer"]["lr"] == cfg.trainer.lr
    assert "sk-not-a-real-key" not in json.dumps(run["config"])  # secrets never reach W&B
    hist = run["history"]
    assert [h["_step"] for h in hist] == [0, 1, 2]  # W&B merges the rows of one step into one
    assert hist[0]["time/startup_inference"] == 21.0 and hist[0]["eval/reverse_text/baseline_teacher/avg"] == 0.98
    assert hist[1]["teacher/kl"] == 4.0 and hist[2]["teacher/kl"] == 2.0
    assert hist[1]["train/loss/policy"] == 3.9 and hist[1]["train/reward/mean"] == 0.1
    assert hist[2]["util/inference"] == 0.5 and hist[2]["eval/reverse_text/avg"] == 0.5
    keys = {k for h in hist for k in h if not k.startswith("_")}
    assert "teacher_kl" not in keys and "loss/policy" not in keys
    assert all(k.split("/")[0] in WANDB_SECTIONS for k in keys), sorted(keys)
    assert panel_problems(hist, include_when=False, when=("eval_baseline",)) == []


def test_group_and_name_from_config(tmp_path):
    wandb_cfg = {"mode": "offline", "project": "proj-x", "name": "my-run", "group": "sweep-7"}
    logger = MetricsLogger(str(tmp_path), wandb_cfg, {"orchestrator": {"workflow": "judge"}}, experiment="ignored")
    logger.log({"step": 1, "judge/reward_mean": 0.5})
    logger.close()
    run = read_wandb_offline(next((tmp_path / "wandb").glob("offline-run-*")))
    assert (run["project"], run["group"], run["name"], run["job_type"]) == ("proj-x", "sweep-7", "my-run", "judge")
    assert run["history"][0]["judge/reward_mean"] == 0.5


def test_disabled_writes_no_wandb_run(tmp_path):
    logger = MetricsLogger(str(tmp_path), {"mode": "disabled"}, {}, "x")
    logger.log(train_row(1))
    logger.close()
    assert not (tmp_path / "wandb").exists()
    assert read_metrics(tmp_path / "metrics.jsonl") == [train_row(1)]


def test_panel_file_is_well_formed():
    spec = json.loads(PANELS.read_text())
    titles = [p["title"] for s in spec["sections"] for p in s["panels"]]
    assert len(titles) == len(set(titles))
    names = {s["name"] for s in spec["sections"]}
    assert {"Distillation", "Evaluation", "Roles"} <= names
    for section in spec["sections"]:
        for panel in section["panels"]:
            assert ("y" in panel) != ("y_regex" in panel), panel
            for y in panel.get("y", []):
                assert wandb_key(y) == y, y  # panels name W&B's keys, not metrics.jsonl's
            if "y_regex" in panel:
                re.compile(panel["y_regex"])
    # the dashboard the issue asks for: teacher KL, reward, eval baselines, role utilisation
    flat = json.dumps(spec)
    for needle in ("teacher/kl", "train/reward/mean", "baseline_(student|teacher)", "util/inference"):
        assert needle in flat, needle


def test_panel_check_can_fail():
    assert panel_problems([{"teacher/kl": 1.0}], include_when=False)  # most panels lack data: reported


def test_read_wandb_offline_rejects_other_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_wandb_offline(tmp_path)
    (tmp_path / "run-x.wandb").write_bytes(b"not a wandb file")
    with pytest.raises(ValueError, match="not a W&B run file"):
        read_wandb_offline(tmp_path)


def test_config_default_group_is_the_experiment():
    assert Config().wandb.group == ""  # empty: MetricsLogger groups by the experiment's name
