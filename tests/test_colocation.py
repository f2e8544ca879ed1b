"""Roles that share GPUs (placement.colocate): the memory plan by hand-worked numbers, the CLI's dry run, and the
order of calls per step in the real loop (stand-in actors, as in tests/test_async.py). Nothing here needs a GPU;
what vLLM's sleep mode does on one has never run here (docs/gpus-and-clusters.md)."""

from __future__ import annotations

import re

import pytest

from shared.config import ConfigError, load
from shared.placement import describe, gpu_loads, plan
from tests.test_async import _orchestrator, local_ray  # noqa: F401  (local_ray: a fixture used below)
from tests.test_bad_input import run_rl

ONE_GPU = ["--inference_gpu_ids", "0", "--teacher_gpu_ids", "0", "--trainer_gpu_ids", "0", "--placement.colocate"]


def _shares(inference: float, teacher: float, trainer: float, *more: str) -> list[str]:
    return [*ONE_GPU, "--inference.gpu_memory_utilization", str(inference),
            "--teacher.gpu_memory_utilization", str(teacher), "--trainer.gpu_memory_fraction", str(trainer), *more]


def test_one_gpu_without_sleep_is_the_plain_sum():
    actors = plan(load(_shares(0.3, 0.3, 0.3, "--placement.sleep", "false")))
    assert [(a.name, a.memory, a.sleeps) for a in actors if a.devices] == [
        ("inference-0", 0.3, False), ("teacher-0", 0.3, False), ("trainer-0", 0.3, False)]
    (load0,) = gpu_loads(actors)
    assert load0.actors == ["inference-0", "teacher-0", "trainer-0"]
    assert load0.serve == pytest.approx(0.9) and load0.train == pytest.approx(0.9)  # 0.3 + 0.3 + 0.3, both phases


def test_one_gpu_with_sleep_splits_the_step_into_two_phases():
    actors = plan(load(_shares(0.3, 0.3, 0.3)))  # placement.sleep defaults to true
    assert [a.name for a in actors if a.sleeps] == ["inference-0", "teacher-0"]
    (trainer,) = [a for a in actors if a.role == "trainer"]
    assert (trainer.memory, trainer.held) == (0.3, 0.1)  # trainer.gpu_memory_idle_fraction's default
    (load0,) = gpu_loads(actors)
    assert load0.serve == pytest.approx(0.7)  # engines awake 0.3 + 0.3, the idle trainer holds 0.1
    assert load0.train == pytest.approx(0.3)  # the trainer alone: both engines asleep
    assert load0.need == pytest.approx(0.7)


def test_overcommit_without_sleep_names_the_gpu_and_every_share():
    with pytest.raises(ConfigError) as e:
        plan(load(_shares(0.5, 0.5, 0.3, "--placement.sleep", "false")))
    assert str(e.value) == (
        "placement.colocate: GPU 0 is over-committed: 1.30 > 1 (inference-0 0.5 "
        "(inference.gpu_memory_utilization); teacher-0 0.5 (teacher.gpu_memory_utilization); trainer-0 0.3 "
        "(trainer.gpu_memory_fraction)); lower the shares")


def test_sleep_lets_the_trainer_reuse_the_engines_share():
    # 0.45 + 0.45 + 0.6 = 1.5 together; with sleep: serve 0.45 + 0.45 + 0.1 = 1.0, train 0.6: fits exactly
    with pytest.raises(ConfigError, match=r"^placement\.colocate: GPU 0 is over-committed: 1\.50 > 1 "):
        plan(load(_shares(0.45, 0.45, 0.6, "--placement.sleep", "false")))
    (load0,) = gpu_loads(plan(load(_shares(0.45, 0.45, 0.6))))
    assert (load0.serve, load0.train) == (pytest.approx(1.0), pytest.approx(0.6))
    # 0.5 + 0.5 with sleep: the engines alone fill the GPU, and the trainer keeps 0.1 between steps: 1.10
    with pytest.raises(ConfigError) as e:
        plan(load(_shares(0.5, 0.5, 0.3)))
    assert re.fullmatch(r"placement\.colocate: GPU 0 is over-committed while the engines run: 1\.10 > 1 \(.*"
                        r"trainer-0 holds 0\.1 between steps \(trainer\.gpu_memory_idle_fraction\)\); lower the shares",
                        str(e.value)), str(e.value)
    # ... and fits when the trainer holds less between steps (0.5 + 0.5 + 0.05 would not: 1.05)
    with pytest.raises(ConfigError, match="1.05 > 1"):
        plan(load(_shares(0.5, 0.5, 0.3, "--trainer.gpu_memory_idle_fraction", "0.05")))
    (load0,) = gpu_loads(plan(load(_shares(0.48, 0.48, 0.9, "--trainer.gpu_memory_idle_fraction", "0.04"))))
    assert (load0.serve, load0.train) == (pytest.approx(1.0), pytest.approx(0.9))


