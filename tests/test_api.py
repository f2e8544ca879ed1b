"""The Python API (orchestrator/api.py): configs from TOML files, dicts and Config objects; run() and
export from code, the tiny reverse_text workflow for 2 steps (marked ``engine``)."""

from __future__ import annotations

import math

import pytest

from orchestrator.api import RunResult, Session, export_student, load_config, run, session_mismatch, session_run_config
from shared.config import Config, ConfigError, load
from tests.conftest import ROOT

TOML = ROOT / "experiments" / "reverse_text" / "rl.toml"


def test_load_config_merges_files_dicts_overrides_and_keywords_in_order():
    cfg = load_config(TOML, {"orchestrator": {"batch_size": 8}, "trainer.lr": 5e-3},
                      overrides={"trainer.lr": 1e-3, "trainer.loss.kl_coef": 0.5}, max_steps=3,
                      orchestrator={"group_size": 2})
    assert isinstance(cfg, Config)
    assert cfg.max_steps == 3 and cfg.trainer.lr == 1e-3 and cfg.trainer.loss.kl_coef == 0.5
    assert cfg.orchestrator.batch_size == 8 and cfg.orchestrator.group_size == 2  # sections merge key by key
    assert cfg.trainer.lr_schedule == "cosine" and cfg.output_dir == "outputs/reverse_text"  # from the TOML
    assert cfg == load(["@", str(TOML), "--orchestrator.batch_size", "8", "--trainer.lr", "1e-3",
                        "--trainer.loss.kl_coef", "0.5", "--max_steps", "3", "--orchestrator.group_size", "2"])


def test_load_config_takes_a_config_object_and_overrides_it():
    base = load_config(TOML)
    assert load_config(base) == base
    assert load_config(base, seed=7).seed == 7 and base.seed == 0


@pytest.mark.parametrize("args, kw, match", [
    ((), {"overrides": {"trainer.nope": 1}}, r"^trainer\.nope: unknown key$"),
    ((), {"trainer": {"lr": "abc"}}, r"^trainer\.lr: expected float, got \"abc\"$"),
    ((42,), {}, r"^load_config: expected a TOML path, a dict or a Config, got int$"),
    (("does/not/exist.toml",), {}, r"^does/not/exist\.toml: config file not found$"),
    (({"max_steps": 1, "max_steps.x": 2},), {}, r"^max_steps\.x: max_steps is both a value and a table"),
])
def test_load_config_errors_name_the_key(args, kw, match):
    with pytest.raises(ConfigError, match=match):
        load_config(*args, **kw)


def test_run_refuses_dry_run_and_an_existing_export_path_before_starting(tmp_path):
    with pytest.raises(ConfigError, match=r"^dry_run: run\(\) trains"):
        run(load_config(TOML, dry_run=True, output_dir=str(tmp_path / "r")))
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match=r"taken: already exists; choose a new export path$"):
        run(load_config(TOML, output_dir=str(tmp_path / "r")), export=tmp_path / "taken")
    assert not (tmp_path / "r").exists()  # refused before anything was written


