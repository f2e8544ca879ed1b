"""Full-parameter fine-tuning (``trainer.finetune = "full"``): config rules, the NCCL transfer's plan, a
trainer rank writing whole models, the engine serving them, and a CLI run resumed and exported.

The NCCL broadcast itself needs GPUs; its plan (ranks, world size, rendezvous address) and the order and
metadata of what is sent are checked here with a recording stand-in for vLLM's communicator.
"""

from __future__ import annotations

import json

import pytest
import torch

from shared.config import ConfigError, load, weight_transfer
from shared.weight_sync import broadcast_all, plan, update_info

FULL = ["--trainer.finetune", "full", "--inference.lora_mode", "merge"]
GPUS = ["--inference_gpu_ids", "0,1", "--teacher_gpu_ids", "2", "--trainer_gpu_ids", "3"]


@pytest.mark.parametrize("args, message", [
    (["--trainer.finetune", "full"],
     'trainer.finetune: "full" trains no LoRA adapter for inference.lora_mode = "adapter" to serve; set '
     'inference.lora_mode = "merge" (the engines load the full weights in place)'),
    (["--trainer.weight_transfer", "nccl", *GPUS],
     'trainer.weight_transfer: "nccl" sends full weights; it needs trainer.finetune = "full"'),
    ([*FULL, "--trainer.weight_transfer", "nccl"],
     'trainer.weight_transfer: "nccl" needs GPUs (trainer.gpu_ids and inference.gpu_ids); on the CPU use "filesystem"'),
    ([*FULL, "--trainer.weight_transfer", "nccl", "--trainer_gpu_ids", "0"],
     'trainer.weight_transfer: "nccl" needs GPUs (trainer.gpu_ids and inference.gpu_ids); on the CPU use "filesystem"'),
    ([*FULL, "--trainer.weight_transfer", "nccl", *GPUS, "--orchestrator.continual.core_environments", "arithmetic"],
     'trainer.weight_transfer: "nccl" keeps no per-step weights on disk for the continual gate to restore; use '
     '"filesystem" or orchestrator.continual.gate = false'),
    (["--trainer.finetune", "partial"], 'trainer.finetune: expected one of "lora", "full", got "partial"'),
    (["--trainer.weight_transfer", "memory"],  # vLLM's LoRA kernels load a directory
     'trainer.weight_transfer: "memory" sends a LoRA adapter that the engines merge; it needs trainer.finetune = '
     '"lora" and inference.lora_mode = "merge"'),
    ([*FULL, "--trainer.weight_transfer", "memory"],
     'trainer.weight_transfer: "memory" sends a LoRA adapter that the engines merge; it needs trainer.finetune = '
     '"lora" and inference.lora_mode = "merge"'),
])
def test_config_errors_name_the_key(args, message):
    with pytest.raises(ConfigError) as e:
        load(args)
    assert str(e.value) == message


def test_config_accepts_full_and_nccl_on_gpus():
    cfg = load([*FULL, "--trainer.weight_transfer", "nccl", *GPUS])
    assert (cfg.trainer.finetune, cfg.trainer.weight_transfer) == ("full", "nccl")
    assert weight_transfer(load([*FULL])) == "filesystem"  # auto: whole models are files (or NCCL)
    assert weight_transfer(load([])) == "filesystem"  # auto: vLLM's LoRA kernels load a directory
    assert weight_transfer(load(["--inference.lora_mode", "merge"])) == "memory"  # auto: merged tensors
    assert weight_transfer(load(["--inference.lora_mode", "merge", "--trainer.weight_transfer", "filesystem"])) == (
        "filesystem")


def test_resume_may_switch_the_transfer_but_not_the_finetuning():
    import msgspec

    from orchestrator import checkpoint

    saved = msgspec.to_builtins(load([*FULL, *GPUS]))
    checkpoint.check_compatible(saved, load([*FULL, *GPUS, "--trainer.weight_transfer", "nccl"]))
    with pytest.raises(ConfigError, match=r'^resume: trainer.finetune is "lora" but the checkpoint was written with '
                                          r'"full";'):
        checkpoint.check_compatible(saved, load([*GPUS, "--inference.lora_mode", "merge"]))


