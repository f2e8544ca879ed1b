"""A separate Python environment with TRL for ``benchmarks/vs_trl.py``; the project's own pins stay as they are.

    python benchmarks/trl_env.py            # create (or reuse) it and print its interpreter

The environment is a uv virtualenv under ``$OPD_CACHE/trl-env`` (default ``~/.cache/opd/trl-env``) with
the versions pinned in ``PINS``. torch is the CPU build ``2.13.0+cpu``, which PyPI does not serve: uv
finds it in the folder named by ``UV_FIND_LINKS`` or ``PIP_FIND_LINKS``. PyPI's CUDA-linked torchvision /
torchaudio / torchcodec are excluded from the resolution (they break the transformers import next to the
CPU torch). A ``READY`` file holding the pins is written last, so a half-made environment is rebuilt.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PINS = ("trl==1.16.0", "transformers==5.19.0", "peft==0.21.2", "torch==2.13.0+cpu")
EXCLUDED = ("torchvision", "torchaudio", "torchcodec")
PYTHON = "3.11"


class TrlEnvError(RuntimeError):
    """The TRL environment cannot be created (no uv, no torch wheel folder, a failed install)."""


def env_dir() -> Path:
    return Path(os.environ.get("OPD_CACHE", Path.home() / ".cache" / "opd")) / "trl-env"


def python_of(env: Path) -> Path:
    return env / "bin" / "python"


def is_ready(env: Path) -> bool:
    ready = env / "READY"
    return ready.is_file() and ready.read_text().split() == list(PINS) and python_of(env).is_file()


def find_links() -> str:
    links = os.environ.get("UV_FIND_LINKS") or os.environ.get("PIP_FIND_LINKS") or ""
    if not links:
        raise TrlEnvError(
            "trl env: torch==2.13.0+cpu is not on PyPI; set PIP_FIND_LINKS (or UV_FIND_LINKS) to the folder "
            "holding its wheel"
        )
    return links


def ensure(env: Path | None = None, log=print) -> Path:
    """The interpreter of a ready TRL environment, creating it first when needed (a few minutes)."""
    env = env or env_dir()
    if is_ready(env):
        return python_of(env)
    uv = shutil.which("uv")
    if uv is None:
        raise TrlEnvError("trl env: `uv` is not on PATH (https://docs.astral.sh/uv/ installs it)")
    links = find_links()
    t0 = time.monotonic()
    log(f"creating the TRL environment in {env} ({' '.join(PINS)}) ...")
    if env.exists():
        shutil.rmtree(env)
    env.parent.mkdir(parents=True, exist_ok=True)
    _uv([uv, "venv", "--quiet", "--python", PYTHON, str(env)])
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(EXCLUDED) + "\n")
        excludes = f.name
    try:
        _uv([uv, "pip", "install", "--quiet", "--python", str(python_of(env)), "--find-links", links,
             "--excludes", excludes, *PINS])
    finally:
        os.unlink(excludes)
    (env / "READY").write_text(" ".join(PINS) + "\n")
    log(f"TRL environment ready in {time.monotonic() - t0:.0f} s")
    return python_of(env)


def _uv(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise TrlEnvError(f"trl env: `{' '.join(cmd[:3])} ...` failed: {last}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.parse_args(argv)
    try:
        print(ensure())
    except TrlEnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
