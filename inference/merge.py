"""Serving a LoRA adapter by merging it into the engine's weights (``inference.lora_mode = "merge"``).

vLLM's CPU LoRA kernels roughly double the decode time of a small model (SmolLM2-135M: 34 s → 59–71 s
per step here), while merging costs one matrix product per adapted module per step. The engine then
runs without LoRA support at all. For every module the adapter touches::

    W = W0 + scale * B @ A          scale = alpha / r   (alpha / sqrt(r) with rsLoRA)

``W0`` is read once from the model directory's safetensors (never from the engine, whose weights are
overwritten), so repeated merges never accumulate. After the new weights are loaded the engine's prefix
cache must be reset: cached keys/values were computed by the old weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shared.adapter_payload import lora_scale

_PREFIX = "base_model.model."


def lora_deltas(tensors: dict[str, torch.Tensor], scale: float, where: str = "adapter") -> dict[str, torch.Tensor]:
    """``{"model.layers.0.self_attn.q_proj.weight": scale * B @ A, ...}`` of peft-format LoRA tensors
    (``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``, as in ``adapter_model.safetensors``)."""
    deltas = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        b = tensors[f"{module}.lora_B.weight"]
        name = module[len(_PREFIX):] if module.startswith(_PREFIX) else module
        deltas[f"{name}.weight"] = scale * (b.double() @ a.double())
    if not deltas:
        raise ValueError(f"{where}: adapter holds no LoRA weights")
    return deltas


def adapter_deltas(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """:func:`lora_deltas` of a peft adapter directory."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return lora_deltas(tensors, lora_scale(cfg), str(adapter_dir))


def read_base_weights(model_dir: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a safetensors model directory (sharded or not), as stored."""
    from safetensors import safe_open

    wanted, found = set(names), {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in wanted.intersection(f.keys()):
                found[key] = f.get_tensor(key)
    missing = wanted - found.keys()
    if missing:
        raise ValueError(f"{model_dir}: adapter targets weights the model does not have: {sorted(missing)[:3]}")
    return found


# vLLM fuses some Llama-family projections into one linear layer: (fused name, its parts in row order).
FUSED = {"q_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
         "k_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
         "v_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
         "gate_proj": ("gate_up_proj", ("gate_proj", "up_proj")),
         "up_proj": ("gate_up_proj", ("gate_proj", "up_proj"))}


def fused_weights(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vLLM module name → full weight, for every vLLM linear layer that a merged HF weight belongs to.

    ``merged`` and ``base`` are keyed by HF weight names (``model.layers.0.self_attn.q_proj.weight``);
    parts of a fused layer that the adapter does not touch come from ``base``.
    """
    out = {}
    for name in merged:
        module = name[: -len(".weight")]
        parent, leaf = module.rsplit(".", 1)
        fused, parts = FUSED.get(leaf, (leaf, (leaf,)))
        key = f"{parent}.{fused}"
        if key not in out:
            out[key] = torch.cat([merged.get(f"{parent}.{p}.weight", base.get(f"{parent}.{p}.weight"))
                                  for p in parts], dim=0)
    return out


def set_linear_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> int:
    """Replace the weights of vLLM linear layers in place; returns how many were replaced.

    On the CPU vLLM packs each linear layer's weight for oneDNN after loading and drops the original
    parameter, so the layer is given a new parameter and re-dispatched; on a GPU the parameter is
    overwritten in place.
    """
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    modules = dict(model.named_modules())
    for name, w in weights.items():
        if name not in modules:
            raise KeyError(f"the engine's model has no layer {name!r}")
        layer = modules[name]
        if hasattr(layer, "cpu_linear"):
            layer.weight = torch.nn.Parameter(w.to(layer.weight.dtype).contiguous(), requires_grad=False)
            dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
        else:
            if layer.weight.shape != w.shape:
                raise ValueError(f"{name}: weight {tuple(w.shape)} does not fit {tuple(layer.weight.shape)}")
            layer.weight.data.copy_(w.to(layer.weight.dtype))
    return len(weights)


class Merger:
    """Keeps the base weights of the adapted modules; ``merged(adapter)`` gives the weights to load."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype):
        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self.base: dict[str, torch.Tensor] = {}

    def merged(self, adapter_dir: str | Path) -> dict[str, torch.Tensor]:
        """vLLM layer name → its full weight with the adapter merged (``fused_weights``)."""
        return self.merged_deltas(adapter_deltas(adapter_dir))

    def merged_deltas(self, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The same from ``lora_deltas`` already computed (an adapter sent from memory: ``trainer.weight_transfer``)."""
        need = set()
        for n in deltas:
            parent, leaf = n[: -len(".weight")].rsplit(".", 1)
            need.update(f"{parent}.{p}.weight" for p in FUSED.get(leaf, (leaf, (leaf,)))[1])
        missing = sorted(need - self.base.keys())
        if missing:
            self.base.update(read_base_weights(self.model_dir, missing))
        merged = {n: (self.base[n].double() + d).to(self.dtype) for n, d in deltas.items()}
        return fused_weights(merged, {n: w.to(self.dtype) for n, w in self.base.items()})


def load_model_dir(llm, model_dir: str | Path) -> None:
    """Replace every weight of the engine with a model directory's (full fine-tuning's ``broadcast/step_N``).

    vLLM's in-place reload (``collective_rpc("reload_weights")``, each worker reads the safetensors itself, so
    tensor-parallel engines work too): each layer is put back in checkpoint format, filled by the model's own
    ``load_weights`` (which fuses q/k/v and gate/up as at start-up) and processed again (on the CPU that
    re-packs the oneDNN weights ``set_linear_weights`` re-dispatches by hand).  Nothing of the previous weights
    survives, and the prefix cache is reset: cached keys/values came from them.
    """
    llm.collective_rpc("reload_weights", kwargs=dict(weights_path=str(model_dir), is_checkpoint_format=True))
    llm.reset_prefix_cache()
