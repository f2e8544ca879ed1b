"""Several named teachers (``[teachers.NAME]``, orchestrator/teacher_set.py): config rules, the placement plan,
routing each prompt to its teacher, the merge of their scores, and the per-teacher metrics (engine-free).
The real run with two teacher engines is tests/test_workflows.py::test_continual_workflow_two_steps_two_teachers."""

from __future__ import annotations

import math

import pytest

from orchestrator.data import Prompt
from orchestrator.teacher_set import TeacherSet, check_rows, route, teacher_backend, teacher_metrics
from orchestrator.teachers import EngineTeacher
from shared.config import ConfigError, load, primary_teacher, teacher_configs, teacher_view
from shared.placement import describe, plan
from shared.wire import ScoreRequest, ScoreResult, decode, encode

TWO = ["--teachers.a.name", "ta", "--teachers.b.name", "tb"]
BY_ENV = [*TWO, "--orchestrator.continual.core_environments", "reverse_text_short",
          "--orchestrator.continual.replay_ratio", "0.25", "--orchestrator.teacher_route.by", "env",
          "--orchestrator.teacher_route.env.reverse_text", "a", "--orchestrator.teacher_route.env.reverse_text_short", "b"]


def test_one_teacher_is_unchanged_and_named_default():
    cfg = load([])
    assert cfg.teachers == {} and list(teacher_configs(cfg)) == ["default"]
    assert teacher_view(cfg) is cfg and primary_teacher(cfg) == "default"
    assert isinstance(teacher_backend(cfg), EngineTeacher)  # not a TeacherSet: nothing changes for one teacher
    teachers = [a for a in plan(cfg) if a.role == "teacher"]
    assert [(a.name, a.teacher) for a in teachers] == [("teacher-0", "")]
    assert "teacher=" not in describe(plan(cfg))