def test_only_engines_beside_a_trainer_rank_sleep():
    # inference 0.1 beside the trainer sleeps; the teacher on GPU 1 shares with nobody
    args = ["--inference_gpu_ids", "0", "--teacher_gpu_ids", "1", "--trainer_gpu_ids", "0", "--placement.colocate",
            "--inference.gpu_memory_utilization", "0.1", "--trainer.gpu_memory_fraction", "0.95"]
    actors = plan(load(args))
    assert [a.name for a in actors if a.sleeps] == ["inference-0"]
    loads = gpu_loads(actors)
    assert [(x.gpu, x.actors) for x in loads] == [(0, ["inference-0", "trainer-0"]), (1, ["teacher-0"])]
    assert (loads[0].serve, loads[0].train) == (pytest.approx(0.2), pytest.approx(0.95))  # 0.1 + 0.1 | 0.95
    assert loads[1].need == pytest.approx(0.85)  # the teacher's default share, alone
    # sleep off: 0.1 + 0.95 = 1.05 all the time
    with pytest.raises(ConfigError, match=r"^placement\.colocate: GPU 0 is over-committed: 1\.05 > 1 "):
        plan(load([*args, "--placement.sleep", "false"]))


def test_engines_sharing_only_with_each_other_never_sleep_and_may_run_ahead():
    actors = plan(load(["--inference_gpu_ids", "0", "--teacher_gpu_ids", "0", "--trainer_gpu_ids", "1",
                        "--placement.colocate", "--inference.gpu_memory_utilization", "0.4",
                        "--teacher.gpu_memory_utilization", "0.5", "--orchestrator.max_async_level", "2"]))
    assert not any(a.sleeps for a in actors)
    (load0,) = [x for x in gpu_loads(actors) if "inference-0" in x.actors]
    assert load0.actors == ["inference-0", "teacher-0"] and load0.need == pytest.approx(0.9)


def test_a_tensor_parallel_engine_sleeps_when_one_of_its_gpus_has_a_trainer_rank():
    actors = plan(load(["--inference_gpu_ids", "0,1", "--inference.parallel.tp", "2", "--teacher_gpu_ids", "2",
                        "--trainer_gpu_ids", "1", "--placement.colocate", "--inference.gpu_memory_utilization", "0.6",
                        "--trainer.gpu_memory_fraction", "0.9"]))
    assert [a.name for a in actors if a.sleeps] == ["inference-0"]
    loads = {x.gpu: x for x in gpu_loads(actors)}
    assert loads[0].actors == ["inference-0"] and loads[0].need == pytest.approx(0.6)
    assert (loads[1].serve, loads[1].train) == (pytest.approx(0.7), pytest.approx(0.9))  # 0.6 + 0.1 | 0.9


def test_the_same_gpu_number_on_another_node_is_not_shared():
    actors = plan(load(["--inference_gpu_ids", "0", "--trainer_gpu_ids", "1:0", "--placement.colocate"]))
    assert not any(a.sleeps for a in actors)
    assert [(x.node, x.gpu, x.actors) for x in gpu_loads(actors)] == [(0, 0, ["inference-0"]), (1, 0, ["trainer-0"])]


