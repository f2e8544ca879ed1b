"""Actors placed on the node their plan names, on a real two-node Ray cluster on this machine.

Two raylets of one Ray cluster (``ray.cluster_utils.Cluster``), both on 127.0.0.1; ``rl``'s way of joining it
(``ray_init_kwargs`` with ``ray_address``), resolving the plan's nodes and pinning the orchestrator
(``place_on_nodes``, as ``launch``) and each role's actor (``node_affinity``), with small probe actors instead of
engines. CPU only; no vLLM, no ``rl`` run.
"""

from __future__ import annotations

import pytest

from orchestrator.launcher import LOOPBACK_ENV, loopback_env_defaults, place_on_nodes, ray_init_kwargs
from shared.config import ConfigError, load
from shared.placement import RunPlan, node_affinity, plan

# Every Ray process on 127.0.0.1; no CPUs to offer, so Ray prestarts no idle workers (the probes ask for none).
NODE = dict(node_ip_address="127.0.0.1", num_cpus=0, include_dashboard=False, dashboard_host="127.0.0.1")


@pytest.fixture(scope="module")
def cluster():
    """A head and one worker node, joined as rl joins a cluster; shut down even when a test fails."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in LOOPBACK_ENV.items():  # as rl sets them before importing ray (Ray's no-cluster mode)
            mp.setenv(key, value)
        import ray
        import ray._private.ray_constants as constants
        from ray.cluster_utils import Cluster

        # Earlier tests of a full run imported ray before the variable was set: loopback_env_defaults brings
        # Ray's import-time reading in line (without it, ray.init waits 10 min for a GCS on the host's address);
        # the setattr only records the old reading for the end of the module.
        mp.setattr(constants, "ENABLE_RAY_CLUSTER", constants.ENABLE_RAY_CLUSTER)
        loopback_env_defaults()
        c = Cluster(initialize_head=True, head_node_args=NODE)
        try:
            c.add_node(**NODE)
            c.wait_for_nodes()
            ray.init(**ray_init_kwargs(load(["--ray_address", c.address])))
            yield c
        finally:
            ray.shutdown()
            c.shutdown()


class Probe:
    """Where an actor runs and which devices it was told to see: what an engine would find."""

    def where(self) -> tuple[str, str]:
        import os

        import ray

        return ray.get_runtime_context().get_node_id(), os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")


def test_each_actor_runs_on_the_node_its_plan_names(cluster):
    import ray

    cfg = load(["--inference_gpu_ids", "1:0", "--teacher_gpu_ids", "0", "--trainer_gpu_ids", "1:1",
                "--ray_address", cluster.address])
    actors = plan(cfg)
    assert [(a.name, a.node) for a in actors] == [("orchestrator-0", 0), ("inference-0", 1), ("teacher-0", 0),
                                                  ("trainer-0", 1)]
    run, pin = place_on_nodes(cfg, RunPlan(student="s", teacher="t", actors=actors))
    ids = run.nodes
    assert ids[0] == ray.get_runtime_context().get_node_id()  # node 0: the node rl (this driver) runs on
    assert sorted(ids) == sorted(n.node_id for n in cluster.list_all_nodes()) and run.student == "s"

    # As the launcher creates the orchestrator (pin) and the orchestrator every role (node_affinity).
    options = [pin] + [node_affinity(a, run.nodes) for a in actors[1:]]
    probes = [ray.remote(Probe).options(num_cpus=0, runtime_env={"env_vars": a.env}, **o).remote()
              for a, o in zip(actors, options)]
    seen = ray.get([p.where.remote() for p in probes], timeout=60)
    assert [(a.name, ids.index(node), cvd) for a, (node, cvd) in zip(actors, seen)] == [
        (a.name, a.node, a.env["CUDA_VISIBLE_DEVICES"]) for a in actors]
    for p in probes:
        ray.kill(p)


def test_a_node_the_cluster_lacks_is_one_line_before_any_actor(cluster):
    cfg = load(["--inference_gpu_ids", "0", "--teacher_gpu_ids", "2:0", "--ray_address", cluster.address])
    with pytest.raises(ConfigError, match=r"^teacher\.gpu_ids: teacher-0 is on node 2, but the Ray cluster has 2 alive "
                                          r"node\(s\): 0 = .*, 1 = .* \(0 = the node rl runs on\)$") as e:
        place_on_nodes(cfg, RunPlan(student="s", teacher="t", actors=plan(cfg)))
    assert "\n" not in str(e.value)


def test_one_node_changes_nothing():
    """A private Ray (no ray_address): Ray is not even asked, no node map, no scheduling strategy."""
    cfg = load(["--inference_gpu_ids", "0"])
    run = RunPlan(student="s", teacher="t", actors=plan(cfg))
    assert place_on_nodes(cfg, run) == (run, {})
    assert all(node_affinity(a, run.nodes) == {} for a in run.actors)


def test_loopback_defaults_correct_a_ray_imported_before_them(monkeypatch):
    """A process that imported ray before the loopback switch was set (a notebook, an earlier test) would look
    for a loopback cluster's GCS on the host's address; loopback_env_defaults brings Ray's reading in line."""
    import ray._private.ray_constants as constants

    from orchestrator.launcher import LOOPBACK_ENV_CLUSTER

    monkeypatch.setattr(constants, "ENABLE_RAY_CLUSTER", True)  # as read at import with the variable unset
    monkeypatch.delenv(LOOPBACK_ENV_CLUSTER, raising=False)
    loopback_env_defaults()
    assert constants.ENABLE_RAY_CLUSTER is False
    monkeypatch.setenv(LOOPBACK_ENV_CLUSTER, "1")  # slurm/multi_node.sbatch: a cluster across hosts
    loopback_env_defaults()
    assert constants.ENABLE_RAY_CLUSTER is True
