"""Faults injected for real into a running `rl` (tiny pair): a role stopped with SIGSTOP (a hang) is caught by
its deadline, and signals during start-up end the run in one line. Each checks that no process of the run is
left behind: every process the run started inherits a marker in its environment, and none may outlive it.
(A trainer rank killed mid-step and resumed: tests/test_resume.py; a stand-in trainer that hangs:
tests/test_async.py.)"""

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import RL, ROOT

pytestmark = pytest.mark.engine

SMALL = ["--wandb.mode", "disabled", "--orchestrator.batch_size", "8", "--orchestrator.eval.num_prompts", "8",
         "--orchestrator.eval.interval", "0"]


def _start(out: Path, *args: str) -> tuple[subprocess.Popen, str]:
    mark = uuid.uuid4().hex
    env = {**os.environ, "OPD_TEST_RUN": mark}
    proc = subprocess.Popen([RL, "@", "experiments/reverse_text/rl.toml", "--output_dir", str(out), *SMALL, *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


def test_a_stopped_teacher_is_caught_by_its_deadline(tiny_pair, tmp_path):
    """SIGSTOP of the teacher engine's process after step 1: its next score call outlives the deadline (floor
    15 s); the run exits 1 with one error line naming the teacher, the actor and the call, then the tail of
    its log; no traceback, and no process of the run left behind (the stopped one included)."""
    out = tmp_path / "run"
    proc, mark = _start(out, "--max_steps", "50", "--orchestrator.deadline.floor_s", "15")
    try:
        rows = out / "metrics.jsonl"
        _wait_for(lambda: rows.exists() and '"teacher_kl"' in rows.read_text(), proc, 400, "step 1")
        pid = json.loads((out / "logs" / "pids.json").read_text())["teacher-0"]
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=240)
        waited = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    assert errors[0].startswith("error: teacher failed: teacher-0 did not answer score (or generate) in step "), errors
    assert "within its deadline" in errors[0] and "logs/teacher-0.log" in errors[0]
    tail = lines[lines.index(errors[0]) + 1:]
    assert tail and all(ln.startswith("  | ") for ln in tail), tail  # the actor's last log lines
    assert waited < 15 + 90, waited  # caught by the deadline, not by a person
    _none_left(mark)


@pytest.mark.parametrize("signals", [1, 2])
def test_signals_during_start_up_end_the_run_in_one_line(tiny_pair, tmp_path, signals):
    """SIGTERM while the roles are starting (nothing to checkpoint yet): once stops the run at once; twice in a
    row too. Either way: exit 143, one error line, no traceback (a handler raising inside Ray's C calls used to
    print a SystemError), no checkpoint, and no process of the run left behind."""
    out = tmp_path / "run"
    proc, mark = _start(out, "--max_steps", "5")
    try:
        _wait_for(lambda: (out / "logs" / "orchestrator.log").exists(), proc, 300, "start-up")
        for _ in range(signals):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        waited = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "SystemError" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "SIGTERM" in errors[0], err[-3000:]
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert waited < 60, waited  # start-up is not waited out
    _none_left(mark)