@pytest.mark.engine
def test_run_two_steps_from_python_and_load_the_exported_student(tiny_pair, tmp_path):
    """run() from Python, then every export: run(export=...) and export_student (merged and adapter-only)
    and the CLI's `rl export`; the merged model equals base + adapter in transformers, and both exports
    serve with vLLM with the same greedy tokens and log-probs."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_e2e import run_rl, serve_exports

    # merged, so step 1's adapter reaches the engine from trainer memory and its file is written afterwards
    cfg = load_config(TOML, overrides={"orchestrator.batch_size": 8, "orchestrator.eval.num_prompts": 16,
                                       "wandb.mode": "disabled", "trainer.lr": 0.02, "inference.lora_mode": "merge"},
                      max_steps=2, output_dir=str(tmp_path / "run"))
    result = run(cfg, export=tmp_path / "student")
    assert isinstance(result, RunResult) and result.steps == 2
    assert result.metrics["step"] == 2 and math.isfinite(result.metrics["teacher_kl"])
    # step 2 was sampled by step 1's adapter as the engine got it from memory: its log-probs are the trainer's
    assert result.metrics["ratio/mean"] == pytest.approx(1.0, abs=0.01)
    assert 0.0 <= result.metrics["reward/mean"] <= 1.0  # the task reward is computed (adv_tau = 0: not trained on)
    assert result.eval["step"] == 2 and result.eval["eval/reverse_text/avg"] == result.eval_end
    assert 0.0 <= result.eval_start <= 1.0 and 0.0 <= result.eval_end <= 1.0
    assert result.adapter == tmp_path / "run" / "broadcast" / "step_2" and (result.adapter / "COMPLETE").exists()
    assert result.report == tmp_path / "run" / "report.md" and result.report.exists()
    assert result.merged_model == tmp_path / "student"

    # The exported student is a plain transformers model equal to base + the final adapter, and it answers.
    tok = AutoTokenizer.from_pretrained(str(result.merged_model))
    merged = AutoModelForCausalLM.from_pretrained(str(result.merged_model))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_pair[1]))
    ids = tok("abcd=", return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, str(result.adapter))(input_ids=ids).logits
        assert torch.allclose(merged(input_ids=ids).logits, tuned, atol=1e-4)
        assert not torch.allclose(tuned, base_logits, atol=1e-3)  # the steps changed the student
        out = merged.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    adapter = export_student(result.output_dir, tmp_path / "adapter", merged=False)
    assert (adapter / "adapter_model.safetensors").exists()

    # The CLI's export writes the same two things, and never overwrites.
    e1 = run_rl("export", str(result.output_dir), str(tmp_path / "cli_merged"))
    e2 = run_rl("export", str(result.output_dir), str(tmp_path / "cli_adapter"), "--adapter-only")
    assert e1.returncode == 0 and e2.returncode == 0, e1.stderr[-2000:] + e2.stderr[-2000:]
    again = run_rl("export", str(result.output_dir), str(tmp_path / "cli_merged"))
    assert again.returncode == 2 and "already exists" in again.stderr
    cli = AutoModelForCausalLM.from_pretrained(str(tmp_path / "cli_merged"))
    with torch.no_grad():
        assert torch.allclose(cli(input_ids=ids).logits, tuned, atol=1e-4)

    # Both exports serve with vLLM: same greedy tokens, log-probs within 1e-3 of each other and of
    # the merged transformers model's.
    served = serve_exports(tmp_path / "cli_merged", tiny_pair[1], tmp_path / "cli_adapter")
    assert served["merged"][0] == served["adapter"][0]
    assert served["merged"][1] == pytest.approx(served["adapter"][1], abs=1e-3)
    mine, vllms, reasons = served["texts"]
    assert mine == vllms and len(mine) == 12 and any(mine)  # our one batched decode is vLLM's detokenizer's text
    assert "stop" in reasons  # ... including completions that ended on EOS (its token left out of the text)
    prompt = torch.tensor([[1, 4, 5, 6, 30]])  # serve_exports' prompt
    with torch.no_grad():
        first = torch.log_softmax(merged(input_ids=prompt).logits[0, -1], -1)[served["merged"][0][0]]
    assert float(first) == pytest.approx(served["merged"][1][0], abs=1e-3)

# -- Session: one start of the roles, several runs -------------------------------------------------------

def test_session_mismatch_names_the_first_key_a_run_may_not_change():
    base = load_config(TOML)
    per_run = {"seed": 3, "max_steps": 5, "output_dir": "elsewhere", "trainer.lr": 1e-2, "trainer.loss.adv_tau": 1.0,
               "orchestrator.workflow": "sft", "orchestrator.environment": "arithmetic",
               "inference.temperature": 0.7, "wandb.mode": "disabled"}
    for key, value in per_run.items():
        if key == "orchestrator.workflow":  # needs the on-policy terms off
            value = load_config(base, overrides={key: value, "trainer.loss.adv_tau": 0.0})
        else:
            value = load_config(base, overrides={key: value})
        assert session_mismatch(base, value) is None, key
    for key, value in {"model.lora.rank": 8, "teacher.name": "x", "trainer.cpu_ranks": 2, "model.max_model_len": 48,
                       "inference.lora_mode": "merge", "orchestrator.env_args.answers": ["a"]}.items():
        try:
            other = load_config(base, overrides={key: value})
        except ConfigError:
            continue
        assert session_mismatch(base, other) == key


def test_session_run_config_goes_on_the_sources_and_refuses_fixed_keys():
    session = {"max_steps": 4, "trainer": {"loss": {"kl_coef": 1.0}}}
    cfg = session_run_config(session, {"trainer.loss.kl_coef": 0.0}, seed=2)
    # teacher_tau / student_tau default to kl_coef: a run that sets kl_coef moves them too
    assert (cfg.trainer.loss.teacher_tau, cfg.trainer.loss.student_tau, cfg.seed, cfg.max_steps) == (0.0, 0.0, 2, 4)
    with pytest.raises(ConfigError, match=r"^model\.lora\.rank: differs from the session's"):
        session_run_config(session, overrides={"model.lora.rank": 4})
    with pytest.raises(ConfigError, match=r"^resume: a session's run starts from the base student"):
        session_run_config(session, resume=True)
    with pytest.raises(ConfigError, match=r'^ckpt\.on_failure: "restart" starts new roles'):
        session_run_config(session, overrides={"ckpt.on_failure": "restart"})
    with pytest.raises(ConfigError, match=r"^trainer\.finetune: a session's run resets a LoRA adapter between runs"):
        session_run_config(session, overrides={"trainer.finetune": "full", "inference.lora_mode": "merge"})


@pytest.mark.engine
def test_session_runs_start_from_the_base_student_and_repeat_exactly(tiny_pair, tmp_path):
    """Three runs on one start of the roles: a run after others (seed 0 again) repeats the first exactly, so
    the trainer's LoRA/optimizer and the engines' adapter really went back to the start; an SFT run trains on
    the teacher's samples; a run that changes a fixed key is refused before it starts. Merged, as the main job:
    every run's weights reach the engines from the trainer's memory (a reset trainer must still hold them)."""
    from shared.metrics import read_metrics

    small = {"orchestrator.batch_size": 8, "orchestrator.eval.num_prompts": 16, "orchestrator.eval.interval": 1,
             "wandb.mode": "disabled", "inference.lora_mode": "merge"}
    with Session(TOML, overrides=small, max_steps=2, output_dir=str(tmp_path / "session")) as session:
        assert set(session.startup) == {"time/startup_inference", "time/startup_teacher", "time/startup_trainer"}
        first = session.run(seed=0, output_dir=str(tmp_path / "a"))
        sft = session.run(seed=1, output_dir=str(tmp_path / "sft"),
                          overrides={"orchestrator.workflow": "sft", "trainer.lr": 1e-2})
        again = session.run(seed=0, output_dir=str(tmp_path / "b"))
        with pytest.raises(ConfigError, match=r"^model\.lora\.rank: differs from the session's"):
            session.run(overrides={"model.lora.rank": 8}, output_dir=str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()

    def rows(result):
        return [r for r in read_metrics(result.output_dir / "metrics.jsonl") if "tokens/step" in r]

    a, b = rows(first), rows(again)
    assert [r["step"] for r in a] == [1, 2] and "time/reset" in read_metrics(first.output_dir / "metrics.jsonl")[0]
    for ra, rb in zip(a, b):
        assert ra["tokens/step"] == rb["tokens/step"]
        assert ra["teacher_kl"] == pytest.approx(rb["teacher_kl"], abs=1e-5)
    assert first.eval_start == again.eval_start and first.eval_end == again.eval_end
    assert all((tmp_path / "b" / "broadcast" / f"step_{n}" / "COMPLETE").exists() for n in (0, 1, 2))
    s = rows(sft)
    assert all(r["teacher_kl"] is None and r["loss/sft"] > 0 and r["loss/policy"] == 0 for r in s)
    assert all(r["time/inference"] == 0 and r["tokens/step"] > 0 for r in s)


def test_sft_samples_put_each_teacher_sample_after_the_students_view_of_its_prompt():
    from orchestrator.workflows.sft import sft_samples
    from shared.wire import Rollout

    student_view = [[1, 5, 6], [1, 7]]  # prompts 10 and 11 (base 10); the teacher saw them with a context
    rollouts = [Rollout(prompt_index=11, prompt_ids=[1, 99, 7], completion_ids=[8, 2], logprobs=[-0.1, -0.2]),
                Rollout(prompt_index=10, prompt_ids=[1, 99, 5, 6], completion_ids=[9, 9, 2], logprobs=[-1, -1, -1])]
    built = sft_samples(student_view, rollouts, base=10)
    assert [s.input_ids for s in built] == [[1, 7, 8, 2], [1, 5, 6, 9, 9, 2]]
    assert [s.prompt_len for s in built] == [2, 3]
    assert all(s.policy is False and s.sft_weight == 1.0 and s.advantages == [] for s in built)
