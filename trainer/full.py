"""Full-parameter fine-tuning (``trainer.finetune = "full"``): every student weight trains, no peft.

The model is sharded as the LoRA student is (FSDP2 ``fully_shard`` on each decoder layer, then the root).
After each optimizer step the weights are gathered one parameter at a time (``DTensor.full_tensor()``, a
collective every rank joins) and only rank 0 keeps a CPU copy, cast to the engines' dtype: its peak is one
model in that dtype plus one full parameter, never the optimizer state.  Rank 0 writes them as a Hugging Face
model directory (safetensors, sharded above ``SHARD_SIZE``, ``config.json``, the tokenizer's files) to
``broadcast/.step_N.tmp``, writes the ``COMPLETE`` marker last and renames it to ``broadcast/step_N``, as the
adapter path does.  The engines load it in place (``inference/merge.py: load_model_dir``).

The reference-KL term (``trainer.loss.ref_kl_coef``) compares with the starting student.  With LoRA that is
the same model with the adapter switched off; here the weights themselves move, so a second, frozen copy of
the starting model is loaded and sharded the same way (one more model's memory, split across the ranks).
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from shared.runtime import ADAPTER_COMPLETE

SHARD_SIZE = "2GB"  # safetensors file size above which the weights are split (huggingface_hub's rule)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a transformers causal LM (``model.model.layers`` for Llama, Qwen, Mistral...)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no model.layers to shard; full fine-tuning supports decoder-only "
                         "models laid out like Llama")
    return layers


def shard(model: torch.nn.Module, mesh, mp) -> torch.nn.Module:
    """FSDP2: each decoder layer one unit, the rest (embeddings, final norm, lm_head) the root's."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def build(model_path: str, mesh, mp, device_type: str, reference: bool) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The trainable student (every parameter requires grad) and, when ``reference``, a frozen sharded copy
    of the same starting weights for the reference-KL term."""
    from transformers import AutoModelForCausalLM

    def load(trainable: bool) -> torch.nn.Module:
        m = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, use_safetensors=True)
        m.requires_grad_(trainable)
        if device_type == "cuda":
            m = m.to("cuda")
        return shard(m, mesh, mp)

    model = load(True)
    ref = load(False).eval() if reference else None
    return model, ref


def full_tensors(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """``(HF name, full tensor in dtype)`` for every parameter, in ``named_parameters`` order (tied weights
    once).  A collective: every rank must run the whole loop; each full tensor lives until the next one."""
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        yield name, full.detach().to(dtype)


def metadata(model: torch.nn.Module, dtype: torch.dtype) -> list[tuple[str, str, list[int]]]:
    """``(name, dtype name, global shape)`` of what :func:`full_tensors` yields, without gathering anything."""
    dtype_name = str(dtype).removeprefix("torch.")
    return [(name, dtype_name, list(p.shape)) for name, p in model.named_parameters()]


def write_model_dir(model: torch.nn.Module, model_path: str, final: Path, step: int, rank: int,
                    dtype: torch.dtype, keep: int = 0) -> Path:
    """Gather every weight (all ranks) and let rank 0 write ``final`` (a HF model directory) atomically;
    with ``keep > 0`` only the newest ``keep`` steps' directories stay (a whole model per step fills disks;
    the engines read only the newest, and a resume rewrites its step from the checkpoint)."""
    from huggingface_hub import save_torch_state_dict

    state = {}
    for name, full in full_tensors(model, dtype):
        if rank == 0:
            state[name] = full.to("cpu").contiguous()
        del full
    if rank != 0:
        return final
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_torch_state_dict(state, str(tmp), max_shard_size=SHARD_SIZE, safe_serialization=True)
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    config.save_pretrained(str(tmp))
    for name in TOKENIZER_FILES:  # so the directory also loads on its own (`vllm serve`, transformers)
        if (Path(model_path) / name).is_file():
            shutil.copy2(Path(model_path) / name, tmp / name)
    (tmp / ADAPTER_COMPLETE).write_text(str(step))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if keep:
        for old in final.parent.glob("step_*"):
            tail = old.name.removeprefix("step_")
            if tail.isdigit() and int(tail) <= step - keep:
                shutil.rmtree(old, ignore_errors=True)
    return final
