"""Bad and hostile input: every user mistake is exit status 2 and one line naming the key or file:line.

The table runs the real `rl` command (a few tokenizer-loading cases call its entry point in-process);
each case fails in `preflight`, before Ray or any engine starts.
The rest checks the pieces directly: atomic writes under a full disk, torn metrics lines, the bad-step
stop, secret redaction, loopback-only sockets and safetensors-only weights.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import msgspec
import pytest

from tests.conftest import RL, ROOT

EXPERIMENT = str(ROOT / "experiments" / "reverse_text" / "rl.toml")
FAKE_WANDB_KEY = "wandb-fake-0123456789abcdef0123456789abcdef"
FAKE_API_KEY = "sk-fake-9876543210fedcba"


def run_rl(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([RL, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


# ----------------------------------------------------------------------------------------------
# Fake model directories (made from the real tiny pair)


def _copy_model(src: Path, dst: Path, files: tuple[str, ...] | None = None) -> Path:
    dst.mkdir(parents=True)
    for f in Path(src).iterdir():
        if files is None or f.name in files:
            shutil.copy(f, dst / f.name)
    return dst


def make_models(tmp: Path, pair: tuple[Path, Path]) -> dict[str, str]:
    teacher, student = pair
    d = {"nope": tmp / "nope", "empty": tmp / "empty", "file": tmp / "model.safetensors"}
    d["empty"].mkdir()
    d["file"].write_bytes(b"\0")
    _copy_model(student, tmp / "config_only", ("config.json",))
    _copy_model(student, tmp / "bin_only", ("config.json",))
    (tmp / "bin_only" / "pytorch_model.bin").write_bytes(b"not a pickle")
    _copy_model(student, tmp / "no_tokenizer", ("config.json", "model.safetensors"))
    _copy_model(student, tmp / "bad_json")
    (tmp / "bad_json" / "config.json").write_text("{not json")
    # Same architecture and weights as the teacher, but two token ids swapped: a different vocabulary.
    other = _copy_model(teacher, tmp / "other_vocab")
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    out = {k: str(v) for k, v in d.items()}
    out.update({k: str(tmp / k) for k in ("config_only", "bin_only", "no_tokenizer", "bad_json", "other_vocab")})
    out["student"], out["teacher"] = str(student), str(teacher)
    return out


def _dataset(tmp: Path) -> str:
    path = tmp / "prompts.jsonl"
    long = "abcdefghij" * 4 + "="
    path.write_text('{"prompt": "abcd=", "answer": "dcba"}\n\n' + json.dumps({"prompt": long, "answer": "x"}) + "\n")
    return str(path)


# (id, argv with {placeholders}, expected substrings with {placeholders}); the student/teacher default to the
# tiny pair's directories, output_dir to a fresh folder.
CASES = [
    # models
    ("model-path-missing", ["--model.name", "{nope}"], ["model.name:", "{nope}", "does not exist"]),
    ("teacher-path-missing", ["--teacher.name", "{nope}"], ["teacher.name:", "{nope}", "does not exist"]),
    ("model-dir-without-config", ["--model.name", "{empty}"], ["model.name:", "{empty}", "no config.json"]),
    ("model-path-is-a-file", ["--model.name", "{file}"], ["model.name:", "{file}", "not a model directory"]),
    ("model-config-not-json", ["--model.name", "{bad_json}"], ["model.name:", "config.json", "not valid JSON"]),
    ("teacher-without-weights", ["--teacher.name", "{config_only}"], ["teacher.name:", "{config_only}", "safetensors"]),
    ("model-with-pickle-weights-only", ["--model.name", "{bin_only}"],
     ["model.name:", "{bin_only}", "no *.safetensors", "pytorch_model.bin", "not loaded"]),
    ("model-without-tokenizer", ["--model.name", "{no_tokenizer}"], ["model.name:", "{no_tokenizer}", "no tokenizer"]),
    ("teacher-vocab-differs", ["--teacher.name", "{other_vocab}"],
     ["teacher.name:", "{other_vocab}", "reuses the student's token ids", "must match exactly", "SFT"]),
    ("chat-template-on-without-one", ["--model.chat_template", "on"], ["model.chat_template:", "no chat template"]),
    ("context-mode-system-without-template",
     ["--orchestrator.teacher_model.context_mode", "system", "--orchestrator.teacher_model.context", "Be brief."],
     ["orchestrator.teacher_model.context_mode:", "needs a chat template"]),
    ("max-model-len-below-longest-prompt", ["--model.max_model_len", "16"],
     ["model.max_model_len: 16 is too small", "+ inference.max_tokens 12 ="]),
    ("dataset-prompt-too-long", ["--orchestrator.dataset.path", "{dataset}"],
     ["{dataset}:3:", "model.max_model_len: 32 is too small", "42 prompt tokens", "on_bad_row"]),
    # disk
    ("output-dir-is-a-file", ["--output_dir", "{file}"], ["output_dir:", "{file}", "not a directory"]),
    ("output-dir-below-a-file", ["--output_dir", "{file}/run"], ["output_dir:", "{file}/run", "not writable"]),
    # data and config (the same one-line errors through the real command)
    ("dataset-bad-row", ["--orchestrator.dataset.path", "{bad_rows}"], ["{bad_rows}:2:", "not valid JSON"]),
    ("dataset-file-missing", ["--orchestrator.dataset.path", "{nope}.jsonl"],
     ["orchestrator.dataset.path: {nope}.jsonl: file not found"]),
    ("unknown-environment", ["--orchestrator.environment", "nope"],
     ["orchestrator.environment: unknown environment 'nope' (known: reverse_text,"]),
    ("unknown-key", ["--trainer.nope", "1"], ["trainer.nope", "unknown option"]),
    ("wrong-type", ["--trainer.lr", "abc"], ['trainer.lr: expected float, got "abc"']),
    ("out-of-range", ["--trainer.max_bad_steps", "-1"], ["trainer.max_bad_steps: expected int >= 0, got -1"]),
    ("malformed-toml", ["@", "{bad_toml}"], ["{bad_toml}: line 2, column 8: invalid TOML"]),
    ("gpu-ids-overlap", ["--inference_gpu_ids", "0,1", "--trainer_gpu_ids", "1"],
     ["trainer.gpu_ids: GPU 1 is also given to inference.gpu_ids"]),
    ("tp-does-not-divide-ids", ["--inference.parallel.tp", "2", "--inference_gpu_ids", "0,1,2"],
     ["inference.parallel.tp: 2 does not divide"]),
]


@pytest.fixture(scope="module")
def fakes(tiny_pair, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fakes")
    names = make_models(tmp, tiny_pair)
    names["dataset"] = _dataset(tmp)
    (tmp / "bad_rows.jsonl").write_text('{"prompt": "ab=", "answer": "ba"}\n{"prompt": \n')
    names["bad_rows"] = str(tmp / "bad_rows.jsonl")
    (tmp / "bad.toml").write_text("max_steps = 3\nseed = \n")
    names["bad_toml"] = str(tmp / "bad.toml")
    return names


def _fill(text: str, names: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: names.get(m.group(1), m.group(0)), text)


# Cases that load the tokenizer: importing transformers costs each `rl` process 20-60 s on a busy 2-core
# machine, so these call the same entry point (`rl = orchestrator.cli:main`) in this process instead.
# teacher-vocab-differs stays a real process, to show the tokenizer path ends without a traceback too.
IN_PROCESS = {"chat-template-on-without-one", "context-mode-system-without-template",
              "max-model-len-below-longest-prompt", "dataset-prompt-too-long"}


# `rl --dry_run` refuses the same mistakes with the same line (orchestrator/launcher.py DRY_RUN_SKIPS lists what
# it leaves out); these cases cover each kind of its checks once (the config-only cases fail in `load`, as before).
DRY_RUN_CASES = ["unknown-environment", "dataset-file-missing", "dataset-bad-row", "output-dir-is-a-file",
                 "output-dir-below-a-file", "model-path-missing", "teacher-vocab-differs", "dataset-prompt-too-long"]


RUN_AND_DRY_CASES = [pytest.param(*c, False, id=c[0]) for c in CASES] + \
    [pytest.param(*c, True, id=f"{c[0]}-dry-run") for c in CASES if c[0] in DRY_RUN_CASES]


@pytest.mark.parametrize(("name", "argv", "expected", "dry_run"), RUN_AND_DRY_CASES)
def test_user_mistake_is_status_2_and_one_line(fakes, tmp_path, capfd, name, argv, expected, dry_run):
    args = ["@", EXPERIMENT, "--model.name", fakes["student"], "--teacher.name", fakes["teacher"],
            "--output_dir", str(tmp_path / "out"), *[_fill(a, fakes) for a in argv], *(["--dry_run"] if dry_run else [])]
    if name in IN_PROCESS:
        from orchestrator.cli import main

        p = subprocess.CompletedProcess(args, main(args), *capfd.readouterr())
    else:
        p = run_rl(*args)
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-3000:])
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
    for text in expected:
        assert _fill(text, fakes) in lines[0], f"{_fill(text, fakes)!r} not in {lines[0]!r}"
    assert not (tmp_path / "out" / "config.toml").exists()  # nothing was started
    assert not (dry_run and (tmp_path / "out").exists())  # a dry run creates nothing


# ----------------------------------------------------------------------------------------------
# In-process checks that need a loaded tokenizer (loaded once here)


@pytest.fixture(scope="module")
def student_tok(tiny_pair):
    from shared import models

    return models.load_tokenizer(tiny_pair[1], "model.name")


def _cfg(tiny_pair, tmp_path, *extra: str):
    from shared.config import load

    return load(["@", EXPERIMENT, "--model.name", str(tiny_pair[1]), "--teacher.name", str(tiny_pair[0]),
                 "--output_dir", str(tmp_path / "out"), *extra])


def test_dataset_rows_too_long_are_skipped_and_counted(tiny_pair, student_tok, tmp_path, capsys):
    from orchestrator import environments
    from orchestrator.data import load_jsonl
    from orchestrator.launcher import _write_kept_rows, check_prompt_lengths

    cfg = _cfg(tiny_pair, tmp_path, "--orchestrator.dataset.path", _dataset(tmp_path),
               "--orchestrator.dataset.on_bad_row", "skip")
    kept = check_prompt_lengths(cfg, environments.make(cfg), student_tok, tiny_pair[1])
    assert [p.text for p in kept] == ["abcd="]
    err = capsys.readouterr().err
    assert err.strip() == (f"dataset: 1 of 2 rows skipped (prompts longer than model.max_model_len = 32 minus "
                           f"inference.max_tokens = 12 allows): {cfg.orchestrator.dataset.path}:3 "
                           "(orchestrator.dataset.on_bad_row = \"skip\")")
    path = _write_kept_rows(tmp_path, kept)
    rows, bad = load_jsonl(str(path))
    assert [(r.text, r.answer) for r in rows] == [("abcd=", "dcba")] and bad == 0


def test_every_dataset_row_too_long_is_an_error(tiny_pair, student_tok, tmp_path):
    from orchestrator import environments
    from orchestrator.launcher import check_prompt_lengths
    from shared.config import ConfigError

    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "x" * 40, "answer": "x"}) + "\n")
    cfg = _cfg(tiny_pair, tmp_path, "--orchestrator.dataset.path", str(path), "--orchestrator.dataset.on_bad_row", "skip")
    with pytest.raises(ConfigError, match=r"every prompt is longer than model\.max_model_len = 32"):
        check_prompt_lengths(cfg, environments.make(cfg), student_tok, tiny_pair[1])


def test_teacher_context_counts_towards_the_length(tiny_pair, student_tok, tmp_path):
    from orchestrator import environments
    from orchestrator.launcher import check_prompt_lengths
    from shared.config import ConfigError

    cfg = _cfg(tiny_pair, tmp_path, "--orchestrator.teacher_model.context", "x" * 15)
    with pytest.raises(ConfigError, match=r"with the teacher's context\) \+ inference\.max_tokens 12"):
        check_prompt_lengths(cfg, environments.make(cfg), student_tok, tiny_pair[1])


def test_too_little_free_space_is_one_line(tiny_pair, tmp_path, capsys, monkeypatch):
    from orchestrator import launcher
    from orchestrator.cli import main

    monkeypatch.setattr(launcher, "free_bytes", lambda path: 5_000_000)
    rc = main(["@", EXPERIMENT, "--model.name", str(tiny_pair[1]), "--teacher.name", str(tiny_pair[0]),
               "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    m = re.match(r"error: output_dir: .*/out has 5 MB free; a run needs at least (\d+) MB \(2 x the ([\d.]+) MB adapter",
                 err)
    assert m, err
    from shared.config import from_dict, load_toml
    from shared.fsutil import MB
    from shared.models import adapter_bytes

    lora = from_dict(load_toml(EXPERIMENT)).model.lora  # the experiment's rank and targets
    assert float(m.group(2)) == pytest.approx(adapter_bytes(tiny_pair[1], lora.rank, lora.target_modules) / MB, abs=0.05)
    assert int(m.group(1)) == round(100 + 2 * float(m.group(2)))

    # Full fine-tuning writes a whole model per step and keeps the newest two: room for three of them.
    rc = main(["@", EXPERIMENT, "--model.name", str(tiny_pair[1]), "--teacher.name", str(tiny_pair[0]),
               "--output_dir", str(tmp_path / "full"), "--trainer.finetune", "full", "--inference.lora_mode", "merge"])
    err = capsys.readouterr().err
    model_mb = sum(f.stat().st_size for f in tiny_pair[1].glob("*.safetensors")) / MB
    assert rc == 2 and err.count("\n") == 1, err
    assert f"(3 x the {model_mb:.1f} MB model + 100 MB)" in err, err


def test_adapter_size_estimate_matches_peft(tiny_pair):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from shared.config import Config
    from shared.models import adapter_bytes

    lora = Config().model.lora
    model = AutoModelForCausalLM.from_pretrained(str(tiny_pair[1]), dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=lora.rank, target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    params = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    assert adapter_bytes(tiny_pair[1], lora.rank, lora.target_modules) == 4 * params


# ----------------------------------------------------------------------------------------------
# Atomic writes under a full disk


def _enospc_after(monkeypatch, n_ok: int = 0):
    """os.write succeeds ``n_ok`` times (writing half of what it is given), then fails with ENOSPC."""
    real, calls = os.write, {"n": 0}

    def fake(fd, data):
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, bytes(data)[: max(1, len(data) // 2)])

    monkeypatch.setattr(os, "write", fake)


def test_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    from shared.fsutil import WriteError, atomic_write_text

    target = tmp_path / "config.toml"
    atomic_write_text(target, "seed = 1\n")
    _enospc_after(monkeypatch, n_ok=1)
    with pytest.raises(WriteError) as e:
        atomic_write_text(target, "seed = 2\n" * 1000)
    monkeypatch.undo()
    assert target.read_text() == "seed = 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]  # no temporary left behind
    msg = str(e.value)
    assert "\n" not in msg and msg == f"cannot write {target}: No space left on device (nothing was replaced)"
    assert e.value.errno == errno.ENOSPC
    assert pickle.loads(pickle.dumps(e.value)).filename == str(target)


def test_full_disk_during_the_report_keeps_the_previous_report(tmp_path, monkeypatch):
    from orchestrator.report import write_report
    from shared.fsutil import WriteError

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "teacher_kl": 1.0}) + "\n")
    write_report(tmp_path, {"wall_seconds": 1.0}, "seed = 0")
    before = (tmp_path / "report.md").read_bytes()
    _enospc_after(monkeypatch)
    with pytest.raises(WriteError, match="No space left on device"):
        write_report(tmp_path, {"wall_seconds": 2.0}, "seed = 1")
    monkeypatch.undo()
    assert (tmp_path / "report.md").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_full_disk_at_start_is_status_2_and_one_line(tmp_path, capsys, monkeypatch):
    from orchestrator.cli import main

    _enospc_after(monkeypatch)
    rc = main(["@", EXPERIMENT, "--output_dir", str(tmp_path / "out")])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("error: output_dir: ") and "No space left on device" in err


def test_export_to_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    from shared.fsutil import WriteError, atomic_dir

    def fail(tmp):
        (tmp / "a").write_text("x")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteError, match=r"cannot write .*exported: No space left on device"):
        with atomic_dir(tmp_path / "exported") as tmp:
            fail(tmp)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# metrics.jsonl: append-only, a torn last line is tolerated


def test_torn_last_metrics_line_is_skipped_and_repaired(tmp_path):
    from shared.metrics import MetricsLogger, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "teacher_kl": 2.0}) + "\n" + '{"step": 2, "teacher_k')
    assert read_metrics(path) == [{"step": 1, "teacher_kl": 2.0}]
    logger = MetricsLogger(str(tmp_path), {"mode": "disabled"}, {}, "x")
    logger.log({"step": 3, "teacher_kl": float("nan")})
    logger.close()
    assert read_metrics(path) == [{"step": 1, "teacher_kl": 2.0}, {"step": 3, "teacher_kl": None}]


# ----------------------------------------------------------------------------------------------
# N bad steps in a row stop the run


def test_bad_steps_in_a_row_stop_with_a_clear_message():
    from shared.metrics import BadSteps, TrainingStopped

    guard = BadSteps(3)
    guard.update({"step": 1, "skipped_step": 0.0, "grad_norm": 0.5, "loss/policy": 0.1})
    guard.update({"step": 2, "skipped_step": 1.0})
    guard.update({"step": 3, "skipped_step": 0.0, "grad_norm": 0.5, "loss/policy": 0.1})  # resets the count
    guard.update({"step": 4, "skipped_step": 1.0, "grad_norm": float("nan")})
    guard.update({"step": 5, "skipped_step": 0.0, "grad_norm": 1.0, "loss/policy": float("inf")})
    with pytest.raises(TrainingStopped) as e:
        guard.update({"step": 6, "skipped_step": 1.0, "teacher_kl": float("nan")})
    msg = str(e.value)
    assert msg.startswith("steps 4-6: 3 training steps in a row were skipped") and "\n" not in msg
    assert "trainer.max_bad_steps = 3" in msg and "broadcast/step_3 is the last good adapter" in msg
    assert str(pickle.loads(pickle.dumps(e.value))) == msg  # crosses Ray intact

    never = BadSteps(0)
    for step in range(1, 50):
        never.update({"step": step, "skipped_step": 1.0})


def test_orchestrator_run_stops_after_max_bad_steps(tiny_pair, tmp_path, monkeypatch):
    """The real `Orchestrator.run` loop, with the roles stubbed: the last good adapter is left alone."""
    import orchestrator.orchestrator as orchestrator_module
    from orchestrator.orchestrator import Orchestrator
    from shared.metrics import TrainingStopped, read_metrics
    from shared.placement import RunPlan, plan

    cfg = _cfg(tiny_pair, tmp_path, "--trainer.max_bad_steps", "2", "--wandb.mode", "disabled", "--max_steps", "10")
    monkeypatch.setattr(orchestrator_module, "redirect_output", lambda path: None)  # keep pytest's own output
    orch = Orchestrator(msgspec.json.encode(cfg), msgspec.json.encode(
        RunPlan(student=str(tiny_pair[1]), teacher=str(tiny_pair[0]), actors=plan(cfg))))
    good = tmp_path / "out" / "broadcast" / "step_1"
    good.mkdir(parents=True)
    (good / "adapter_model.safetensors").write_bytes(b"weights")
    steps = iter([{"step": 1, "skipped_step": 0.0, "grad_norm": 0.3, "loss/policy": 0.1}]
                 + [{"step": s, "skipped_step": 1.0, "grad_norm": float("nan")} for s in range(2, 11)])
    monkeypatch.setattr(orch, "_start_roles", lambda: {})
    monkeypatch.setattr(orch, "_evaluate", lambda env, **kw: 0.5)
    monkeypatch.setattr(orch, "_train_step", lambda env, step: next(steps))
    with pytest.raises(TrainingStopped, match=r"^steps 2-3: 2 training steps in a row were skipped"):
        orch.run()
    assert [r["step"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "skipped_step" in r] == [1, 2, 3]
    assert (good / "adapter_model.safetensors").read_bytes() == b"weights"


# ----------------------------------------------------------------------------------------------
# Secrets


def test_secrets_never_reach_any_output(tiny_pair, tmp_path, monkeypatch):
    from orchestrator.report import write_report
    from shared.config import load, to_toml
    from shared.metrics import MetricsLogger
    from shared.redact import REDACTED, redact_config, redact_toml

    secrets = {"WANDB_API_KEY": FAKE_WANDB_KEY, "OPENAI_API_KEY": FAKE_API_KEY}
    # The secret typed into config values: the resolved config, a dry run and an error message.
    dry = run_rl("@", EXPERIMENT, "--dry_run", "--wandb.name", FAKE_API_KEY, "--wandb.group", FAKE_WANDB_KEY,
                 env=secrets)
    assert dry.returncode == 0, dry.stderr[-2000:]
    err = run_rl("@", EXPERIMENT, "--trainer.lr", FAKE_API_KEY, env=secrets)
    assert err.returncode == 2 and "trainer.lr: expected float" in err.stderr
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    cfg = load(["@", EXPERIMENT, "--wandb.name", FAKE_API_KEY, "--output_dir", str(tmp_path)])
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "teacher_kl": 1.0}) + "\n")
    write_report(tmp_path, {"wall_seconds": 1.0}, redact_toml(to_toml(cfg)))
    (tmp_path / "raw").mkdir()
    write_report(tmp_path / "raw", {}, to_toml(cfg))  # the report redacts even an unredacted config
    # W&B (offline) gets the run config, including a judge-style `api_key` value.
    run_config = {**msgspec.to_builtins(cfg), "judge": {"api_key": "sk-config-value-123456"}}
    assert redact_config(run_config)["judge"]["api_key"] == REDACTED
    logger = MetricsLogger(str(tmp_path / "wb"), {"mode": "offline", "project": "opd", "name": "", "group": ""},
                           run_config, "secrets")
    logger.log({"step": 1, "teacher_kl": 1.0})
    logger.close()

    outputs = [dry.stdout, dry.stderr, err.stdout, err.stderr]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "report.md" for p in files) and any(p.suffix == ".wandb" for p in files)
    for value in (FAKE_WANDB_KEY, FAKE_API_KEY, "sk-config-value-123456"):
        for text in outputs:
            assert value not in text
        for p in files:
            assert value.encode() not in p.read_bytes(), p
    assert REDACTED in dry.stdout and REDACTED in (tmp_path / "report.md").read_text()


# ----------------------------------------------------------------------------------------------
# Sockets and weights


def test_ray_is_private_and_has_no_dashboard():
    from orchestrator.launcher import LOOPBACK_ENV, ray_init_kwargs
    from shared.config import Config

    kwargs = ray_init_kwargs(Config())
    assert kwargs["include_dashboard"] is False
    assert kwargs["dashboard_host"] == "127.0.0.1"
    assert kwargs["address"] == "local"  # a fresh local Ray, never someone else's cluster (without it, ray.init
    # joins a cluster that `ray start` left running on this machine)
    assert LOOPBACK_ENV == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo",
                            "NCCL_SOCKET_IFNAME": "lo", "VLLM_HOST_IP": "127.0.0.1"}
    from ray._private import ray_constants

    assert ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR == "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray still reads it


def _project_sources() -> list[Path]:
    return [p for d in ("shared", "orchestrator", "inference", "teacher", "trainer") for p in (ROOT / d).rglob("*.py")]


def test_every_socket_the_project_opens_is_loopback():
    for path in _project_sources():
        text = path.read_text()
        assert "0.0.0.0" not in text, path
        for m in re.finditer(r"\.bind\(\(\s*([^,]+),", text):
            assert m.group(1).strip() in ('"127.0.0.1"', "'127.0.0.1'"), (path, m.group(0))
        for m in re.finditer(r"tcp://([^:/\"']+)", text):
            assert m.group(1) == "127.0.0.1", (path, m.group(0))
        for m in re.finditer(r"ray\.init\(([^\n]*)", text):
            assert m.group(1).startswith("**ray_init_kwargs("), (path, m.group(0))


def test_no_pickle_weights_are_ever_loaded():
    for path in _project_sources():
        for m in re.finditer(r"torch\.load\(([^)]*)\)", path.read_text()):
            assert "weights_only=True" in m.group(1), (path, m.group(0))
