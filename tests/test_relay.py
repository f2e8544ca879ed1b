"""`rl`'s relay (orchestrator/cli.py ``_relay``): the run in a process group of its own, stop signals passed on
to it alone, once per request. The run is a stand-in here (seconds); tests/test_faults.py signals a real run's
whole process group mid-step."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT, default_signals

STAND_IN = """
import os, signal, sys, time, pathlib
out = pathlib.Path(sys.argv[1])
got = []
def write(text):  # whole or not at all: the test reads it while the stand-in runs
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
def note(signum, frame):
    got.append(signal.Signals(signum).name)
    write(" ".join(got))
signal.signal(signal.SIGTERM, note)
signal.signal(signal.SIGINT, note)
relay = os.environ.get("OPD_RL_RELAY")
from orchestrator.cli import _end_with_relay  # what the real run does first
_end_with_relay()
write(f"ready {os.getpgid(0)} {relay} {os.getppid()} {os.environ.get('OPD_RL_RELAY')}")
deadline = time.monotonic() + 20
while len(got) < 3 and time.monotonic() < deadline:
    time.sleep(0.02)
sys.exit(143 if got else 0)
"""


def _relay(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """The relay, started as a shell starts a job (a process group of its own), with a stand-in for the run:
    ``sys.executable`` is a script that runs STAND_IN whatever its arguments (``-m orchestrator.cli ...``)."""
    (tmp_path / "stand_in.py").write_text(STAND_IN)
    notes = tmp_path / "notes"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'stand_in.py'} {notes}\n")
    fake.chmod(0o755)
    code = (f"import sys; sys.executable = {str(fake)!r}; from orchestrator.cli import _relay; "
            "sys.exit(_relay(['@', 'x.toml']))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, process_group=0, preexec_fn=default_signals)
    deadline = time.monotonic() + 30
    while not (notes.exists() and notes.read_text().startswith("ready")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert notes.exists(), "the stand-in did not start"
    return proc, notes


def test_a_signal_to_the_whole_group_reaches_the_run_once_and_a_later_one_again(tmp_path):
    proc, notes = _relay(tmp_path)
    try:
        _, pgid, relay, parent, left = notes.read_text().split()
        assert int(pgid) != os.getpgid(proc.pid)  # the run is outside the group a shell (or timeout) signals
        assert relay == parent == str(proc.pid)  # marked as relayed by its parent ...
        assert left == "None"  # ... a mark nothing the run starts inherits
        os.killpg(proc.pid, signal.SIGTERM)  # `timeout uv run rl`: the group's copy ...
        time.sleep(0.1)
        os.kill(proc.pid, signal.SIGTERM)  # ... and uv's, at once: one request
        time.sleep(1.5)  # a later signal is a second request ("stop at once")
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        time.sleep(1.5)
        os.kill(proc.pid, signal.SIGHUP)  # the terminal closed: passed on as SIGTERM
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert notes.read_text() == "SIGTERM SIGINT SIGTERM"
    assert rc == 143  # the run's status


def test_the_run_gets_sigterm_when_the_relay_is_killed(tmp_path):
    proc, notes = _relay(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while notes.read_text().startswith("ready") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert notes.read_text() == "SIGTERM"  # PR_SET_PDEATHSIG: the run stops as it would on SIGTERM