def test_named_teachers_from_toml_and_cli(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text('[teachers.math]\nname = "m"\ndtype = "bfloat16"\n[teachers.code]\nname = "c"\nkv_cache_gib = 2\n'
                 '[orchestrator.teacher_route]\ndefault = "code"\n')
    cfg = load(["@", str(f), "--teachers.math.gpu_ids", "0,1"])
    assert list(cfg.teachers) == ["math", "code"]  # table order
    assert cfg.teachers["math"].gpu_ids == [0, 1] and cfg.teachers["math"].dtype == "bfloat16"
    assert cfg.teachers["code"].kv_cache_gib == 2 and cfg.teachers["code"].dtype == "float32"  # [teacher]'s defaults
    assert primary_teacher(cfg) == "code" and teacher_view(cfg).teacher.name == "c"
    assert teacher_view(cfg, "math").teacher.name == "m" and cfg.teacher.name == "tiny-reverse-teacher"
    assert primary_teacher(load(TWO)) == "a"  # no default: the first table
    assert primary_teacher(load(BY_ENV + ["--orchestrator.environment", "reverse_text"])) == "a"


@pytest.mark.parametrize("argv, message", [
    ([*TWO, "--teacher.name", "x"], r"^teacher: both \[teacher\] and \[teachers\.NAME\] are given"),
    ([*TWO, "--teacher_gpu_ids", "0"], r"^teacher: both \[teacher\] and \[teachers\.NAME\]"),
    (["--teachers.a b.name", "x"], r'^teachers\."a b": a teacher\'s name is letters'),
    (["--teachers.a.nme", "x"], r"^teachers\.a\.nme: unknown option"),
    ([*TWO, "--orchestrator.teacher_route.default", "c"], r'^orchestrator\.teacher_route\.default: unknown teacher "c" \(teachers: a, b\)'),
    ([*TWO, "--orchestrator.teacher_route.by", "env"], r'^orchestrator\.teacher_route\.env: by = "env" needs'),
    ([*TWO, "--orchestrator.teacher_route.env.reverse_text", "a"], r'^orchestrator\.teacher_route\.env: only used with'),
    ([*TWO, "--orchestrator.teacher_route.by", "env", "--orchestrator.teacher_route.env.arithmetic", "a"],
     r'^orchestrator\.teacher_route\.env\.arithmetic: "arithmetic" is not an environment of this run'),
    ([*BY_ENV, "--orchestrator.teacher_route.env.reverse_text_short", "c"],
     r'^orchestrator\.teacher_route\.env\.reverse_text_short: unknown teacher "c" \(teachers: a, b\)'),
    ([*TWO, "--orchestrator.teacher_route.by", "column"], r'^orchestrator\.teacher_route\.by: "column" reads the "teacher" field'),
    (["--orchestrator.teacher_route.by", "env"], r'^orchestrator\.teacher_route\.by: "env" picks among \[teachers\.NAME\] tables, and none'),
    (["--orchestrator.teacher_route.default", "a"], r"^orchestrator\.teacher_route\.default: only used with \[teachers\.NAME\]"),
    ([*TWO, "--orchestrator.workflow", "judge"], r'^orchestrator\.workflow: "judge" asks one teacher'),
    ([*TWO, "--teachers.b.endpoint", "ftp://h"], r"^teachers\.b\.endpoint: expected an http:// or https:// base URL"),
    ([*TWO, "--teachers.b.model", "m"], r"^teachers\.b\.model: only used with teachers\.b\.endpoint$"),
    ([*TWO, "--teachers.a.gpu_ids", "0,1,2", "--teachers.a.parallel.tp", "2"], r"^teachers\.a\.parallel\.tp: 2 does not divide"),
    ([*TWO, "--teachers.b.parallel.tp", "2"], r"^teachers\.b\.parallel\.tp: tensor parallelism needs GPU ids"),
    ([*TWO, "--teachers.a.gpu_ids", "0", "--teachers.b.gpu_ids", "0"],
     r"^teachers\.b\.gpu_ids: GPU 0 is also given to teachers\.a\.gpu_ids"),
    ([*TWO, "--teachers.a.gpu_ids", "1", "--trainer.gpu_ids", "1"], r"^teachers\.a\.gpu_ids: GPU 1 is also given to trainer\.gpu_ids"),
])
def test_config_errors_are_one_line_naming_the_key(argv, message):
    with pytest.raises(ConfigError, match=message) as e:
        load(argv)
    assert "\n" not in str(e.value)


def test_placement_plans_each_teacher_with_its_own_gpus():
    cfg = load([*TWO, "--teachers.a.gpu_ids", "1,2", "--teachers.b.gpu_ids", "3", "--inference.gpu_ids", "0",
                "--trainer.gpu_ids", "4", "--teachers.c.endpoint", "http://127.0.0.1:8000/v1"])
    teachers = [a for a in plan(cfg) if a.role == "teacher"]
    assert [(a.name, a.teacher, a.devices, a.endpoint) for a in teachers] == [
        ("teacher-0", "a", [1], ""), ("teacher-1", "a", [2], ""), ("teacher-2", "b", [3], ""),
        ("teacher-3", "c", [], "http://127.0.0.1:8000/v1")]
    text = describe(plan(cfg))
    assert "#   teacher-1      GPU 2 teacher=a  CUDA_VISIBLE_DEVICES='2'" in text
    assert "#   teacher-3      CPU teacher=c -> http://127.0.0.1:8000/v1  CUDA_VISIBLE_DEVICES=''" in text
    cpu = [a for a in plan(load(TWO)) if a.role == "teacher"]  # on the CPU: one engine each
    assert [(a.name, a.teacher, a.devices) for a in cpu] == [("teacher-0", "a", []), ("teacher-1", "b", [])]


def test_placement_colocates_teachers_with_their_own_shares():
    base = [*TWO, "--placement.colocate", "--inference.gpu_ids", "0", "--teachers.a.gpu_ids", "0",
            "--teachers.b.gpu_ids", "0", "--trainer.gpu_ids", "1", "--inference.gpu_memory_utilization", "0.3",
            "--teachers.a.gpu_memory_utilization", "0.3"]
    actors = plan(load([*base, "--teachers.b.gpu_memory_utilization", "0.4"]))  # 0.3 + 0.3 + 0.4 = 1
    assert {a.name: a.memory for a in actors if a.devices} == {"inference-0": 0.3, "teacher-0": 0.3, "teacher-1": 0.4,
                                                               "trainer-0": 1.0}
    with pytest.raises(ConfigError, match=r"^placement\.colocate: GPU 0 is over-committed: 1\.10 > 1 .*teacher-1 0\.5 "
                                          r"\(teachers\.b\.gpu_memory_utilization\)"):
        plan(load([*base, "--teachers.b.gpu_memory_utilization", "0.5"]))


def test_route_by_env_column_and_default(tmp_path):
    cfg = load(BY_ENV)
    prompts = [Prompt(text="x"), Prompt(text="y", env="reverse_text_short"), Prompt(text="z", teacher="b")]
    assert route(cfg, prompts) == ["a", "b", "a"]  # by env: a row's teacher field does not count
    only_a = load([*BY_ENV[:-2]])  # reverse_text_short not mapped: the default (the first table)
    assert route(only_a, prompts) == ["a", "a", "a"]
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "abc=", "answer": "cba", "teacher": "b"}\n{"prompt": "ab=", "answer": "ba"}\n'
                    '{"prompt": "a=", "answer": "a", "teacher": "a"}\n')
    col = load([*TWO, "--orchestrator.teacher_route.by", "column", "--orchestrator.teacher_route.default", "b",
                "--orchestrator.dataset.path", str(data)])
    assert route(col, [Prompt(text="1", teacher="a"), Prompt(text="2"), Prompt(text="3", env="x")]) == ["a", "b", "b"]
    assert route(load([*TWO, "--orchestrator.teacher_route.default", "b"]), prompts) == ["b", "b", "b"]
    from orchestrator import environments

    check_rows(col, environments.make(col).dataset)  # every row names a known teacher (or none)
    data.write_text('{"prompt": "abc=", "answer": "cba", "teacher": "b"}\n{"prompt": "ab=", "answer": "ba", "teacher": "nope"}\n')
    with pytest.raises(ConfigError, match=rf"^{data}:2: teacher 'nope' is not one of \[teachers\] \(a, b\)$"):
        check_rows(col, environments.make(col).dataset)
    with pytest.raises(ConfigError, match=r"^orchestrator\.teacher_route\.by: a prompt names teacher 'nope', which is not one of \[teachers\] \(a, b\)$"):
        route(col, [Prompt(text="1", teacher="nope")])
    data.write_text('{"prompt": "abc=", "answer": "cba", "teacher": 3}\n')
    with pytest.raises(ConfigError, match=rf"^{data}:1: 'teacher' must be a string"):
        environments.make(col)


