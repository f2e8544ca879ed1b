"""scripts/gpu_check.py on the CPU: the trainer's FSDP2 + LoRA step in bf16 against float32 (gloo, the tiny
architecture), run as a subprocess exactly as on the GPU machine but for ``--cpu``; a perturbed reference must
fail the check; the SmolLM2-135M hyper-parameters it builds must be the GGUF's."""

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402


# The GPU machine has no vLLM, Ray or msgspec: the script runs here with their imports made to fail.
WITHOUT_RAY_VLLM_MSGSPEC = ("import runpy, sys; sys.modules.update(dict.fromkeys(['ray', 'vllm', 'msgspec'])); "
                            "runpy.run_path('scripts/gpu_check.py', run_name='__main__')")


def run_check(tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", WITHOUT_RAY_VLLM_MSGSPEC, "--cpu", "--out", str(out), "--warmup", "1", "--reps", "2",
           *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    files = sorted(out.glob("gpu_check_*_cpu.json")) if out.exists() else []
    return proc, (json.loads(files[0].read_text()) if files else None)


def test_cpu_mode_passes_and_reports(tmp_path):
    proc, res = run_check(tmp_path, "--also", "2x32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert res is not None and res["mode"] == "cpu" and res["passed"] is True
    assert res["backend"] == "gloo" and res["dtype"] == "bfloat16"
    for key in ("date", "device", "torch", "transformers", "peft", "loadavg", "command"):
        assert res[key] not in ("", None), key
    # TINY by hand: embedding 512*64 = 32768 (tied head); a layer: q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12288,
    # MLP 3 * 64*128 = 24576, two norms 128 -> 36992; 2 layers + final norm 64: 32768 + 73984 + 64 = 106816.
    assert res["parameters"] == 106816
    c = res["comparison"]
    assert c["lora_tensors"] == 2 * 4 * 2  # layers x (q, k, v, o) x (A, B)
    assert math.isfinite(c["loss"]) and math.isfinite(c["ref_loss"]) and c["loss"] != 0.0
    assert all(c["checks"].values())
    assert c["loss_rel"] <= res["tolerances"]["loss_rel"] and c["grad_cosine"] >= res["tolerances"]["grad_cosine"]
    assert 0.0 < c["grad_norm"] and c["grad_cosine_min_tensor"] > 0.9
    # 4 samples of 64 tokens; prompts of 8..16 tokens leave 48..56 completion tokens each; then 2 x 32, timed only
    t, also = res["timing"]
    assert t["tokens"] == 256 and 4 * 48 <= t["completion_tokens"] <= 4 * 56
    assert (also["samples"], also["length"], also["tokens"]) == (2, 32, 64)
    assert res["first_update"]["skipped_step"] == 0.0 and res["first_update"]["grad_norm"] > 0
    for row in (t, also):
        assert len(row["step_seconds"]) == 2 and row["reps"] == 2 and row["warmup"] == 1
        assert row["tokens_per_second"] == pytest.approx(row["tokens"] / row["step_seconds_median"])
        assert row["peak_gib"] > 0
    md = next((tmp_path / "out").glob("gpu_check_*_cpu.md")).read_text()
    assert "Overall: **PASS**" in md and "| 4 x 64 | 1 + 2 |" in md and "| 2 x 32 | 1 + 2 |" in md


def test_a_wrong_reference_fails_the_check(tmp_path):
    # Advantages + 0.3 * N(0, 1) in the reference only: the gradient is sum_t A_t grad(ratio_t), so its direction
    # moves by about 1 - 1/sqrt(1 + 0.3^2) = 4% in cosine, far past the 0.5% tolerance.
    proc, res = run_check(tmp_path, "--perturb-reference", "0.3")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert res is not None and res["passed"] is False and res["perturb_reference"] == 0.3
    assert res["comparison"]["checks"]["grad_cosine"] is False
    assert res["comparison"]["grad_cosine"] < 0.99
    assert "Overall: **FAIL**" in proc.stdout


def test_without_cuda_it_asks_for_cpu_mode(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("no CUDA device; use --cpu for the CPU path")
    assert not list(tmp_path.iterdir())


def test_smollm2_architecture_is_the_gguf_one():
    import torch
    from gguf import GGUFReader
    from transformers import LlamaConfig, LlamaForCausalLM

    from shared.builders.smollm2 import gguf_path

    reader = GGUFReader(str(gguf_path()))

    def meta(key):
        f = reader.fields[key]
        return f.parts[f.data[0]].tolist()[0]

    cfg = LlamaConfig(**gpu_check.SMOLLM2_135M)  # read back from the config: a kwarg it ignored would show here
    assert meta("llama.block_count") == cfg.num_hidden_layers
    assert meta("llama.embedding_length") == cfg.hidden_size
    assert meta("llama.feed_forward_length") == cfg.intermediate_size
    assert meta("llama.attention.head_count") == cfg.num_attention_heads
    assert meta("llama.attention.head_count_kv") == cfg.num_key_value_heads
    assert meta("llama.rope.dimension_count") == cfg.head_dim
    assert meta("llama.rope.freq_base") == cfg.rope_parameters["rope_theta"]
    assert meta("llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    assert meta("llama.vocab_size") == cfg.vocab_size
    assert meta("llama.context_length") == cfg.max_position_embeddings
    assert meta("tokenizer.ggml.bos_token_id") == cfg.bos_token_id
    assert meta("tokenizer.ggml.eos_token_id") == cfg.eos_token_id
    names = {t.name for t in reader.tensors}
    assert ("output.weight" not in names) == cfg.tie_word_embeddings
    # and the model built from them has exactly the GGUF's weights, element for element
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == sum(int(t.n_elements) for t in reader.tensors)
