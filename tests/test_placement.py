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


# ----------------------------------------------------------------------------------------------
# Several nodes: "N:G" is GPU G of node N, a plain G is node 0's (tests/test_multinode.py places real actors)

CLUSTER = ["--ray_address", "10.0.0.1:6379"]


def test_node_ids_place_each_actor_on_its_node():
    cfg = load(["--inference_gpu_ids", "1:0,1:1,0", "--teacher_gpu_ids", "2:0,2:1", "--teacher.parallel.tp", "2",
                "--trainer_gpu_ids", "1:2", "1:3", *CLUSTER])
    actors = plan(cfg)
    _assert_common(actors)
    assert [(a.name, a.node, a.devices) for a in actors] == [
        ("orchestrator-0", 0, []), ("inference-0", 1, [0]), ("inference-1", 1, [1]), ("inference-2", 0, [0]),
        ("teacher-0", 2, [0, 1]), ("trainer-0", 1, [2]), ("trainer-1", 1, [3]),
    ]
    assert [a.backend for a in _by_role(actors, "trainer")] == ["nccl", "nccl"]


def test_plain_ids_are_node_zero_and_read_as_before():
    """Backwards compatible: plain ids are node 0, "0:G" is the same id, and a one-node plan prints no node."""
    argv = ["--inference_gpu_ids", "0,1", "--teacher_gpu_ids", "2", "--trainer_gpu_ids", "3"]
    actors = plan(load(argv))
    assert all(a.node == 0 for a in actors)
    assert plan(load(["--inference_gpu_ids", "0:0,0:1", "--teacher_gpu_ids", "0:2", "--trainer_gpu_ids", "3"])) == actors
    assert "node" not in describe(actors)
    assert describe(actors).splitlines()[2] == "#   inference-0    GPU 0  CUDA_VISIBLE_DEVICES='0'"


def test_rl_visible_devices_map_node_zero_only():
    """rl's CUDA_VISIBLE_DEVICES is node 0's list; on another node an id is given to the actor as written."""
    cfg = load(["--inference_gpu_ids", "0,1:0", "--trainer_gpu_ids", "1:1", *CLUSTER])
    assert [(a.name, a.env["CUDA_VISIBLE_DEVICES"]) for a in plan(cfg, "4,5")] == [
        ("orchestrator-0", ""), ("inference-0", "4"), ("inference-1", "0"), ("teacher-0", ""), ("trainer-0", "1")]


def test_describe_names_the_node_of_every_actor_when_the_plan_spans_nodes():
    actors = plan(load(["--inference_gpu_ids", "1:0,1:1", "--inference.parallel.tp", "2", "--trainer_gpu_ids", "0",
                        *CLUSTER]))
    lines = describe(actors).splitlines()
    assert lines[0] == "# placement plan" and len(lines) == 1 + len(actors)
    assert lines[1:] == [
        "#   orchestrator-0 node 0 CPU  CUDA_VISIBLE_DEVICES=''",
        "#   inference-0    node 1 GPU 0,1 tp=2  CUDA_VISIBLE_DEVICES='0,1'",
        "#   teacher-0      node 0 CPU  CUDA_VISIBLE_DEVICES=''",
        "#   trainer-0      node 0 GPU 0 backend=nccl  CUDA_VISIBLE_DEVICES='0'",
    ]


def test_node_ids_round_trip_through_toml(tmp_path):
    from shared.config import to_toml

    cfg = load(["--inference_gpu_ids", "0,1:0", "--trainer_gpu_ids", "2:3", *CLUSTER])
    assert cfg.inference.gpu_ids == [0, "1:0"]
    path = tmp_path / "a.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    assert load(["@", str(path)]) == cfg


@pytest.mark.parametrize(("argv", "message"), [
    (["--inference_gpu_ids", "0,1:x"],
     r'^inference\.gpu_ids\[1\]: expected int, got "1:x"; a GPU id is G \(a GPU of the node rl runs on\) or "N:G" '
     r"\(GPU G of node N\)$"),
    (["--teacher_gpu_ids", "1:0:0"], r'^teacher\.gpu_ids\[0\]: expected int, got "1:0:0"'),
    (["--trainer_gpu_ids", "-1:0"], r'^trainer\.gpu_ids\[0\]: expected int, got "-1:0"'),
    (["--inference_gpu_ids", "3,0:3"], r"^inference\.gpu_ids: duplicate GPU id in \[3, '0:3'\]$"),
    (["--inference_gpu_ids", "1:0", "--trainer_gpu_ids", "1:0"],
     r"^trainer\.gpu_ids: GPU 1:0 is also given to inference\.gpu_ids; roles may not share a device unless placement\.colocate = true$"),
])
def test_malformed_or_shared_node_ids_name_the_key(argv, message):
    with pytest.raises(ConfigError, match=message):
        load(argv)