def test_teacher_metrics_hand_worked():
    # rollouts 0, 1 of prompt 10 and rollout 2 of prompt 11 go to a; rollout 3 (prompt 12) to b, unscored.
    names = ["a", "a", "a", "b"]
    student = [[-1.0, -2.0], [-0.5], [-3.0], [-1.0]]
    teacher = [[-0.5, -30.0], [-0.5], [float("nan")], None]
    row = teacher_metrics(names, [10, 10, 11, 12], student, teacher, ["a", "b", "c"], floor=-20.0)
    # a's terms: -1 - (-0.5) = -0.5; -2 - (-20) = 18 (clipped at the floor); -0.5 - (-0.5) = 0; -3 - (-20) = 17 (NaN)
    assert row["teacher/a/kl"] == pytest.approx((-0.5 + 18 + 0 + 17) / 4)
    assert (row["teacher/a/prompts"], row["teacher/a/rollouts"], row["teacher/a/scored"], row["teacher/a/tokens"]) == (2, 3, 3, 4)
    assert (row["teacher/b/prompts"], row["teacher/b/rollouts"], row["teacher/b/scored"], row["teacher/b/tokens"]) == (1, 1, 0, 0)
    assert math.isnan(row["teacher/b/kl"]) and row["teacher/c/rollouts"] == 0


