"""Trainer saves an adapter → vLLM serves it → its sampled log-probs match the peft model.

Merged (``lora_mode = "merge"``) the adapter goes from trainer memory to the engine first (``weight_transfer =
"memory"``) and from the file written afterwards second: both must serve the same model."""

import socket

import pytest
import ray
import torch

from inference.engine import InferenceEngine
from shared.engines import cpu_threads, engine_env
from shared.wire import RolloutBatch, StepResult, TrainBatch, TrainSample, decode, encode
from trainer.worker import TrainerRank

pytestmark = pytest.mark.engine

SPEC = dict(seed=0, dtype="float32", lr=0.05, weight_decay=0.0, max_grad_norm=0.0, lora_rank=8, lora_alpha=16.0,
            lora_dropout=0.0, lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"],
            mask_ratio_low=0.125, mask_ratio_high=8.0)


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference_logprobs(model, prompt_ids, completion_ids):
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return lp[len(prompt_ids) - 1 :]


@pytest.mark.parametrize("lora_mode", ["adapter", "merge"])
def test_adapter_round_trip(tiny_pair, tmp_path, lora_mode):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, student = tiny_pair
    tok = AutoTokenizer.from_pretrained(str(student))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a leftover cluster
    try:
        memory = lora_mode == "merge"
        trainer = ray.remote(TrainerRank).options(num_cpus=0).remote(
            0, 1, "gloo", f"tcp://127.0.0.1:{_port()}", str(student),
            {**SPEC, "weight_transfer": "memory" if memory else "filesystem"}, str(tmp_path), None
        )
        ray.get(trainer.setup.remote())
        prompt = tok("abcdef=").input_ids
        samples = [
            TrainSample(input_ids=prompt + tok("fedcba").input_ids[1:] + [tok.eos_token_id], prompt_len=len(prompt),
                        inference_logprobs=[-1.0] * 7, advantages=[1.0] * 7)
        ]
        result = decode(ray.get(trainer.train_step.remote(encode(TrainBatch(step=1, samples=samples,
                                                                              total_tokens=7)))), StepResult)
        spec = dict(dtype="float32", max_model_len=32, seed=0, lora_rank=8, lora_mode=lora_mode)
        engine = ray.remote(InferenceEngine).options(num_cpus=0, runtime_env={"env_vars": engine_env(1)}).remote(
            str(student), spec, None
        )
        ray.get(engine.ready.remote())
        # Ray gives an actor that reserves no CPUs OMP_NUM_THREADS=1; a CPU engine must decode on every core
        threads = ray.get(engine.__ray_call__.remote(lambda self: __import__("torch").get_num_threads()))
        assert threads == cpu_threads() > 1
        # ... and its OpenMP threads sleep when they wait, leaving the cores to the role that has work
        assert ray.get(engine.__ray_call__.remote(lambda self: __import__("os").environ["OMP_WAIT_POLICY"])) == "PASSIVE"
        prompts = [tok(s + "=").input_ids for s in ["abcdef", "hgfe", "aabbcc", "dcbah"]]
        if memory:  # from trainer memory, through the object store: nothing on disk yet
            assert not (tmp_path / "broadcast" / "step_1").exists()
            ray.get(engine.load_adapter_tensors.remote(trainer.adapter_payload.remote(1), 1))
            assert ray.get(trainer.persist.remote(1)) > 0  # ... then written, as the orchestrator asks after a step
            with pytest.raises(ray.exceptions.RayTaskError,
                               match="adapter_payload: step 2 asked, rank 0 holds none"):
                ray.get(trainer.adapter_payload.remote(2))
        else:
            ray.get(engine.load_adapter.remote(result.adapter_path, 1))
        batch = decode(ray.get(engine.generate.remote(prompts, [0, 1, 2, 3], 2, 1.0, 1.0, 10, 7)), RolloutBatch)
        # loading the same adapter again serves the same model (merging never accumulates); merged: from the
        # file persist wrote, the same model as from memory
        ray.get(engine.load_adapter.remote(result.adapter_path, 2))
        again = decode(ray.get(engine.generate.remote(prompts, [0, 1, 2, 3], 2, 1.0, 1.0, 10, 7)), RolloutBatch)
    finally:
        ray.shutdown()

    base = AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32),
                                      result.adapter_path).eval()
    worst_tuned, worst_base = 0.0, 0.0
    for r in batch.rollouts:
        vllm_lp = torch.tensor(r.logprobs)
        worst_tuned = max(worst_tuned, float((vllm_lp - _reference_logprobs(tuned, r.prompt_ids,
                                                                            r.completion_ids)).abs().max()))
        worst_base = max(worst_base, float((vllm_lp - _reference_logprobs(base, r.prompt_ids,
                                                                          r.completion_ids)).abs().max()))
    assert worst_tuned < 0.05, worst_tuned
    assert [r.completion_ids for r in again.rollouts] == [r.completion_ids for r in batch.rollouts]
    flat = [x for r in batch.rollouts for x in r.logprobs]
    assert [x for r in again.rollouts for x in r.logprobs] == pytest.approx(flat, abs=1e-4)
    # the adapter really changed the model, so the comparison above could have failed
    assert worst_base > 0.05, worst_base
