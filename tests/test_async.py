"""The asynchronous pipeline's bookkeeping (orchestrator/pipeline.py): staleness, drops, busy time, overlap.

The end-to-end k = 1 run is in tests/test_resume.py (one engine run covers async, SIGTERM and resume)."""

from __future__ import annotations

import pytest

from orchestrator.pipeline import Timeline, split_stale, staleness


def test_staleness_counts_steps_between_sampler_and_trainer():
    assert staleness(1, 0) == 0  # step 1 trains from the untouched student, which sampled its rollouts
    assert staleness(5, 4) == 0  # synchronous: step 5's rollouts came from the adapter of step 4
    assert staleness(5, 3) == 1  # sampled while step 4 trained
    assert staleness(5, 2) == 2


def test_split_stale_keeps_what_k_allows_and_drops_whole_groups():
    adapter_steps = {10: 4, 11: 3, 12: 2, 13: 4}  # prompt index -> adapter step that sampled its group
    dropped, kept = split_stale(5, adapter_steps, 1)
    assert dropped == {12}  # staleness 2 > k = 1
    assert kept == [0, 1, 0]  # prompts 10, 11, 13 in index order
    assert split_stale(5, adapter_steps, 2) == (set(), [0, 1, 2, 0])
    dropped, kept = split_stale(5, adapter_steps, 0)
    assert dropped == {11, 12} and kept == [0, 0]


def test_k0_never_drops_synchronous_rollouts():
    for step in range(1, 20):
        assert split_stale(step, {0: step - 1, 1: step - 1}, 0) == (set(), [0, 0])


def test_timeline_busy_is_the_union_clipped_to_the_window():
    t = Timeline()
    t.add("inference", 0.0, 2.0)
    t.add("inference", 1.0, 3.0)  # overlaps the first call of the same role: counted once
    t.add("trainer", 2.5, 6.0)
    t.add("teacher", 7.0, 7.0)  # empty: ignored
    busy = t.busy(0.0, 5.0)
    assert busy["inference"] == pytest.approx(3.0)
    assert busy["trainer"] == pytest.approx(2.5)  # clipped at 5.0
    assert t.overlap(0.0, 5.0) == pytest.approx(0.5)  # 2.5..3.0: inference and trainer at once
    assert t.overlap(0.0, 2.6) == pytest.approx(0.1)


def test_timeline_metrics_and_sequential_roles_do_not_overlap():
    t = Timeline()
    t.add("inference", 0.0, 1.0)
    t.add("teacher", 1.0, 1.5)  # starts as inference ends: no overlap
    t.add("trainer", 1.5, 4.0)
    t.add("weight_update", 3.5, 4.0)  # not one of the roles asked about: no overlap counted
    row = t.metrics(0.0, 4.0, ("inference", "teacher", "trainer"))
    assert row == pytest.approx({"busy/inference": 0.25, "busy/teacher": 0.125, "busy/trainer": 0.625,
                                 "time/overlap": 0.0})
    assert t.overlap(0.0, 4.0) == pytest.approx(0.5)  # with every role


def test_timeline_forget_keeps_calls_still_relevant():
    t = Timeline()
    t.add("inference", 0.0, 1.0)
    t.add("trainer", 0.5, 3.0)
    t.forget(2.0)
    assert t.busy(0.0, 10.0) == {"inference": 0.0, "trainer": pytest.approx(2.5)}