class _Teacher:
    """A stand-in teacher actor (no engine): scores every token of a completion with its own number, so the merged
    result shows which actor scored which rollout. ``score.remote`` returns the reply itself instead of a ref."""

    def __init__(self, k: int):
        self.k, self.calls = k, []
        self.score = self

    def remote(self, data: bytes) -> bytes:
        req = decode(data, ScoreRequest)
        self.calls.append(len(req.completion_ids))
        return encode(ScoreResult(logprobs=[[-float(self.k)] * len(c) for c in req.completion_ids]))


def test_score_refs_send_each_rollout_to_its_teacher_and_merge_in_order(tmp_path):
    from orchestrator.roles import Roles, scores_of
    from shared.placement import RunPlan

    cfg = load([*TWO, "--teachers.a.gpu_ids", "0,1", "--teachers.b.gpu_ids", "2", "--inference.gpu_ids", "3",
                "--trainer.gpu_ids", "4"])
    roles = Roles(cfg, tmp_path, RunPlan(student="s", teacher="t", actors=plan(cfg)))
    actors = [_Teacher(k) for k in range(3)]  # teacher-0, teacher-1: a; teacher-2: b
    roles.actors = {"teacher": actors}
    names = ["b", "a", "a", "b", "a"]
    refs, parts = roles.score_refs([[1]] * 5, [[5], [6, 7], [8], [9], [4]], names)
    assert parts == [[0, 3], [1, 4], [2]]  # b (first used): its one actor; a: split over its two; one call each
    assert [x.calls for x in actors] == [[2], [1], [2]]
    assert scores_of(parts, refs, 5).logprobs == [[-2.0], [-0.0, -0.0], [-1.0], [-2.0], [-0.0]]
    assert [roles.owner[r] for r in refs] == ["teacher-2", "teacher-0", "teacher-1"]
    # sampling from "the teacher" (a baseline evaluation) asks the primary teacher's actors only
    assert [k for k, _ in roles.teacher_engines()] == [0, 1] and [k for k, _ in roles.teacher_engines("b")] == [2]
    assert isinstance(roles.teacher, TeacherSet) and roles.teacher.members == ["a", "a", "b"]


def test_named_teachers_in_errors_about_nodes_and_resume():
    from orchestrator.checkpoint import check_compatible
    from orchestrator.launcher import _check_nodes

    cfg = load([*TWO, "--teachers.a.gpu_ids", "0", "--teachers.b.gpu_ids", "1:0"])
    with pytest.raises(ConfigError, match=r"^teachers\.b\.gpu_ids: teacher-1 is on node 1, but without ray_address"):
        _check_nodes(cfg, plan(cfg))
    import msgspec

    saved = msgspec.to_builtins(load([*TWO, "--teachers.a.gpu_ids", "0"]))
    check_compatible(saved, load([*TWO, "--teachers.a.gpu_ids", "3"]))  # GPU ids may change on resume
    with pytest.raises(ConfigError, match=r"^resume: teachers\.b\.name is \"x\""):
        check_compatible(saved, load([*TWO, "--teachers.a.gpu_ids", "0", "--teachers.b.name", "x"]))


def test_the_experiment_plans_a_teacher_engine_per_environment():
    from pathlib import Path

    cfg = load(["@", str(Path(__file__).resolve().parents[1] / "experiments" / "multi_teacher" / "rl.toml")])
    assert cfg.output_dir == "outputs/multi_teacher" and cfg.teacher.name == "tiny-reverse-teacher"
    assert [(a.name, a.teacher) for a in plan(cfg) if a.role == "teacher"] == [("teacher-0", "long"), ("teacher-1", "short")]
    assert route(cfg, [Prompt(text="abcdefg="), Prompt(text="abc=", env="reverse_text_short")]) == ["long", "short"]
    assert primary_teacher(cfg) == "long"
