"""Faults injected for real into a running `rl` (tiny pair), folded into few engine starts: one run with
``on_failure = "restart"`` in which the student engine, the teacher engine and one of two trainer ranks are
SIGKILLed and the teacher SIGSTOPped (a hang, caught by its deadline), one after the other; a run whose
orchestrator actor is SIGKILLed, resumed until its teacher hangs, resumed to the end; signals during start-up.
Each checks that no process of the run is left behind: every process the run started inherits a marker in its
environment, and none may outlive it. (A trainer rank killed mid-step and resumed with the same numbers:
tests/test_resume.py; a stand-in trainer that hangs: tests/test_async.py.)"""

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import RL, ROOT, default_signals

pytestmark = pytest.mark.engine

SMALL = ["--wandb.mode", "disabled", "--orchestrator.batch_size", "8", "--orchestrator.eval.num_prompts", "8",
         "--orchestrator.eval.interval", "0"]


def _start(out: Path, *args: str, group: bool = False) -> tuple[subprocess.Popen, str]:
    """``rl`` on the tiny pair; ``group``: in a process group of its own, as a shell job is (``os.killpg`` then
    signals everything in it, as Ctrl-C, ``timeout`` or ``kill -- -PGID`` do)."""
    mark = uuid.uuid4().hex
    env = {**os.environ, "OPD_TEST_RUN": mark}
    proc = subprocess.Popen([RL, "@", "experiments/reverse_text/rl.toml", "--output_dir", str(out), *SMALL, *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            process_group=0 if group else None, preexec_fn=default_signals)
    return proc, mark


def _marked(mark: str) -> list[int]:
    """Processes alive whose environment carries ``mark`` (the run's own, and everything it started)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"OPD_TEST_RUN={mark}".encode() in env and state != "Z":
            found.append(int(d.name))
    return found


def _none_left(mark: str, grace: float = 30.0) -> None:
    deadline = time.monotonic() + grace
    while _marked(mark) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _marked(mark)
    for pid in left:  # do not leak them into the rest of the suite
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not left, f"processes of the run left behind: {left}"


def _wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, float]:
    """The run's stderr once it ends (killed if it outlives ``timeout``), and the seconds waited for it."""
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return err, time.monotonic() - t0


def _stop(proc: subprocess.Popen) -> None:
    """Kill ``proc`` if a failed assertion left it running (the test's own error stays the one reported)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _rows(out: Path) -> list[dict]:
    from shared.metrics import read_metrics

    return read_metrics(out / "metrics.jsonl")


def _trained_since_restart(out: Path, restarts: int) -> bool:
    """``restarts`` restarts have happened and a training step has been logged after the last of them (so the
    roles of ``logs/pids.json``, rewritten by the restart, are at work)."""
    rows = _rows(out)
    marks = [i for i, r in enumerate(rows) if "restarted_from" in r]
    if len(marks) != restarts:
        return False
    after = marks[-1] if marks else -1
    return any("teacher_kl" in r for r in rows[after + 1:]) and any((out / "checkpoints").glob("step_*"))


def _one_row_per_step(out: Path, steps: int) -> list[dict]:
    rows = _rows(out)
    assert [r["step"] for r in rows if "teacher_kl" in r] == list(range(1, steps + 1))  # none lost, none twice
    return rows


# The faults of one run with ckpt.on_failure = "restart", in order: each strikes while a step is in progress,
# after the previous restart has trained a step on the new roles.
FAULTS = [("inference-0", signal.SIGKILL), ("teacher-0", signal.SIGKILL), ("trainer-1", signal.SIGKILL),
          ("teacher-0", signal.SIGSTOP)]


def test_every_role_killed_or_hung_mid_step_is_restarted_and_the_run_completes(tiny_pair, tmp_path):
    """One run (checkpoints every step, ``on_failure = "restart"``, two trainer ranks, deadline floor 15 s):
    SIGKILL of the student engine's process, then of the teacher engine's, then of one of the two trainer ranks
    (its peer is stuck in a collective), then SIGSTOP of the teacher (a hang, caught by its deadline); each time
    every role restarts from the newest checkpoint and the run goes on. It completes (exit 0) with one
    ``restarted_from`` row per fault, every step exactly once in metrics.jsonl, each restart named on the
    console and in the orchestrator's log, and no process of the run left behind (the stopped one included)."""
    out = tmp_path / "run"
    steps = 8
    proc, mark = _start(out, "--max_steps", str(steps), "--ckpt.interval", "1", "--ckpt.on_failure", "restart",
                        "--ckpt.max_restarts", str(len(FAULTS)), "--orchestrator.deadline.floor_s", "15",
                        "--trainer.cpu_ranks", "2")
    killed = []
    try:
        for n, (actor, sig) in enumerate(FAULTS):
            _wait_for(lambda: _trained_since_restart(out, n), proc, 600, f"a step after restart {n}")
            pid = json.loads((out / "logs" / "pids.json").read_text())[actor]
            assert pid not in killed  # pids.json names the restarted roles' processes
            os.kill(pid, sig)
            killed.append(pid)
    finally:
        err, _ = _finish(proc, 900)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    rows = _one_row_per_step(out, steps)
    restarts = [r for r in rows if "restarted_from" in r]
    assert [r["restarts"] for r in restarts] == [1.0, 2.0, 3.0, 4.0]
    assert all(r["restarted_from"] == r["step"] >= 1 for r in restarts)
    log = (out / "logs" / "orchestrator.log").read_text()
    lines = [ln for ln in log.splitlines() if "; restarting every role from " in ln]
    assert len(lines) == len(FAULTS), log[-3000:]
    for line, (actor, sig) in zip(lines, FAULTS):
        role = actor.split("-")[0]
        # the role and an actor: the killed rank itself, or its peer whose collective broke first (a race)
        named = actor if role != "trainer" else "trainer-"
        assert line.startswith("step ") and f": {role} failed: {named}" in line, line
        assert line in err  # the console shows each restart too
    # the hang: one line naming the role, the actor, the call and the step, caught by the deadline
    assert f"teacher failed: teacher-0 did not answer score (or generate) in step " in lines[-1]
    assert "within its deadline" in lines[-1] and "logs/teacher-0.log" in lines[-1]
    _none_left(mark)


def test_orchestrator_killed_then_a_hung_teacher_each_stop_the_run_in_one_line_and_resume_completes(tiny_pair,
                                                                                                     tmp_path):
    """``on_failure = "stop"`` (the default): SIGKILL of the orchestrator actor mid-step ends the run with exit 1
    and one line naming the orchestrator; ``--resume`` goes on from the newest checkpoint until its teacher is
    SIGSTOPped: its next score call outlives the deadline (floor 15 s), exit 1 with one line naming the teacher,
    the actor and the call, then the tail of its log; a second ``--resume`` completes. metrics.jsonl ends with
    every step exactly once, and no process of any of the three launches is left behind."""
    out = tmp_path / "run"
    steps = 5
    args = ("--max_steps", str(steps), "--ckpt.interval", "1", "--orchestrator.deadline.floor_s", "15")

    def launch(*extra: str, fault: tuple[str, int] | None, after: int) -> tuple[int, str, float]:
        proc, mark = _start(out, *args, *extra)
        try:
            if fault is not None:
                _wait_for(lambda: any(r["step"] > after and "teacher_kl" in r for r in _rows(out))
                          and any((out / "checkpoints").glob("step_*")), proc, 600, f"a step after step {after}")
                os.kill(json.loads((out / "logs" / "pids.json").read_text())[fault[0]], fault[1])
        finally:
            err, waited = _finish(proc, 600)
        _none_left(mark)
        return proc.returncode, err, waited

    rc, err, waited = launch(fault=("orchestrator-0", signal.SIGKILL), after=0)
    assert rc == 1, err[-3000:]
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: orchestrator failed: "), err[-3000:]
    assert waited < 30, waited
    first = max(r["step"] for r in _rows(out) if "teacher_kl" in r)

    rc, err, waited = launch("--resume", fault=("teacher-0", signal.SIGSTOP), after=first)
    assert rc == 1, err[-3000:]
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    assert errors[0].startswith("error: teacher failed: teacher-0 did not answer score (or generate) in step "), errors
    assert "within its deadline" in errors[0] and "logs/teacher-0.log" in errors[0]
    tail = lines[lines.index(errors[0]) + 1:]
    assert tail and all(ln.startswith("  | ") for ln in tail), tail  # the actor's last log lines
    assert waited < 15 + 90, waited  # caught by the deadline, not by a person

    rc, err, _ = launch("--resume", fault=None, after=0)
    assert rc == 0, err[-3000:]
    rows = _one_row_per_step(out, steps)
    assert len([r for r in rows if "resumed_from" in r]) == 2


@pytest.mark.parametrize("sig, signals", [(signal.SIGTERM, 1), (signal.SIGTERM, 2), (signal.SIGINT, 2)])
def test_signals_during_start_up_end_the_run_in_one_line(tiny_pair, tmp_path, sig, signals):
    """SIGTERM or SIGINT while the roles are starting (nothing to checkpoint yet): once stops the run at once; twice
    in a row too. Either way: exit 128 + the signal, one error line, no traceback (a handler raising inside Ray's C calls used to
    print a SystemError), no checkpoint, and no process of the run left behind."""
    out = tmp_path / "run"
    proc, mark = _start(out, "--max_steps", "5")
    try:
        _wait_for(lambda: (out / "logs" / "orchestrator.log").exists(), proc, 300, "start-up")
        for _ in range(signals):
            proc.send_signal(sig)
            time.sleep(0.05)
    finally:
        err, waited = _finish(proc, 120)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err and "SystemError" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and signal.Signals(sig).name in errors[0], err[-3000:]
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert waited < 60, waited  # start-up is not waited out
    _none_left(mark)


def test_signals_during_a_checkpoint_write_and_mid_step(tiny_pair, tmp_path):
    """Signals at the moments that matter, on one run resumed three times (``ckpt.interval`` 1):

    1. SIGTERM twice during a checkpoint write: the moment a checkpoint's temporary directory appears the
       orchestrator is frozen (SIGSTOP), so the write cannot finish; the second signal stops at once: exit 143,
       one line, the half-written checkpoint left as a temporary directory that --resume never takes (the newest
       complete one verifies and the resume removes the leftover).
    2. Ctrl-C (SIGINT) twice while a step hangs (the trainer frozen): exit 130, one line.
    3. SIGTERM once mid-step to rl's whole process group (what ``timeout`` and ``kill -- -PGID`` send; Ray's
       processes would be in that group but for rl's relay, cli._relay): the step finishes, a checkpoint is
       written, exit 143 with the --resume line.
    4. Resumed to the end: every step exactly once. No process of the run is left behind after any stop.
    (Two signals less than one wait of the launcher's loop apart, 0.5 s, reach Python as one: they are sent
    1.5 s apart.)"""
    from orchestrator import checkpoint

    out, steps = tmp_path / "run", 40  # enough steps (0.2 s each) that no stage ends the run before its signal
    args = ("--max_steps", str(steps), "--ckpt.interval", "1")
    ckpts = out / "checkpoints"

    def pid(actor: str) -> int:
        return json.loads((out / "logs" / "pids.json").read_text())[actor]

    def trained_after_resume(n: int) -> bool:
        """The n-th resume is logged and a step trained after it (the roles of pids.json are this run's)."""
        rows = _rows(out)
        marks = [i for i, r in enumerate(rows) if "resumed_from" in r]
        return len(marks) == n and any("teacher_kl" in r for r in rows[marks[-1] + 1:])

    def twice(proc: subprocess.Popen, sig: int) -> str:
        proc.send_signal(sig)
        time.sleep(1.5)
        proc.send_signal(sig)
        err, waited = _finish(proc, 120)
        assert waited < 60, waited
        assert "Traceback" not in err and "SystemError" not in err and "KeyboardInterrupt" not in err
        errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert errors == [f"error: stopped by a second {signal.Signals(sig).name} without a checkpoint"], err[-3000:]
        return err

    # 1. twice during a checkpoint write
    proc, mark = _start(out, *args)
    try:
        _wait_for(lambda: any(ckpts.glob("step_*")), proc, 400, "the first checkpoint")
        _wait_for(lambda: any(ckpts.glob(".step_*.tmp")), proc, 120, "the next checkpoint's write")
        os.kill(pid("orchestrator-0"), signal.SIGSTOP)
        partial = sorted(ckpts.glob(".step_*.tmp"))
        twice(proc, signal.SIGTERM)
    finally:
        _stop(proc)
    assert proc.returncode == 143
    _none_left(mark)
    assert partial and all(p.exists() for p in partial)  # stopped mid-write: never completed
    first, directory = checkpoint.require_latest(out)  # the newest complete one verifies (signed manifest)
    assert directory.name == f"step_{first}" and f".step_{first}.tmp" not in [p.name for p in partial]

    # 2. Ctrl-C twice while a step hangs
    proc, mark = _start(out, *args, "--resume")
    try:
        _wait_for(lambda: trained_after_resume(1), proc, 400, "a step after the resume")
        os.kill(pid("trainer-0"), signal.SIGSTOP)
        twice(proc, signal.SIGINT)
    finally:
        _stop(proc)
    assert proc.returncode == 130
    _none_left(mark)
    second = checkpoint.require_latest(out)[0]  # no new checkpoint is promised: the stop may cut one short
    assert second >= first

    # 3. SIGTERM once mid-step, to the whole process group
    proc, mark = _start(out, *args, "--resume", group=True)
    try:
        _wait_for(lambda: trained_after_resume(2), proc, 400, "a step after the second resume")
        os.killpg(proc.pid, signal.SIGTERM)
    finally:
        err, _ = _finish(proc, 300)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "error: " not in err
    third = checkpoint.require_latest(out)[0]
    assert third > second and f"stopped by SIGTERM after step {third}; checkpoint: " in err
    _none_left(mark)

    # 4. to the end
    proc, mark = _start(out, *args, "--resume")
    err, _ = _finish(proc, 400)
    assert proc.returncode == 0, err[-3000:]
    _one_row_per_step(out, steps)
    _none_left(mark)
