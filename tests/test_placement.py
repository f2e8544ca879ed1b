"""Placement plan: which actor sees which devices. Pure, no GPUs needed."""

from __future__ import annotations

import pytest

from shared.config import ConfigError, load
from shared.placement import ActorPlan, describe, plan


def _by_role(actors: list[ActorPlan], role: str) -> list[ActorPlan]:
    return [a for a in actors if a.role == role]


def _assert_common(actors: list[ActorPlan]) -> None:
    names = [a.name for a in actors]
    assert len(names) == len(set(names)), names
    assert [a.role for a in actors[:1]] == ["orchestrator"]
    for a in actors:
        assert a.env["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] == "1", a
        assert a.env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, a.devices)), a
    for role in ("inference", "teacher", "trainer"):
        assert [a.index for a in _by_role(actors, role)] == list(range(len(_by_role(actors, role))))


def test_users_card():
    actors = plan(load(["--inference_gpu_ids", "0,1", "--teacher_gpu_ids", "2", "--trainer_gpu_ids", "3"]))
    _assert_common(actors)

    inference = _by_role(actors, "inference")
    assert [a.env["CUDA_VISIBLE_DEVICES"] for a in inference] == ["0", "1"]
    assert [a.devices for a in inference] == [[0], [1]]
    assert all(a.tp == 1 for a in inference)

    teacher = _by_role(actors, "teacher")
    assert [a.env["CUDA_VISIBLE_DEVICES"] for a in teacher] == ["2"]

    trainer = _by_role(actors, "trainer")
    assert len(trainer) == 1
    assert trainer[0].index == 0 and trainer[0].devices == [3]
    assert trainer[0].env["CUDA_VISIBLE_DEVICES"] == "3"
    assert trainer[0].backend == "nccl"

    orchestrator = _by_role(actors, "orchestrator")
    assert len(orchestrator) == 1 and orchestrator[0].devices == []
    assert len(actors) == 5


@pytest.mark.parametrize("dp", ["0", "2"])
def test_tp2_over_four_ids(dp):
    actors = plan(load(["--inference_gpu_ids", "0,1,2,3", "--inference.parallel.tp", "2", "--inference.parallel.dp", dp]))
    _assert_common(actors)
    inference = _by_role(actors, "inference")
    assert [a.env["CUDA_VISIBLE_DEVICES"] for a in inference] == ["0,1", "2,3"]
    assert [a.devices for a in inference] == [[0, 1], [2, 3]]
    assert all(a.tp == 2 for a in inference)


def test_teacher_tp_and_multi_rank_trainer():
    actors = plan(
        load(["--teacher_gpu_ids", "4,5", "--teacher.parallel.tp", "2", "--trainer_gpu_ids", "6", "7", "--inference_gpu_ids", "0"])
    )
    _assert_common(actors)
    teacher = _by_role(actors, "teacher")
    assert [(a.env["CUDA_VISIBLE_DEVICES"], a.tp) for a in teacher] == [("4,5", 2)]
    trainer = _by_role(actors, "trainer")
    assert [(a.index, a.env["CUDA_VISIBLE_DEVICES"], a.backend) for a in trainer] == [(0, "6", "nccl"), (1, "7", "nccl")]


def test_no_ids_is_a_cpu_plan():
    actors = plan(load(["--trainer.cpu_ranks", "2", "--inference.parallel.dp", "3", "--teacher.parallel.dp", "2"]))
    _assert_common(actors)
    for a in actors:
        assert a.devices == [] and a.env["CUDA_VISIBLE_DEVICES"] == "", a
    trainer = _by_role(actors, "trainer")
    assert [(a.index, a.backend) for a in trainer] == [(0, "gloo"), (1, "gloo")]
    assert len(_by_role(actors, "inference")) == 3
    assert len(_by_role(actors, "teacher")) == 2


def test_cpu_defaults_one_of_each():
    actors = plan(load([]))
    _assert_common(actors)
    assert [a.name for a in actors] == ["orchestrator-0", "inference-0", "teacher-0", "trainer-0"]
    assert _by_role(actors, "trainer")[0].backend == "gloo"


def test_mixed_gpu_and_cpu_roles():
    actors = plan(load(["--inference_gpu_ids", "0"]))
    _assert_common(actors)
    assert _by_role(actors, "inference")[0].devices == [0]
    assert _by_role(actors, "teacher")[0].devices == []
    assert _by_role(actors, "trainer")[0].backend == "gloo"


def test_describe_lists_every_actor():
    actors = plan(load(["--inference_gpu_ids", "0,1,2,3", "--inference.parallel.tp", "2", "--teacher_gpu_ids", "4", "--trainer_gpu_ids", "5,6"]))
    text = describe(actors)
    lines = text.splitlines()
    assert lines[0] == "# placement plan"
    assert len(lines) == 1 + len(actors)
    assert all(line.startswith("#") for line in lines)  # TOML comments: --dry_run output stays parseable
    for a in actors:
        (line,) = [line for line in lines if f" {a.name} " in line]
        assert f"CUDA_VISIBLE_DEVICES={a.env['CUDA_VISIBLE_DEVICES']!r}" in line
        if a.devices:
            assert f"GPU {','.join(map(str, a.devices))}" in line
        else:
            assert "CPU" in line
    assert "tp=2" in text and "backend=nccl" in text


def test_describe_cpu_plan():
    text = describe(plan(load(["--trainer.cpu_ranks", "2"])))
    for name in ("orchestrator-0", "inference-0", "teacher-0", "trainer-0", "trainer-1"):
        assert name in text
    assert "backend=gloo" in text and "GPU" not in text


def test_ids_count_within_the_gpus_rl_sees():
    """rl under CUDA_VISIBLE_DEVICES=4,5,6,7 (Slurm without a device cgroup): id i is the i-th of them, and
    that physical GPU is what the actor gets; tensor-parallel groups keep their order; UUIDs pass through."""
    cfg = load(["--inference_gpu_ids", "0,1", "--teacher_gpu_ids", "2", "--trainer_gpu_ids", "3"])
    actors = plan(cfg, "4,5,6,7")
    assert [a.env["CUDA_VISIBLE_DEVICES"] for a in actors] == ["", "4", "5", "6", "7"]
    assert [a.devices for a in actors] == [[], [0], [1], [2], [3]]  # the plan still speaks in rl's ids
    tp = plan(load(["--inference_gpu_ids", "0,1", "--inference.parallel.tp", "2", "--teacher_gpu_ids", "2",
                    "--trainer_gpu_ids", "3"]), "GPU-a, GPU-b,GPU-c,GPU-d")
    assert [a.env["CUDA_VISIBLE_DEVICES"] for a in tp if a.role != "orchestrator"] == ["GPU-a,GPU-b", "GPU-c", "GPU-d"]
    assert [a.env["CUDA_VISIBLE_DEVICES"] for a in plan(cfg)] == ["", "0", "1", "2", "3"]  # unset: ids as they are
    with pytest.raises(ConfigError, match=r"^trainer\.gpu_ids: GPU id 3, but rl sees 3 GPU\(s\) "
                                          r"\(CUDA_VISIBLE_DEVICES='4,5,6'\); ids count from 0 within them$"):
        plan(cfg, "4,5,6")
    with pytest.raises(ConfigError, match=r"^inference\.gpu_ids: GPU id 0, but rl sees 0 GPU\(s\)"):
        plan(cfg, "")