def test_overlap_without_colocate_is_still_refused():
    with pytest.raises(ConfigError, match=r"^teacher\.gpu_ids: GPU 0 is also given to inference\.gpu_ids; roles may "
                                          r"not share a device unless placement\.colocate = true$"):
        load(ONE_GPU[:-1])


def test_sleep_needs_the_synchronous_loop():
    with pytest.raises(ConfigError, match=r"^placement\.sleep: engines sleep while the trainer steps, but "
                                          r"orchestrator\.max_async_level = 1 samples during its step; "):
        plan(load(_shares(0.3, 0.3, 0.3, "--orchestrator.max_async_level", "1")))
    # without sleep the shares must fit together, and the engines may sample while the trainer steps
    plan(load(_shares(0.3, 0.3, 0.3, "--orchestrator.max_async_level", "1", "--placement.sleep", "false")))


def test_the_idle_share_is_part_of_the_trainers_share():
    with pytest.raises(ConfigError, match=r"^trainer\.gpu_memory_idle_fraction: 0\.4 is above "
                                          r"trainer\.gpu_memory_fraction = 0\.3 "):
        plan(load(_shares(0.3, 0.3, 0.3, "--trainer.gpu_memory_idle_fraction", "0.4")))


def test_describe_shows_each_share_and_the_shared_gpus_totals():
    lines = describe(plan(load(_shares(0.3, 0.3, 0.3)))).splitlines()
    assert lines[2:] == [
        "#   inference-0    GPU 0 mem=0.3 (asleep while the trainer steps)  CUDA_VISIBLE_DEVICES='0'",
        "#   teacher-0      GPU 0 mem=0.3 (asleep while the trainer steps)  CUDA_VISIBLE_DEVICES='0'",
        "#   trainer-0      GPU 0 backend=nccl mem=0.3 (holds 0.1 between steps)  CUDA_VISIBLE_DEVICES='0'",
        "#   shared GPU 0: inference-0 + teacher-0 + trainer-0; engines running 0.70, trainer stepping 0.30 of its memory",
    ]
    plain = describe(plan(load(["--inference_gpu_ids", "0", "--trainer_gpu_ids", "1"])))
    assert "mem=" not in plain and "shared GPU" not in plain  # without colocate the plan reads as before


def test_engine_and_trainer_specs_follow_the_plan():
    from orchestrator.roles import memory_spec
    from shared.engines import llm_kwargs

    actors = {a.name: a for a in plan(load(_shares(0.3, 0.3, 0.3)))}
    assert memory_spec(actors["trainer-0"]) == {"gpu_memory_fraction": 0.3, "empty_cache": True}
    no_sleep = {a.name: a for a in plan(load(_shares(0.3, 0.3, 0.3, "--placement.sleep", "false")))}
    assert memory_spec(no_sleep["trainer-0"]) == {"gpu_memory_fraction": 0.3, "empty_cache": False}
    assert memory_spec(plan(load(["--trainer_gpu_ids", "0"]))[-1]) == {}  # its GPU to itself: no cap
    base = dict(dtype="float32", max_model_len=64, seed=0, gpu_memory_utilization=0.3, sleep=True)
    on_gpu = llm_kwargs("m", gpu=True, **base)
    assert on_gpu["enable_sleep_mode"] is True and on_gpu["gpu_memory_utilization"] == 0.3
    on_cpu = llm_kwargs("m", gpu=False, **base)  # vLLM's CPU platform refuses sleep mode: never asked for
    assert "enable_sleep_mode" not in on_cpu and "gpu_memory_utilization" not in on_cpu
    assert "enable_sleep_mode" not in llm_kwargs("m", gpu=True, **{**base, "sleep": False})