# -- the NCCL plan (runs without NCCL) ------------------------------------------------------------------
def test_plan_one_node_two_engines_of_tp2():
    p = plan("10.1.2.3", 29555, ["10.1.2.3", "10.1.2.3"], tp=2)
    # rank 0 = trainer rank 0; engine 0's workers 1, 2; engine 1's workers 3, 4; everything on one node: loopback
    assert (p.master_address, p.master_port, p.world_size, p.rank_offsets) == ("127.0.0.1", 29555, 5, (1, 3))
    assert p.engine_init(1) == dict(master_address="127.0.0.1", master_port=29555, rank_offset=3, world_size=5,
                                    packed=False)


def test_plan_across_nodes_uses_the_trainer_node_address():
    p = plan("10.1.2.3", 40000, ["10.1.2.3", "10.1.2.4", "10.1.2.4"], tp=1)
    assert (p.master_address, p.world_size, p.rank_offsets) == ("10.1.2.3", 4, (1, 2, 3))
    with pytest.raises(ValueError, match="no inference engines"):
        plan("10.1.2.3", 40000, [], tp=1)


def test_vllm_accepts_the_plan_payloads():
    """The payloads parse as vLLM 0.32's own worker-side init info and update info."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferInitInfo, NCCLWeightTransferUpdateInfo

    init = NCCLWeightTransferInitInfo(**plan("127.0.0.1", 29555, ["127.0.0.1"], tp=1).engine_init(0))
    assert (init.rank_offset, init.world_size, init.packed) == (1, 2, False)
    info = NCCLWeightTransferUpdateInfo(**update_info([("a.weight", "bfloat16", [4, 2]), ("b", "float32", [3])]))
    assert (info.names, info.dtype_names, info.shapes) == (["a.weight", "b"], ["bfloat16", "float32"], [[4, 2], [3]])


class _Recorder:
    """Stands in for vLLM's PyNcclCommunicator (NCCL needs GPUs): records each broadcast."""

    def __init__(self):
        self.sent = []

    def broadcast(self, tensor, src, stream=None):
        self.sent.append((src, tensor.clone()))


def test_sender_broadcasts_every_parameter_in_metadata_order(tiny_pair):
    from transformers import AutoModelForCausalLM

    from trainer import full

    model = AutoModelForCausalLM.from_pretrained(str(tiny_pair[1]), dtype=torch.float32)
    meta = full.metadata(model, torch.bfloat16)
    info = update_info(meta)
    params = dict(model.named_parameters())
    assert info["names"] == list(params) and len(params) == 1 + 9 * 2 + 2  # embeddings, 2 layers of 9, norm, lm_head
    assert set(info["dtype_names"]) == {"bfloat16"} and info["shapes"][0] == [64, 64]
    group = _Recorder()
    assert broadcast_all(group, full.full_tensors(model, torch.bfloat16), meta) == len(meta)
    assert all(src == 0 for src, _ in group.sent)
    assert [list(t.shape) for _, t in group.sent] == info["shapes"]
    assert all(torch.equal(t, p.detach().bfloat16()) for (_, t), p in zip(group.sent, params.values()))
    with pytest.raises(ValueError, match=r"^weight transfer: tensor 0 is \('model.embed_tokens.weight', 'float32'"):
        broadcast_all(_Recorder(), full.full_tensors(model, torch.float32), meta)  # not what the engines expect
    with pytest.raises(ValueError, match=r"^weight transfer: sent 3 tensors, the engines expect 4$"):
        broadcast_all(_Recorder(), iter(list(full.full_tensors(model, torch.bfloat16))[:3]), meta[:4])


# -- a trainer rank (gloo, one rank): whole models in broadcast/, the frozen reference, a bit-for-bit resume --------
def _spec(**kw) -> dict:
    from tests.test_resume import _trainer_spec

    return dict(_trainer_spec(load([])), finetune="full", ref_kl_coef=0.1, ref_kl_estimator="k3", **kw)


