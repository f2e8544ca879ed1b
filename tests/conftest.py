import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
# Checkpoints the tests write are signed with a key of the tests' own, never the user's (orchestrator/ckpt_sign.py).
os.environ.setdefault("OPD_CHECKPOINT_KEY", str(Path("/tmp") / f"opd-tests-{os.getuid()}" / "checkpoint.key"))
ROOT = Path(__file__).resolve().parents[1]
RL = str(Path(sys.executable).parent / "rl")


@pytest.fixture(scope="session")
def tiny_pair():
    """(teacher_dir, student_dir) of the locally built reverse-text pair (built once, cached)."""
    from shared.builders.tiny_pair import build_pair

    return build_pair()


@pytest.fixture(autouse=True)
def _no_leftover_process_group():
    """A test that runs a trainer rank in-process and fails (or whose engine shares the group) can leave
    torch's default process group behind; the next in-process rank would then fail to initialise its own."""
    yield
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except (ValueError, RuntimeError):
            import torch.distributed.distributed_c10d as c10d

            c10d._world = c10d._World()  # a group torch no longer knows how to destroy: forget it


def session_pids(sid: int) -> list[int]:
    """The processes of session ``sid``: what a process started with ``start_new_session=True`` started, in
    any process group (an ``rl`` run and Ray's processes are in a group of their own below rl's relay)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.getsid(int(d)) == sid:
                    pids.append(int(d))
            except OSError:  # gone
                pass
    return pids


def default_signals() -> None:
    """``preexec_fn`` for a process a test signals: SIGINT, SIGHUP and SIGTERM at their defaults, however pytest
    was started (under ``nohup`` or ``&`` they arrive ignored, and ``rl`` rightly leaves an ignored signal
    ignored, so a test sending one would wait for nothing)."""
    import signal

    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def stop_process_group(proc, grace: float) -> None:
    """SIGTERM to ``proc``'s process group (started with ``start_new_session=True``; an ``rl`` relay in it passes
    the signal on to its run), SIGKILL to everything of its session after ``grace`` s."""
    import signal
    import subprocess

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        for pid in session_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        proc.communicate()
