"""Export a run's final student: the LoRA adapter alone, or merged into the base as a plain HF model (a full
fine-tuning run's final weights are already a whole model: they are copied as they are)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from shared.config import ConfigError, from_dict, load_toml
from shared.fsutil import MB, atomic_dir, free_bytes, tree_bytes
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
    or with ``merged=False`` the peft adapter directory alone.  Written to a temporary sibling and
    renamed, so a failure (a full disk) leaves nothing at ``path``; never overwrites."""
    from shared import models

    run_dir, path = Path(run_dir), Path(path)
    if not (run_dir / "config.toml").exists():
        raise ConfigError(f"{run_dir}: not a run directory (no config.toml)")
    cfg = from_dict(load_toml(run_dir / "config.toml"))
    adapter = latest_adapter(run_dir)
    if path.exists():
        raise ConfigError(f"{path}: already exists; choose a new export path")
    if cfg.trainer.finetune == "full":
        return _export_full(run_dir, adapter, path, merged)
    base_dir = models.resolve(cfg.model.name, "model.name") if merged else None
    need = tree_bytes(adapter) + (sum(tree_bytes(f) for f in base_dir.glob("*.safetensors")) if merged else 0)
    free = free_bytes(path.parent)
    if free < need + 10 * MB:
        raise ConfigError(f"{path}: {free / MB:.0f} MB free there; the export needs about {need / MB:.0f} MB")
    with atomic_dir(path) as tmp:
        if merged:
            import torch
            from peft import PeftModel
            from transformers import AutoModelForCausalLM, AutoTokenizer

            base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, use_safetensors=True)
            model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
            model.save_pretrained(str(tmp))
            AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(tmp))
        else:
            shutil.copytree(adapter, tmp, dirs_exist_ok=True)
    return path


def _export_full(run_dir: Path, weights: Path, path: Path, merged: bool) -> Path:
    """A full fine-tuning run: ``broadcast/step_N`` already is the whole trained model (weights, config,
    tokenizer); the export is that directory without its ``COMPLETE`` marker."""
    if not merged:
        raise ConfigError(f"{run_dir}: trained every weight (trainer.finetune = \"full\"), so there is no adapter to "
                          "export alone; export the whole model (without --adapter-only)")
    need, free = tree_bytes(weights), free_bytes(path.parent)
    if free < need + 10 * MB:
        raise ConfigError(f"{path}: {free / MB:.0f} MB free there; the export needs about {need / MB:.0f} MB")
    with atomic_dir(path) as tmp:
        shutil.copytree(weights, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(ADAPTER_COMPLETE))
    return path
