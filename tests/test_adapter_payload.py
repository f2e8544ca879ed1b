"""shared/adapter_payload.py: a LoRA adapter packed into one buffer for Ray's object store and unpacked by an
engine (the round trip through real actors is in tests/test_adapter_roundtrip.py)."""

import math

import numpy as np
import pytest
import torch

from shared.adapter_payload import lora_scale, pack, unpack


def test_pack_then_unpack_gives_the_same_tensors_from_a_read_only_buffer():
    g = torch.Generator().manual_seed(0)
    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 6, generator=g),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(6, 4, generator=g),
               "scalar_like": torch.randn(1, generator=g).double()}  # any dtype arrives as float32
    payload = pack(3, 2.0, tensors)
    assert payload["flat"].dtype == np.float32 and payload["flat"].size == 24 + 24 + 1
    assert (payload["step"], payload["scale"], payload["names"]) == (3, 2.0, list(tensors))
    payload["flat"].setflags(write=False)  # what a reader of Ray's object store is given
    out = unpack(payload)
    assert list(out) == list(tensors)
    for name, t in tensors.items():
        assert out[name].dtype == torch.float32 and torch.equal(out[name], t.float()), name
    out[next(iter(out))].add_(1.0)  # the copy is the engine's own, writable


def test_unpack_refuses_a_buffer_that_does_not_fit_its_shapes():
    payload = pack(7, 1.0, {"a": torch.zeros(2, 3)})
    payload["shapes"] = [[2, 4]]
    with pytest.raises(ValueError, match="adapter payload of step 7: shapes hold 8 numbers, the buffer 6"):
        unpack(payload)


def test_lora_scale_is_alpha_over_rank_or_over_its_root_with_rslora():
    assert lora_scale({"r": 16, "lora_alpha": 32}) == 2.0
    assert lora_scale({"r": 16, "lora_alpha": 32, "use_rslora": True}) == 8.0
    assert lora_scale({"r": 8}) == 1.0  # alpha defaults to the rank
    assert lora_scale({"r": 9, "lora_alpha": 6, "use_rslora": True}) == pytest.approx(6 / math.sqrt(9))