# -- the real orchestrator loop over real Ray actors that stand in for the engines and the trainer ------------
# (seconds instead of minutes: the pipeline's scheduling, staleness, drops, checkpoints and restarts do not
# depend on what the roles compute.)
def _fake_roles(out, sample_s=0.15, train_s=0.3, fail_at=None, hang_at=None, context=None):
    """Actor classes with the roles' methods; ``fail_at``: the trainer's process dies in that step once
    (a marker file remembers it, so the restarted trainer goes on); ``context``: the engines refuse, as vLLM
    does, a prompt + max_tokens (sampling) or a prompt + completion (scoring) longer than this."""
    import os
    import time
    from pathlib import Path

    from shared.wire import SUMMED_METRICS, Rollout, RolloutBatch, ScoreRequest, ScoreResult, StepResult, TrainBatch
    from shared.wire import decode, encode

    class Inference:
        def __init__(self):
            self.adapter_step = 0

        def generate(self, prompt_ids, indices, n, temperature, top_p, max_tokens, seed):
            time.sleep(sample_s)
            if context and max(map(len, prompt_ids)) + max_tokens > context:
                raise ValueError(f"prompt of {max(map(len, prompt_ids))} tokens + {max_tokens} > {context}")
            rollouts = [Rollout(prompt_index=i, prompt_ids=ids, completion_ids=[5, 6, 7], logprobs=[-1.0] * 3)
                        for ids, i in zip(prompt_ids, indices) for _ in range(n)]
            return encode(RolloutBatch(rollouts=rollouts, adapter_step=self.adapter_step))

        def load_adapter(self, path, step):
            self.adapter_step = step

    class Teacher:
        def score(self, data):
            req = decode(data, ScoreRequest)
            time.sleep(0.02)
            if context and any(len(p) + len(c) > context for p, c in zip(req.prompt_ids, req.completion_ids)):
                raise ValueError(f"more than {context} positions to score")
            return encode(ScoreResult(logprobs=[[-1.5] * len(c) for c in req.completion_ids]))

    class Trainer:
        def train_step(self, data):
            batch = decode(data, TrainBatch)
            time.sleep(train_s)
            marker = Path(out) / f".died_at_{batch.step}"
            if batch.step == fail_at and not marker.exists():
                marker.write_text("")
                os._exit(1)  # the process dies, as with the OOM killer
            if batch.step == hang_at:
                print("rank 0: entering the step's all-reduce", flush=True)
                time.sleep(3600)  # hung (a collective whose peer is gone)
            metrics = {**dict.fromkeys(SUMMED_METRICS, 0.0), "grad_norm": float(batch.step), "skipped_step": 0.0,
                       "lr": 1e-3, "tokens": float(batch.total_tokens)}
            return encode(StepResult(step=batch.step, metrics=metrics, adapter_path=f"{out}/broadcast/step_{batch.step}"))

        def save_checkpoint(self, directory):
            (Path(directory) / "trainer").mkdir(parents=True, exist_ok=True)
            return 0.0

        def load_checkpoint(self, directory, step):
            return 0.0

    return Inference, Teacher, Trainer


@pytest.fixture(scope="module")
def local_ray():
    import os

    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    import ray

    from orchestrator.launcher import ray_init_kwargs
    from shared.config import load

    ray.init(**ray_init_kwargs(load([])))
    yield ray
    ray.shutdown()


def _orchestrator(tiny_pair, tmp_path, monkeypatch, *args, wrap=None, skipped=None, **fake):
    """The real Orchestrator over the stand-in roles of :func:`_fake_roles` (``wrap``: a function that returns
    other classes from those three, as tests/test_colocation.py's recording ones)."""
    import msgspec
    import ray

    import orchestrator.orchestrator as om
    from shared.config import load
    from shared.placement import RunPlan, plan

    cfg = load(["--output_dir", str(tmp_path / "run"), "--wandb.mode", "disabled", "--orchestrator.batch_size", "4",
                "--orchestrator.group_size", "2", "--orchestrator.eval.interval", "0", *args])
    monkeypatch.setattr(om, "redirect_output", lambda path: None)
    orch = om.Orchestrator(msgspec.json.encode(cfg), msgspec.json.encode(
        RunPlan(student=str(tiny_pair[1]), teacher=str(tiny_pair[0]), actors=plan(cfg), skipped=skipped or {})))
    classes = _fake_roles(tmp_path / "run", **fake)
    classes = wrap(*classes) if wrap else classes

    def start_roles():
        orch.roles.actors = {role: [ray.remote(c).options(num_cpus=0).remote()]
                       for role, c in zip(("inference", "teacher", "trainer"), classes)}
        return {}

    monkeypatch.setattr(orch, "_start_roles", start_roles)
    monkeypatch.setattr(orch, "_evaluate", lambda env, **kw: 0.5)
    return orch


def _rows(tmp_path):
    from shared.metrics import read_metrics

    return read_metrics(tmp_path / "run" / "metrics.jsonl")