def test_dry_run_through_the_cli(tmp_path):
    args = ["--output_dir", str(tmp_path / "run"), "--dry_run"]
    ok = run_rl(*_shares(0.3, 0.3, 0.3), *args)
    assert ok.returncode == 0, ok.stderr
    assert "mem=0.3 (asleep while the trainer steps)" in ok.stdout
    assert "#   shared GPU 0: inference-0 + teacher-0 + trainer-0; engines running 0.70, trainer stepping 0.30" in ok.stdout
    bad = run_rl(*_shares(0.5, 0.5, 0.3, "--placement.sleep", "false"), *args)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "error: placement.colocate: GPU 0 is over-committed: 1.30 > 1 (inference-0 0.5 "
        "(inference.gpu_memory_utilization); teacher-0 0.5 (teacher.gpu_memory_utilization); trainer-0 0.3 "
        "(trainer.gpu_memory_fraction)); lower the shares"]


# -- the order of calls per step, in the real loop over stand-in actors ----------------------------------------
def _recording(log):
    """Subclasses of tests/test_async.py's stand-ins that append each call to the ``log`` actor."""
    import ray

    def wrap(Inference, Teacher, Trainer):
        def note(name):
            ray.get(log.add.remote(name))

        class Sleeps:  # the engines' sleep / wake_up (shared/engines.py), recorded
            role = ""

            def sleep(self, level):
                note(f"{self.role}.sleep({level})")

            def wake_up(self):
                note(f"{self.role}.wake_up")

        class RecInference(Sleeps, Inference):
            role = "inference"

            def generate(self, *a):
                note("inference.generate")
                return super().generate(*a)

            def load_adapter(self, path, step):
                note("inference.load_adapter")
                return super().load_adapter(path, step)

        class RecTeacher(Sleeps, Teacher):
            role = "teacher"

            def score(self, data):
                note("teacher.score")
                return super().score(data)

        class RecTrainer(Trainer):
            def train_step(self, data):
                note("trainer.train_step")
                return super().train_step(data)

        return RecInference, RecTeacher, RecTrainer

    return wrap


def _calls(local_ray, tiny_pair, tmp_path, monkeypatch, *args):
    import ray

    @ray.remote(num_cpus=0)
    class Log:
        def __init__(self):
            self.calls = []

        def add(self, name):
            self.calls.append(name)

        def get(self):
            return self.calls

    log = Log.remote()
    orch = _orchestrator(tiny_pair, tmp_path, monkeypatch, "--max_steps", "2", *args, wrap=_recording(log),
                         sample_s=0.0, train_s=0.0)
    assert orch.run()["steps"] == 2
    return ray.get(log.get.remote())


def _steps(calls):
    """The calls split into steps (each ends with the engines loading the new adapter)."""
    steps, current = [], []
    for c in calls:
        current.append(c)
        if c == "inference.load_adapter":
            steps.append(current)
            current = []
    assert current == []
    return steps


def test_colocated_step_sleeps_the_engines_around_the_trainer(local_ray, tiny_pair, tmp_path, monkeypatch):
    steps = _steps(_calls(local_ray, tiny_pair, tmp_path, monkeypatch, *_shares(0.3, 0.3, 0.3)))
    assert len(steps) == 2
    for s in steps:  # sample -> score -> sleep both engines -> train -> wake both -> load the new adapter
        assert s[:2] == ["inference.generate", "teacher.score"]
        assert sorted(s[2:4]) == ["inference.sleep(1)", "teacher.sleep(1)"]
        assert s[4] == "trainer.train_step"
        assert sorted(s[5:7]) == ["inference.wake_up", "teacher.wake_up"]
        assert s[7:] == ["inference.load_adapter"]


def test_no_sleep_or_wake_without_colocation(local_ray, tiny_pair, tmp_path, monkeypatch):
    steps = _steps(_calls(local_ray, tiny_pair, tmp_path, monkeypatch))
    assert steps == [["inference.generate", "teacher.score", "trainer.train_step", "inference.load_adapter"]] * 2
    # colocated but with sleep off: the same calls as without colocation
    steps = _steps(_calls(local_ray, tiny_pair, tmp_path / "nosleep", monkeypatch,
                          *_shares(0.3, 0.3, 0.3, "--placement.sleep", "false")))
    assert steps == [["inference.generate", "teacher.score", "trainer.train_step", "inference.load_adapter"]] * 2