def test_the_same_gpu_number_on_two_nodes_is_two_devices():
    actors = plan(load(["--inference_gpu_ids", "0", "--trainer_gpu_ids", "1:0", *CLUSTER]))
    assert [(a.node, a.devices) for a in actors if a.devices] == [(0, [0]), (1, [0])]


@pytest.mark.parametrize(("argv", "message"), [
    (["--inference_gpu_ids", "0,1:0", "--inference.parallel.tp", "2"],
     r"^inference\.gpu_ids: the tensor-parallel group of inference-0 \(inference\.parallel\.tp = 2\) spans nodes 0, 1 "
     r"\(0,1:0\); give it GPUs of one node$"),
    (["--teacher_gpu_ids", "1:0,1:1,1:2,2:0", "--teacher.parallel.tp", "2"],
     r"^teacher\.gpu_ids: the tensor-parallel group of teacher-1 .* spans nodes 1, 2 \(1:2,2:0\)"),
    (["--trainer_gpu_ids", "1:0,2:0"],
     r"^trainer\.gpu_ids: the trainer \(all its ranks\) spans nodes 1, 2 \(1:0,2:0\); give it GPUs of one node$"),
])
def test_an_actor_or_the_trainer_across_nodes_is_refused(argv, message):
    cfg = load([*argv, *CLUSTER])
    with pytest.raises(ConfigError, match=message):
        plan(cfg)


def test_other_nodes_need_a_cluster_to_join():
    """Before Ray starts: an id on node N > 0 with a private (one-node) Ray is a one-line error."""
    from orchestrator.launcher import _check_nodes

    cfg = load(["--inference_gpu_ids", "0", "--teacher_gpu_ids", "1:0"])
    with pytest.raises(ConfigError, match=r"^teacher\.gpu_ids: teacher-0 is on node 1, but without ray_address rl "
                                          r"starts a private one-node Ray; join a cluster with --ray_address"):
        _check_nodes(cfg, plan(cfg))
    _check_nodes(load(["--inference_gpu_ids", "0,0:1"]), plan(load(["--inference_gpu_ids", "0,0:1"])))  # node 0: fine
    with_cluster = load(["--teacher_gpu_ids", "1:0", *CLUSTER])
    _check_nodes(with_cluster, plan(with_cluster))


def _node(node_id: str, host: str, addr: str, alive: bool = True) -> dict:
    return {"NodeID": node_id, "NodeManagerHostname": host, "NodeManagerAddress": addr, "Alive": alive}


def test_node_order_is_rl_s_node_then_hostnames_in_natural_order():
    """What `scontrol show hostnames gpu[01-02,9-10],cpu7` lists after the head, whatever order Ray reports."""
    from shared.placement import node_order

    nodes = [_node("e", "gpu10", "10.0.0.10"), _node("d", "gpu9", "10.0.0.9"), _node("x", "gpu03", "10.0.0.3", False),
             _node("b", "gpu02", "10.0.0.2"), _node("c", "cpu7", "10.0.1.7"), _node("a", "gpu01", "10.0.0.1")]
    assert [n["NodeID"] for n in node_order(nodes, here="b")] == ["b", "c", "a", "d", "e"]  # dead x: left out
    assert [n["NodeID"] for n in node_order(nodes, here="a")] == ["a", "c", "b", "d", "e"]
    same_host = [_node("z", "h", "127.0.0.1"), _node("y", "h", "127.0.0.2"), _node("w", "h", "127.0.0.2")]
    assert [n["NodeID"] for n in node_order(same_host, here="y")] == ["y", "z", "w"]  # then address, then id


def test_a_node_past_the_cluster_is_one_line_naming_the_key():
    from shared.placement import node_ids

    actors = plan(load(["--inference_gpu_ids", "0", "--trainer_gpu_ids", "2:0", *CLUSTER]))
    nodes = [_node("a", "gpu01", "10.0.0.1"), _node("b", "gpu02", "10.0.0.2")]
    with pytest.raises(ConfigError, match=r"^trainer\.gpu_ids: trainer-0 is on node 2, but the Ray cluster has 2 alive "
                                          r"node\(s\): 0 = gpu01 \(10\.0\.0\.1\), 1 = gpu02 \(10\.0\.0\.2\) "
                                          r"\(0 = the node rl runs on\)$"):
        node_ids(actors, nodes)
    assert node_ids(actors, [*nodes, _node("c", "gpu03", "10.0.0.3")]) == ["a", "b", "c"]
