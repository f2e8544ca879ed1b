import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
ROOT = Path(__file__).resolve().parents[1]
RL = str(Path(sys.executable).parent / "rl")


@pytest.fixture(scope="session")
def tiny_pair():
    """(teacher_dir, student_dir) of the locally built reverse-text pair (built once, cached)."""
    from shared.tiny_pair import build_pair

    return build_pair()