def test_trainer_rank_writes_whole_models_and_resumes_bit_for_bit(tiny_pair, tmp_path):
    import torch.distributed as dist
    from safetensors.torch import load_file

    from shared.wire import StepResult, decode
    from tests.test_resume import _batch
    from trainer.worker import TrainerRank

    out = tmp_path / "out"
    base = load_file(tiny_pair[1] / "model.safetensors")

    def rank(name, **kw):
        r = TrainerRank(0, 1, "gloo", f"file://{tmp_path / name}", str(tiny_pair[1]), _spec(**kw), str(out), None)
        r.setup()
        return r

    def step(r, n):
        res = decode(r.train_step(_batch(n, n)), StepResult)
        return res.metrics, load_file(out / "broadcast" / f"step_{n}" / "model.safetensors")

    threads = torch.get_num_threads()
    try:
        first = rank("rdv1", keep_full_steps=1)
        m1, w1 = step(first, 1)
        first.save_checkpoint(str(tmp_path / "ckpt"))
        m2, w2 = step(first, 2)
        dist.destroy_process_group()
        pruned = sorted(p.name for p in (out / "broadcast").iterdir())

        resumed = rank("rdv2")
        resumed.load_checkpoint(str(tmp_path / "ckpt"), 1)
        rewritten = load_file(out / "broadcast" / "step_1" / "model.safetensors")
        again, again_w = step(resumed, 2)
        dist.destroy_process_group()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads)
    assert pruned == ["step_2"]  # keep_full_steps = 1: the newest whole model only
    assert sorted(w1) == sorted(base) and all(w1[n].dtype == torch.float32 for n in w1)
    changed = [n for n in w1 if not torch.equal(w1[n], base[n])]
    assert {n for n in w1 if "proj" in n} <= set(changed)  # every linear layer trained (no adapter)
    # the reference is the frozen start: no KL at step 1 (the weights are still the start), some after it
    assert m1["ref_kl_sum"] == 0.0 and m1["loss/ref_kl"] == 0.0
    assert m2["ref_kl_sum"] > 1e-6
    assert all(torch.equal(rewritten[n], w1[n]) for n in w1)
    for key in ("loss/policy", "loss/ref_kl", "grad_norm", "lr"):
        assert again[key] == m2[key], key
    assert all(torch.equal(again_w[n], w2[n]) for n in w2)
    files = {p.name for p in (out / "broadcast" / "step_2").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "COMPLETE"} <= files
    config = json.loads((out / "broadcast" / "step_2" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"


# -- with engines ---------------------------------------------------------------------------------------------
def _logprobs(model, prompt_ids, completion_ids):
    """transformers' log-probs of ``completion_ids`` after ``prompt_ids``."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return logp.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)[len(prompt_ids) - 1:]


@pytest.mark.engine
def test_engine_serves_the_trained_full_weights(tiny_pair, tmp_path, monkeypatch):
    """A trainer rank takes two full-FT steps; the engine serves step 1, step 2, then step 1 again: its greedy
    log-probs equal transformers' on the model in broadcast/step_N (1e-3) and differ from the start's.
    Both run in this process, one after the other (no Ray: quicker, and nothing to start on a loaded machine)."""
    import gc

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference.engine import InferenceEngine
    from shared.engines import engine_env
    from shared.wire import RolloutBatch, StepResult, TrainBatch, TrainSample, decode, encode
    from trainer.worker import TrainerRank

    student = tiny_pair[1]
    tok = AutoTokenizer.from_pretrained(str(student))
    prompts = [tok(s + "=").input_ids for s in ["abcdef", "hgfe", "aabbcc", "dcbah"]]
    spec = dict(_spec(), lr=0.01, ref_kl_coef=0.0, max_grad_norm=0.0)
    threads = torch.get_num_threads()
    try:
        trainer = TrainerRank(0, 1, "gloo", f"file://{tmp_path / 'rdv'}", str(student), spec, str(tmp_path), None)
        trainer.setup()
        paths = {}
        for step in (1, 2):
            p = prompts[0]
            sample = TrainSample(input_ids=p + tok("fedcba").input_ids[1:] + [tok.eos_token_id], prompt_len=len(p),
                                 inference_logprobs=[-1.0] * 7, advantages=[1.0] * 7)
            batch = TrainBatch(step=step, samples=[sample], total_tokens=7)
            paths[step] = decode(trainer.train_step(encode(batch)), StepResult).adapter_path
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads)
    del trainer

    for key, value in engine_env(1).items():
        monkeypatch.setenv(key, value)
    engine = InferenceEngine(str(student), dict(dtype="float32", max_model_len=32, seed=0, lora_rank=8,
                                                lora_mode="merge", finetune="full"), None)

    def greedy():
        return decode(engine.generate(prompts, [0, 1, 2, 3], 1, 0.0, 1.0, 10, 7), RolloutBatch)

    served = {0: greedy()}
    for step in (1, 2, 1):
        engine.load_adapter(paths[step], step)
        batch = greedy()
        assert batch.adapter_step == step
        served.setdefault(step, batch)
    again = batch
    del engine
    gc.collect()

    def worst(batch, model_dir):
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        return max(float((torch.tensor(r.logprobs) - _logprobs(model, r.prompt_ids, r.completion_ids)).abs().max())
                   for r in batch.rollouts)

    same = [worst(served[0], student), worst(served[1], paths[1]), worst(served[2], paths[2])]
    other = [worst(served[1], student), worst(served[2], paths[1])]
    print(f"engine vs transformers, max |dlogp|: served model {max(same):.2e}, previous model {min(other):.2e}")
    assert max(same) < 1e-3
    assert min(other) > 1e-2  # each step changed the model, so the comparison above could have failed
    # back to step 1: the same tokens and log-probs (every weight replaced, the prefix cache reset)
    assert [r.completion_ids for r in again.rollouts] == [r.completion_ids for r in served[1].rollouts]
    assert [x for r in again.rollouts for x in r.logprobs] == pytest.approx(
        [x for r in served[1].rollouts for x in r.logprobs], abs=1e-5)


@pytest.mark.engine
def test_cli_full_run_checkpoints_resumes_and_exports(tiny_pair, tmp_path):
    """`rl` with full fine-tuning on 2 trainer ranks (the weights gathered from shards), with the reference KL
    and a checkpoint every step: 2 steps, then `--resume` to step 3; the export is the final weights; an
    adapter-only export is refused in one line."""
    import subprocess

    from safetensors.torch import load_file

    from orchestrator.export import export_student
    from shared.metrics import read_metrics
    from tests.conftest import RL, ROOT

    out = tmp_path / "run"
    cmd = [RL, "@", "experiments/reverse_text/rl.toml", *FULL, "--output_dir", str(out), "--wandb.mode", "disabled",
           "--orchestrator.batch_size", "8", "--orchestrator.eval.num_prompts", "8", "--orchestrator.eval.interval",
           "0", "--trainer.cpu_ranks", "2", "--trainer.loss.ref_kl_coef", "0.1", "--ckpt.interval", "1"]
    first = subprocess.run([*cmd, "--max_steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = subprocess.run([*cmd, "--max_steps", "3", "--resume"], cwd=ROOT, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    rows = [r for r in read_metrics(out / "metrics.jsonl") if "teacher_kl" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert any(r.get("resumed_from") == 2 for r in read_metrics(out / "metrics.jsonl"))
    assert rows[0]["loss/ref_kl"] == 0.0 and rows[1]["loss/ref_kl"] > 0 and rows[2]["loss/ref_kl"] > 0
    ckpt = out / "checkpoints" / "step_3" / "trainer"
    assert {"rank_0.pt", "rank_1.pt", ".metadata"} <= {p.name for p in ckpt.iterdir()}
    assert sorted(p.name for p in (out / "broadcast").iterdir()) == ["step_2", "step_3"]  # the newest two models

    exported = export_student(out, tmp_path / "student")
    final = load_file(out / "broadcast" / "step_3" / "model.safetensors")
    got = load_file(exported / "model.safetensors")
    assert got.keys() == final.keys() and all(torch.equal(got[k], final[k]) for k in final)
    assert not (exported / "COMPLETE").exists() and (exported / "tokenizer.json").exists()
    with pytest.raises(ConfigError) as e:
        export_student(out, tmp_path / "adapter", merged=False)
    assert str(e.value) == (f'{out}: trained every weight (trainer.finetune = "full"), so there is no adapter to '
                            "export alone; export the whole model (without --adapter-only)")
