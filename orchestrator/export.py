"""Export a run's final student: the LoRA adapter alone, or merged into the base as a plain HF model."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from shared.config import ConfigError, from_dict, load_toml
from shared.runtime import ADAPTER_COMPLETE


def latest_adapter(run_dir: Path) -> Path:
    steps = []
    for d in (run_dir / "broadcast").glob("step_*"):
        m = re.fullmatch(r"step_(\d+)", d.name)
        if m and (d / ADAPTER_COMPLETE).exists():
            steps.append((int(m.group(1)), d))
    if not steps:
        raise ConfigError(f"{run_dir}: no complete adapter under broadcast/ (did the run finish a step?)")
    return max(steps)[1]


def export_student(run_dir: str | Path, path: str | Path, merged: bool = True) -> Path:
    """Write the final student to ``path``: merged base + LoRA (loads with transformers and vLLM),
    or with ``merged=False`` the peft adapter directory alone. Written atomically."""
    from shared import models

    run_dir, path = Path(run_dir), Path(path)
    if not (run_dir / "config.toml").exists():
        raise ConfigError(f"{run_dir}: not a run directory (no config.toml)")
    cfg = from_dict(load_toml(run_dir / "config.toml"))
    adapter = latest_adapter(run_dir)
    if path.exists():
        raise ConfigError(f"{path}: already exists; choose a new export path")
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if merged:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base_dir = models.resolve(cfg.model.name, "model.name")
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        model.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(tmp))
    else:
        shutil.copytree(adapter, tmp)
    os.replace(tmp, path)
    return path