def test_k2_pipeline_is_two_steps_stale_and_overlaps(local_ray, tiny_pair, tmp_path, monkeypatch):
    orch = _orchestrator(tiny_pair, tmp_path, monkeypatch, "--max_steps", "6", "--orchestrator.max_async_level", "2")
    summary = orch.run()
    train = [r for r in _rows(tmp_path) if "teacher_kl" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and summary["steps"] == 6
    assert [r["async/staleness_max"] for r in train] == [0, 1, 2, 2, 2, 2]
    assert all(r["async/dropped_rollouts"] == 0 for r in train)
    # steps 1..4 sample later steps (0.15 s each) while the trainer trains (0.3 s); steps 5 and 6 have nothing
    # left to sample (max_steps)
    assert all(r["time/overlap"] > 0.05 for r in train[:4]), [r["time/overlap"] for r in train]
    # from step 2 on the trainer is busy most of each step (step 1 also waits for the first sampling, on actors
    # that start cold: under load its share fell to 0.28-0.46 in the old code and the new alike)
    assert all(r["busy/trainer"] > 0.5 for r in train[1:]), [r["busy/trainer"] for r in train]
    assert not orch.pipe.inflight and not orch.pipe.queue  # nothing sampled past max_steps, nothing left in flight


def test_k0_is_synchronous(local_ray, tiny_pair, tmp_path, monkeypatch):
    orch = _orchestrator(tiny_pair, tmp_path, monkeypatch, "--max_steps", "3")
    orch.run()
    train = [r for r in _rows(tmp_path) if "teacher_kl" in r]
    assert [r["async/staleness_max"] for r in train] == [0, 0, 0]
    assert all(r["time/overlap"] < 0.02 for r in train)
    for r in train:
        assert r["time/step"] >= r["time/inference"] + r["time/teacher"] + r["time/trainer"] - 1e-6


def test_buffer_restored_under_a_smaller_k_is_dropped_and_counted(local_ray, tiny_pair, tmp_path, monkeypatch):
    """A checkpoint written with k = 2 holds the next two steps' rollouts; resumed with k = 0 they are
    too stale: dropped as whole groups, counted, and the steps are skipped rather than trained on them."""
    orch = _orchestrator(tiny_pair, tmp_path, monkeypatch, "--max_steps", "3", "--orchestrator.max_async_level", "2",
                         "--ckpt.interval", "3")
    orch._stop.set()  # as SIGTERM would: stop after step 1 with a checkpoint
    summary = orch.run()
    assert summary["stopped"] and summary["steps"] == 1
    assert [b["step"] for b in checkpoint_state(tmp_path)["buffer"]] == [2, 3]
    orch = _orchestrator(tiny_pair, tmp_path, monkeypatch, "--max_steps", "3", "--resume",
                         "--trainer.max_bad_steps", "0")
    orch.run()
    train = {r["step"]: r for r in _rows(tmp_path) if "async/dropped_rollouts" in r}
    assert sorted(train) == [1, 2, 3]
    assert train[1]["async/dropped_rollouts"] == 0
    # both buffered batches were sampled by adapter 0: staleness 1 and 2 > k = 0; 4 prompts x 2 samples each
    assert [train[s]["async/dropped_rollouts"] for s in (2, 3)] == [8, 8]
    assert [train[s]["skipped_step"] for s in (2, 3)] == [1.0, 1.0]


def checkpoint_state(tmp_path):
    from orchestrator import checkpoint

    return checkpoint.read_state(checkpoint.latest(tmp_path / "run")[1])


def test_restart_after_the_trainer_dies(local_ray, tiny_pair, tmp_path, monkeypatch):
    """on_failure = "restart": the trainer's process dies in step 4; every role restarts from the checkpoint
    of step 2, steps 3.. run again, and metrics.jsonl has each step once."""
    orch = _orchestrator(tiny_pair, tmp_path, monkeypatch, "--max_steps", "5", "--ckpt.interval", "2",
                         "--ckpt.on_failure", "restart", "--ckpt.max_restarts", "1", fail_at=4)
    summary = orch.run()
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows if "teacher_kl" in r] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in rows if "restarted_from" in r] == [2]  # the checkpoint before the failure
    assert summary["restarts"][0]["role"] == "trainer"


def test_failure_without_restart_names_the_role_and_cancels_in_flight_work(local_ray, tiny_pair, tmp_path,
                                                                          monkeypatch):
    from orchestrator.failures import RoleFailure

    orch = _orchestrator(tiny_pair, tmp_path, monkeypatch, "--max_steps", "5", "--orchestrator.max_async_level", "1",
                         fail_at=2)
    with pytest.raises(RoleFailure) as e:
        orch.run()
    assert e.value.role == "trainer" and "\n" not in str(e.value)
    assert str(e.value).startswith("trainer failed: trainer-0: ") and str(e.value).endswith("(see logs/trainer-0.log)")
    assert not orch.pipe.inflight


