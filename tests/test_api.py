"""The Python API (orchestrator/api.py): configs from TOML files, dicts and Config objects; run() and
export from code, the tiny reverse_text workflow for 2 steps (marked ``engine``)."""

from __future__ import annotations

import math

import pytest

from orchestrator.api import RunResult, export_student, load_config, run
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

    cfg = load_config(TOML, overrides={"orchestrator.batch_size": 8, "orchestrator.eval.num_prompts": 16,
                                       "wandb.mode": "disabled", "trainer.lr": 0.02},
                      max_steps=2, output_dir=str(tmp_path / "run"))
    result = run(cfg, export=tmp_path / "student")
    assert isinstance(result, RunResult) and result.steps == 2
    assert result.metrics["step"] == 2 and math.isfinite(result.metrics["teacher_kl"])
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
    prompt = torch.tensor([[1, 4, 5, 6, 30]])  # serve_exports' prompt
    with torch.no_grad():
        first = torch.log_softmax(merged(input_ids=prompt).logits[0, -1], -1)[served["merged"][0][0]]
    assert float(first) == pytest.approx(served["merged"][1][0], abs=1e-3)
