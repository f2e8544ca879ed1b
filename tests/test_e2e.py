"""End to end through the real `rl` command: Ray actors, vLLM engines, FSDP2 trainer, W&B offline."""

import json
import subprocess

import pytest
from safetensors.torch import load_file

from shared.metrics import read_metrics
from tests.conftest import RL, ROOT

pytestmark = pytest.mark.engine

REQUIRED = ["step", "teacher_kl", "loss/policy", "combined_advantage", "seq_len/mean", "time/step",
            "time/inference", "time/teacher", "time/trainer", "masked/low", "masked/high"]


def run_rl(*args, timeout=600):
    return subprocess.run([RL, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_two_step_run(tiny_pair, tmp_path):
    """Pure on-policy distillation (workflow 1, experiments/on_policy: skip_verification, one step of
    asynchrony): no task reward is computed in training; the held-out evaluation still scores answers.
    (The reward path runs in tests/test_api.py, the synchronous skeleton in tests/test_resume.py.)
    Also at sampling temperature 0.8 with the top-k term beside the sampled-token one (trainer/topk.py,
    shared/sampling.py): the teacher engine's top-4 reach the trainer, and the student engine's tempered
    log-probs agree with the trainer's ``logits / 0.8`` (step 1 trains on the weights that sampled it)."""
    out = tmp_path / "run"
    p = run_rl("@", "experiments/on_policy/rl.toml", "--max_steps", "2", "--output_dir", str(out),
               "--orchestrator.eval.num_prompts", "16", "--orchestrator.batch_size", "8",
               "--inference.temperature", "0.8", "--trainer.loss.teacher_topk", "4")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if "teacher_kl" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        for key in REQUIRED:
            assert key in r and r[key] is not None, key
        assert r["async/staleness"] <= 1  # max_async_level = 1: rollouts at most one adapter old
        for role in ("inference", "teacher", "trainer"):  # step 2's batch may be sampled and scored in step 1
            assert 0.0 <= r[f"busy/{role}"] <= 1.0 + 1e-9, role
            assert train[0][f"busy/{role}"] > 0.0, role
        assert r["seq_len/mean"] > 0
        assert "reward/mean" not in r
        assert r["loss/topk"] > 0 and 0 < r["teacher_kl/topk"] < 20
        # inside the roles' calls (benchmarks/profile_run.py splits a step by them): the engines' own time,
        # the trainer's compute and its adapter write
        assert r["time/inference_engine"] > 0 and r["time/teacher_engine"] > 0
        assert 0 < r["time/trainer_compute"] < r["time/step"] and 0 < r["time/adapter_save"] < r["time/step"]
        assert 0 < r["time/trainer_update"] < r["time/trainer_compute"]  # the optimizer's part of the compute
    assert train[0]["ratio/mean"] == pytest.approx(1.0, abs=0.01) and train[0]["masked/low"] == 0
    evals = [r for r in rows if "eval/reverse_text/avg" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert all(0 < r["time/eval"] < 120 for r in evals)  # each evaluation's own time, summed in the report
    report = (out / "report.md").read_text()
    assert f"- evaluations: {evals[0]['time/eval'] + evals[1]['time/eval']:.1f} s for 2" in report
    for step in (1, 2):
        adapter = out / "broadcast" / f"step_{step}"
        assert (adapter / "COMPLETE").exists()
        weights = load_file(adapter / "adapter_model.safetensors")
        assert any("lora_B" in k for k in weights)
        assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 32  # experiments/on_policy
    assert list((out / "wandb").glob("offline-run-*")), "no offline W&B run written"
    assert "Traceback" not in p.stderr


def test_failing_role_is_named(tiny_pair, tmp_path):
    # A real failure, not a fake: the student engine cannot allocate a 4 TiB KV cache.
    p = run_rl("@", "experiments/reverse_text/rl.toml", "--max_steps", "2", "--output_dir", str(tmp_path / "r"),
               "--inference.kv_cache_gib", "4096", "--wandb.mode", "disabled", timeout=300)
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: inference failed:"), p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def serve_exports(merged, base, adapter) -> dict[str, list]:
    """Both exports served with vLLM: the merged folder as a plain model, the adapter as a LoRARequest on the
    base; greedy tokens and their log-probs for one prompt, ``{"merged": [ids, logprobs], "adapter": ...}``;
    ``"texts"``: the texts of 12 sampled completions as ``shared.engines.sample`` decodes them, as vLLM's own
    detokenizer does for the same seeds, and their finish reasons."""
    import sys

    script = r'''
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    merged, base, adapter = sys.argv[1:4]
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=0)
    prompt = [TokensPrompt(prompt_token_ids=[1, 4, 5, 6, 30])]
    out = {}
    llm = LLM(model=merged, dtype="float32", max_model_len=32, enforce_eager=True, seed=0)
    c = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    out["merged"] = [list(c.token_ids), [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)]]
    # the sampler's texts (decoded once at the end, shared/engines.py) against vLLM's own detokenizer's
    from shared.engines import sample
    ids = [[1, 4, 5, 6, 30], [1, 7, 8, 30], [1, 9, 10, 11, 12, 30]]
    mine = sample(llm, ids, [0, 1, 2], 4, 1.0, 1.0, 12, 3)
    own = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids],
                       [SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=3 + i) for i in range(3)],
                       use_tqdm=False)
    out["texts"] = [[r.text for r in mine], [c.text for o in own for c in o.outputs],
                    [r.finish_reason for r in mine]]
    del llm
    llm = LLM(model=base, dtype="float32", max_model_len=32, enforce_eager=True, seed=0, enable_lora=True,
              max_lora_rank=32, max_loras=1)
    c = llm.generate(prompt, params, lora_request=LoRARequest("exported", 1, adapter), use_tqdm=False)[0].outputs[0]
    out["adapter"] = [list(c.token_ids), [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)]]
    print("RESULT " + json.dumps(out))
'''
    v = subprocess.run([sys.executable, "-c", script, str(merged), str(base), str(adapter)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert v.returncode == 0, v.stderr[-3000:]
    return json.loads(next(line for line in v.stdout.splitlines() if line.startswith("RESULT "))[7:])