def test_a_hung_trainer_stops_the_run_at_its_deadline(local_ray, tiny_pair, tmp_path, monkeypatch):
    """A train step that never returns: the pipeline's deadline (floor 8 s here) stops the run with one line
    naming the role, the actor, the call and the step, and the tail of the actor's log as detail. (The floor
    holds for every call: at 3 s a generate on a machine loaded by other jobs once outlived it first.)"""
    import time

    from orchestrator.failures import RoleFailure

    log = tmp_path / "run" / "logs" / "trainer-0.log"
    log.parent.mkdir(parents=True)
    log.write_text("loading\nrank 0: entering the step's all-reduce\n")
    orch = _orchestrator(tiny_pair, tmp_path, monkeypatch, "--max_steps", "4", "--orchestrator.deadline.floor_s", "8",
                         hang_at=2)
    t0 = time.monotonic()
    with pytest.raises(RoleFailure) as e:
        orch.run()
    waited = time.monotonic() - t0
    assert e.value.role == "trainer" and "\n" not in str(e.value)
    assert "trainer-0 did not answer train_step in step 2 within its deadline" in str(e.value)
    assert e.value.detail.splitlines()[-1] == "rank 0: entering the step's all-reduce"
    assert waited < 45, waited  # the deadline, not the hour the step would take
    assert not orch.pipe.inflight
    steps = [r["step"] for r in _rows(tmp_path) if "teacher_kl" in r]
    assert steps == [1]
    assert all(r["heartbeat/trainer"] >= 0 for r in _rows(tmp_path) if "teacher_kl" in r)


def test_deadline_is_the_floor_then_a_multiple_of_the_median(tmp_path):
    from orchestrator.deadlines import Deadlines, log_tail
    from shared.config import load

    d = Deadlines(load(["--orchestrator.deadline.floor_s", "10", "--orchestrator.deadline.median_multiple", "4",
                        "--orchestrator.deadline.after_calls", "3"]), tmp_path)
    assert d.limit("trainer") == 10  # nothing measured yet
    for s in (1.0, 9.0):
        d.record("trainer", s)
    assert d.limit("trainer") == 10  # two calls: still the floor
    d.record("trainer", 5.0)
    assert d.limit("trainer") == 20  # median 5 x 4 = 20 > 10
    assert d.limit("inference") == 10  # each kind on its own
    for _ in range(3):
        d.record("inference", 0.5)
    assert d.limit("inference") == 10  # 4 x 0.5 = 2 < the floor
    (tmp_path / "a.log").write_text("\n".join(f"line {i}" for i in range(20)) + "\n\n")
    assert log_tail(tmp_path / "a.log", 3) == "line 17\nline 18\nline 19" and log_tail(tmp_path / "none.log") == ""


def test_prompts_too_long_at_run_time_are_dropped_counted_and_reported(local_ray, tiny_pair, tmp_path, monkeypatch):
    """Prompts that leave no room for inference.max_tokens (here: dataset rows the preflight would have caught, as
    a teacher-written question would not be) are never sent to an engine that would refuse them: each step's row
    counts their rollouts in ``rollouts/too_long``, the run completes, and the report totals them with the
    dataset rows skipped at start (the plan's ``skipped``, logged in the step-0 row)."""
    import json

    from orchestrator.report import write_report

    rows = [{"prompt": "abcd=", "answer": "dcba"}, {"prompt": "x" * 70 + "=", "answer": "x" * 70},
            {"prompt": "dcb=", "answer": "bcd"}, {"prompt": "y" * 70 + "=", "answer": "y" * 70}]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    orch = _orchestrator(tiny_pair, tmp_path, monkeypatch, "--max_steps", "3", "--orchestrator.environment",
                         "reverse_text", "--orchestrator.dataset.path", str(data), "--model.max_model_len", "64",
                         "--inference.max_tokens", "16", skipped={"malformed": 3}, context=64)
    summary = orch.run()
    metrics = _rows(tmp_path)
    assert metrics[0]["step"] == 0 and metrics[0]["data/skipped_malformed"] == 3.0
    train = [r for r in metrics if "teacher_kl" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    # 4 prompts a step (batch_size 4 = the whole file each epoch), 2 of them too long, 2 samples each
    assert [r["rollouts/too_long"] for r in train] == [4.0, 4.0, 4.0]
    assert all(r["skipped_step"] == 0.0 and r["teacher/score_failed"] == 0.0 for r in train)
    report = write_report(tmp_path / "run", summary, "").read_text()
    assert "| dataset rows skipped (malformed) | `data/skipped_malformed` | 3 |" in report
    assert "| rollouts not sampled: prompt + inference.max_tokens longer than model.max_model_len | " \
           "`rollouts/too_long` | 12 |" in report
