"""Typed config: user mistakes become one-line `error: ...` messages (exit 2), merge order, --dry_run.

Nothing here starts Ray or vLLM: every `main(argv)` call either fails validation or uses --dry_run.
"""

from __future__ import annotations

import datetime
import string
from pathlib import Path

import msgspec
import pytest
import tomli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.cli import main
from shared.config import Config, ConfigError, deep_merge, from_dict, load, load_toml, parse_cli, to_toml

REPO = Path(__file__).resolve().parents[1]
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------------------------
# Error cases through the entry point


# (id, TOML files to write {name: text} or None, argv (`{name}` is replaced by the written path), expected substrings)
ERROR_CASES = [
    ("unknown-key-in-toml", {"a.toml": "[trainer]\nfoo = 1\n"}, ["@", "{a.toml}"], ["trainer.foo", "unknown key"]),
    ("unknown-nested-key-in-toml", {"a.toml": "[trainer.loss]\nkl = 1\n"}, ["@", "{a.toml}"], ["trainer.loss.kl"]),
    ("unknown-top-level-key", {"a.toml": "max_step = 3\n"}, ["@", "{a.toml}"], ["max_step: unknown key"]),
    ("unknown-cli-option", None, ["--trainer.nope", "1"], ["trainer.nope", "unknown option"]),
    ("unknown-cli-section", None, ["--nope", "1"], ["nope", "unknown option"]),
    ("option-below-a-scalar", None, ["--trainer.lr.x", "1"], ["trainer.lr.x", "unknown option"]),
    ("empty-option-name", None, ["--", "1"], ["bad option '--'"]),
    ("wrong-type-float", None, ["--trainer.lr", "abc"], ['trainer.lr: expected float, got "abc"']),
    ("wrong-type-int", None, ["--max_steps", "1.5"], ["max_steps: expected int, got 1.5"]),
    ("wrong-type-list-item", None, ["--inference_gpu_ids", "0,x"], ['inference.gpu_ids[1]: expected int, got "x"']),
    ("wrong-type-in-toml", {"a.toml": '[trainer]\nlr = "fast"\n'}, ["@", "{a.toml}"], ['trainer.lr: expected float, got "fast"']),
    ("out-of-range", None, ["--max_steps", "0"], ["max_steps: expected int >= 1, got 0"]),
    ("out-of-range-float", None, ["--inference.top_p", "1.5"], ["inference.top_p", "<= 1", "got 1.5"]),
    ("out-of-range-nan", None, ["--trainer.lr", "nan"], ["trainer.lr", "got nan"]),
    ("bad-enum", None, ["--wandb.mode", "x"], ['wandb.mode: expected one of "offline", "online", "disabled", got "x"']),
    ("bad-enum-dtype", None, ["--model.dtype", "fp16"], ["model.dtype", '"float32"', '"bfloat16"', '"fp16"']),
    ("malformed-toml", {"bad.toml": "max_steps = 3\nseed = \n"}, ["@", "{bad.toml}"], ["bad.toml: line 2, column 8: invalid TOML"]),
    ("malformed-toml-table", {"bad.toml": "[trainer\nlr = 1\n"}, ["@", "{bad.toml}"], ["bad.toml: line 1, column", "invalid TOML"]),
    ("duplicate-toml-key", {"bad.toml": "seed = 1\nseed = 2\n"}, ["@", "{bad.toml}"], ["bad.toml: line 2, column", "invalid TOML"]),
    ("missing-toml-file", None, ["@", "does/not/exist.toml"], ["does/not/exist.toml: config file not found"]),
    ("missing-toml-file-attached", None, ["@does/not/exist.toml"], ["does/not/exist.toml: config file not found"]),
    ("toml-path-is-a-directory", None, ["@", "{tmp}"], ["cannot read config file"]),
    ("toml-path-with-nul-byte", None, ["@", "a\x00b.toml"], ["cannot read config file", "null byte"]),
    ("toml-integer-too-long", {"a.toml": "seed = 1" + "0" * 5000 + "\n"}, ["@", "{a.toml}"], ["a.toml: invalid TOML"]),
    ("toml-nested-too-deep", {"a.toml": "x = " + "[" * 500 + "]" * 500 + "\n"}, ["@", "{a.toml}"], ["a.toml: invalid TOML"]),
    ("cli-integer-too-long", None, ["--seed", "1" + "0" * 5000], ["seed: integer value out of range"]),
    ("cli-nested-too-deep", None, ["--trainer.lr", "[" * 500 + "]" * 500], ["trainer.lr: expected float"]),
    ("toml-not-utf8", {"latin1.toml": None}, ["@", "{latin1.toml}"], ["latin1.toml: cannot read config file", "UnicodeDecodeError"]),
    (
        "gpu-overlap-between-roles",
        None,
        ["--inference_gpu_ids", "0,1", "--trainer_gpu_ids", "1"],
        ["trainer.gpu_ids: GPU 1 is also given to inference.gpu_ids"],
    ),
    (
        "gpu-overlap-teacher",
        None,
        ["--inference_gpu_ids", "0", "--teacher_gpu_ids", "0"],
        ["teacher.gpu_ids: GPU 0 is also given to inference.gpu_ids"],
    ),
    ("gpu-duplicate-within-role", None, ["--inference_gpu_ids", "0,0"], ["inference.gpu_ids: duplicate GPU id in [0, 0]"]),
    ("gpu-duplicate-trainer", None, ["--trainer_gpu_ids", "3", "3"], ["trainer.gpu_ids: duplicate GPU id"]),
    ("gpu-negative-id", None, ["--teacher_gpu_ids=-1"], ["teacher.gpu_ids: GPU ids must be >= 0"]),
    (
        "tp-does-not-divide-ids",
        None,
        ["--inference.parallel.tp", "2", "--inference_gpu_ids", "0,1,2"],
        ["inference.parallel.tp: 2 does not divide the 3 ids in inference.gpu_ids"],
    ),
    ("tp-without-ids", None, ["--inference.parallel.tp", "2"], ["inference.parallel.tp", "needs GPU ids"]),
    ("teacher-tp-without-ids", None, ["--teacher.parallel.tp", "2"], ["teacher.parallel.tp", "needs GPU ids"]),
    (
        "dp-times-tp-mismatch",
        None,
        ["--inference_gpu_ids", "0,1,2,3", "--inference.parallel.tp", "2", "--inference.parallel.dp", "1"],
        ["inference.parallel.dp: dp*tp = 2 must equal the 4 ids in inference.gpu_ids"],
    ),
    (
        "mask-ratio-low-not-below-high",
        None,
        ["--trainer.loss.mask_ratio_low", "1", "--trainer.loss.mask_ratio_high", "1"],
        ["trainer.loss.mask_ratio_low: must be below trainer.loss.mask_ratio_high"],
    ),
    (
        "max-tokens-fills-context",
        None,
        ["--inference.max_tokens", "64", "--model.max_model_len", "64"],
        ["inference.max_tokens: 64 leaves no room for a prompt in model.max_model_len = 64"],
    ),
    ("section-given-a-scalar", {"a.toml": "trainer = 5\n"}, ["@", "{a.toml}"], ["trainer: expected object, got 5"]),
    ("section-given-a-scalar-cli", None, ["--trainer", "5"], ["trainer: expected object, got 5"]),
    ("list-given-a-scalar-in-toml", {"a.toml": '[trainer]\ngpu_ids = "0,1"\n'}, ["@", "{a.toml}"], ["trainer.gpu_ids", '"0,1"']),
    ("at-without-file", None, ["@"], ["'@' must be followed by a TOML file path"]),
    ("stray-positional", None, ["stray"], ["unexpected argument 'stray'"]),
    ("stray-positional-single-dash", None, ["-x"], ["unexpected argument '-x'"]),
    ("missing-value", None, ["--max_steps"], ["max_steps: missing value"]),
    ("two-values-for-scalar", None, ["--max_steps", "1", "2"], ["max_steps: expected one value, got 2"]),
    ("bool-given-junk", None, ["--dry_run", "yes"], ['dry_run: expected bool, got "yes"']),
    ("empty-output-dir", None, ["--output_dir", " "], ["output_dir: must not be empty"]),
]


@pytest.mark.parametrize(("files", "argv", "expected"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_config_errors_are_one_line(tmp_path, capsys, files, argv, expected):
    paths = {"tmp": str(tmp_path)}
    for name, text in (files or {}).items():
        if text is None:  # not UTF-8
            (tmp_path / name).write_bytes("seed = 1 # caf\xe9\n".encode("latin-1"))
            paths[name] = str(tmp_path / name)
        else:
            paths[name] = _write(tmp_path, name, text)
    argv = [paths.get(a[1:-1], a) if a.startswith("{") and a.endswith("}") else a for a in argv]

    rc = main(argv)

    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)
    assert err.startswith("error: "), repr(err)
    assert "Traceback" not in err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    assert out == ""


def test_errors_go_through_load_as_config_error():
    with pytest.raises(ConfigError, match=r"^trainer\.lr: expected float, got \"abc\"$"):
        load(["--trainer.lr", "abc"])


def test_cli_error_names_the_file_of_a_bad_toml(tmp_path):
    good = _write(tmp_path, "good.toml", "seed = 1\n")
    bad = _write(tmp_path, "second.toml", "[trainer]\nlr = = 1\n")
    with pytest.raises(ConfigError) as e:
        load(["@", good, "@", bad])
    assert str(e.value).startswith(f"{bad}: line 2, column ")


def test_unknown_key_with_odd_characters_stays_one_line():
    with pytest.raises(ConfigError) as e:
        from_dict({"trainer": {"a\nb": 1}})
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("trainer.")
    assert "unknown key" in str(e.value)


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "rl @" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Merge semantics


def test_two_toml_files_deep_merge_left_to_right_then_cli_wins(tmp_path):
    a = _write(
        tmp_path,
        "a.toml",
        "max_steps = 5\nseed = 1\n[trainer]\nlr = 0.1\nweight_decay = 0.2\n[trainer.loss]\nkl_coef = 2.0\n"
        "[wandb]\nmode = \"disabled\"\n",
    )
    b = _write(tmp_path, "b.toml", "seed = 2\n[trainer]\nlr = 0.3\n[trainer.loss]\nmask_ratio_high = 4.0\n")
    cfg = load(["@", a, "@", b, "--trainer.lr", "0.7", "--max_steps", "9"])
    assert cfg.max_steps == 9  # a, overridden on the CLI
    assert cfg.seed == 2  # b over a
    assert cfg.trainer.lr == 0.7  # CLI over b over a
    assert cfg.trainer.weight_decay == 0.2  # only in a: kept by the deep merge of [trainer]
    assert cfg.trainer.loss.kl_coef == 2.0  # only in a
    assert cfg.trainer.loss.mask_ratio_high == 4.0  # only in b
    assert cfg.wandb.mode == "disabled"
    assert cfg.model == Config().model  # untouched sections keep their defaults

    # Order matters: b then a.
    cfg = load([f"@{b}", f"@{a}"])
    assert cfg.seed == 1 and cfg.trainer.lr == 0.1 and cfg.trainer.loss.mask_ratio_high == 4.0


def test_cli_options_may_come_before_files_and_still_win(tmp_path):
    a = _write(tmp_path, "a.toml", "seed = 1\n")
    assert load(["--seed", "7", "@", a]).seed == 7


def test_deep_merge_replaces_non_tables():
    base = {"a": {"x": 1, "y": {"z": 2}}, "b": [1, 2], "c": 5}
    over = {"a": {"y": {"w": 3}}, "b": [3], "c": {"t": 1}}
    assert deep_merge(base, over) == {"a": {"x": 1, "y": {"z": 2, "w": 3}}, "b": [3], "c": {"t": 1}}
    assert base == {"a": {"x": 1, "y": {"z": 2}}, "b": [1, 2], "c": 5}  # not mutated


@pytest.mark.parametrize("flag", ["--trainer.loss.kl_coef", "--trainer.loss.kl-coef", "--trainer.loss.kl_coef=0.5"])
def test_dash_underscore_and_equals_forms(flag):
    argv = [flag] if "=" in flag else [flag, "0.5"]
    assert load(argv).trainer.loss.kl_coef == 0.5


def test_equals_form_for_an_alias_and_negative_values():
    cfg = load(["--inference_gpu_ids=0,1", "--trainer.loss.logprob_floor", "-5", "--seed=3"])
    assert cfg.inference.gpu_ids == [0, 1]
    assert cfg.trainer.loss.logprob_floor == -5.0
    assert cfg.seed == 3


@pytest.mark.parametrize(
    "argv",
    [
        ["--inference_gpu_ids", "0,1", "--teacher_gpu_ids", "2", "--trainer_gpu_ids", "3"],
        ["--inference_gpu_ids", "0", "1", "--teacher_gpu_ids", "2", "--trainer_gpu_ids", "3"],
        ["--inference-gpu-ids", "0,", "1", "--teacher.gpu_ids", "2", "--trainer.gpu-ids=3"],
    ],
)
def test_gpu_id_lists(argv):
    cfg = load(argv)
    assert cfg.inference.gpu_ids == [0, 1]
    assert cfg.teacher.gpu_ids == [2]
    assert cfg.trainer.gpu_ids == [3]


def test_empty_id_list_clears_a_toml_value(tmp_path):
    a = _write(tmp_path, "a.toml", "[trainer]\ngpu_ids = [0]\n")
    assert load(["@", a]).trainer.gpu_ids == [0]
    assert load(["@", a, "--trainer_gpu_ids="]).trainer.gpu_ids == []


@pytest.mark.parametrize("flag", ["--dry_run", "--dry-run", "--dry_run=true"])
def test_bare_boolean_flag(flag):
    assert load([flag]).dry_run is True
    assert load([]).dry_run is False
    assert load([flag, "--seed", "1"]).dry_run is True


def test_bool_flag_can_be_turned_off(tmp_path):
    a = _write(tmp_path, "a.toml", "dry_run = true\n")
    assert load(["@", a, "--dry_run", "false"]).dry_run is False


@pytest.mark.parametrize(
    ("argv", "attr", "value"),
    [
        (["--output_dir", "123"], "output_dir", "123"),
        (["--output_dir", "2024-01-01"], "output_dir", "2024-01-01"),
        (["--wandb.name", "true"], "wandb.name", "true"),
        (["--wandb.name", '"quoted"'], "wandb.name", "quoted"),
        (["--model.name", "/models/x"], "model.name", "/models/x"),
        (["--model.lora.target_modules", "q_proj,1"], "model.lora.target_modules", ["q_proj", "1"]),
    ],
)
def test_string_options_take_the_token_as_written(argv, attr, value):
    node = load(argv)
    for part in attr.split("."):
        node = getattr(node, part)
    assert node == value


def test_later_dotted_option_replaces_an_earlier_scalar_section():
    # Used to crash with TypeError: the earlier `--trainer 5` left an int where a table was expected.
    assert load(["--trainer", "5", "--trainer.lr", "0.5"]).trainer.lr == 0.5
    with pytest.raises(ConfigError, match="^trainer: expected object, got 5$"):
        load(["--trainer.lr", "0.5", "--trainer", "5"])


def test_parse_cli_splits_files_and_overrides():
    files, overrides = parse_cli(["@", "a.toml", "@b.toml", "--trainer.lr", "0.1", "--dry-run", "--wandb.mode=online"])
    assert files == ["a.toml", "b.toml"]
    assert overrides == {"trainer": {"lr": 0.1}, "dry_run": True, "wandb": {"mode": "online"}}


# ----------------------------------------------------------------------------------------------
# --dry_run


def test_dry_run_prints_round_trippable_toml_and_plan(tmp_path, capsys):
    a = _write(tmp_path, "a.toml", "max_steps = 3\n[trainer.loss]\nkl_coef = 0.25\n")
    argv = ["@", a, "--inference_gpu_ids", "0,1", "--teacher_gpu_ids", "2", "--trainer_gpu_ids", "3", "--dry_run"]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert err == ""

    resolved = load(argv)
    # The placement plan lines are TOML comments, so the whole output parses.
    reparsed = from_dict(tomli.loads(out))
    assert msgspec.structs.replace(reparsed, dry_run=True) == resolved
    assert reparsed.max_steps == 3 and reparsed.trainer.loss.kl_coef == 0.25
    assert "dry_run" not in tomli.loads(out)

    assert "# placement plan" in out
    for name in ("orchestrator-0", "inference-0", "inference-1", "teacher-0", "trainer-0"):
        assert name in out
    assert "backend=nccl" in out


def test_dry_run_defaults_round_trip(capsys):
    assert main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert from_dict(tomli.loads(out)) == Config()
    assert "trainer-0" in out and "backend=gloo" in out and "CPU" in out


def test_to_toml_round_trips_a_non_default_config():
    cfg = load(["--seed", "5", "--wandb.name", "run 1", "--model.lora.target_modules", "q_proj", "--trainer.lr", "1e-5"])
    assert from_dict(tomli.loads(to_toml(cfg))) == cfg


# ----------------------------------------------------------------------------------------------
# The shipped experiment


def test_reverse_text_experiment_loads():
    cfg = load(["@", str(REPO / "experiments" / "reverse_text" / "rl.toml")])
    assert cfg.output_dir == "outputs/reverse_text"
    assert cfg.model.max_model_len == 32 and cfg.inference.max_tokens == 12
    assert cfg.trainer.lr == 2e-3 and cfg.trainer.lr_schedule == "cosine" and cfg.max_steps == 250
    assert cfg.orchestrator.eval.num_prompts == 100


@pytest.mark.parametrize("name", ["reverse_text", "context_distill", "sft", "cross_vocab"])
def test_every_experiment_loads(name):
    cfg = load(["@", str(REPO / "experiments" / name / "rl.toml")])
    assert cfg.output_dir == f"outputs/{name}"


def test_reverse_text_experiment_dry_run(capsys):
    rc = main(["@", str(REPO / "experiments" / "reverse_text" / "rl.toml"), "--dry_run"])
    assert rc == 0
    assert "outputs/reverse_text" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Property-based: nothing but ConfigError ever escapes


_keys = st.one_of(
    st.sampled_from(
        [
            "max_steps", "seed", "output_dir", "dry_run", "model", "teacher", "inference", "trainer", "orchestrator",
            "wandb", "lora", "rank", "name", "dtype", "gpu_ids", "parallel", "tp", "dp", "lr", "loss", "kl_coef",
            "mask_ratio_low", "mask_ratio_high", "max_tokens", "max_model_len", "mode", "dataset", "eval", "path",
            "cpu_ranks", "target_modules",
        ]
    ),
    st.text(max_size=8),
)
_toml_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.datetimes(),
    st.datetimes(timezones=st.just(datetime.timezone.utc)),
    st.dates(),
    st.times(),
)
_toml_values = st.recursive(
    _toml_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=4),
    max_leaves=20,
)


@PROPERTY
@given(st.dictionaries(_keys, _toml_values, max_size=6))
def test_from_dict_raises_only_config_error(raw):
    try:
        cfg = from_dict(raw)
    except ConfigError as e:
        assert "\n" not in str(e)
        assert str(e)
    else:
        assert isinstance(cfg, Config)


_tokens = st.one_of(
    st.sampled_from(
        [
            "@", "--", "--dry_run", "--dry-run", "--trainer", "--trainer.lr", "--trainer.loss.kl-coef",
            "--inference_gpu_ids", "--teacher_gpu_ids", "--trainer_gpu_ids", "--max_steps", "--wandb.mode",
            "--inference.parallel.tp", "--output_dir", "--model.lora.target_modules", "--trainer.lr=", "0", "1",
            "0,1", "-1", "abc", "nan", "inf", "[1,2]", "{lr=1}", '"x"', "true", "1979-05-27", "=", ",",
        ]
    ),
    st.text(max_size=12),
    st.builds(lambda k, v: f"--{k}={v}", _keys, st.text(max_size=6)),
    st.builds(lambda k: f"--{k}", st.text(alphabet=string.ascii_lowercase + "._-", max_size=20)),
)


@PROPERTY
@given(st.lists(_tokens, max_size=8))
def test_parse_cli_and_load_raise_only_config_error(argv):
    try:
        parse_cli(argv)
    except ConfigError as e:
        assert str(e)
    try:
        cfg = load(argv)
    except ConfigError as e:
        assert str(e)
    else:
        assert isinstance(cfg, Config)


_toml_fragments = st.sampled_from(
    [
        "[trainer]\n", "[trainer.loss]\n", "lr = ", "max_steps = ", "gpu_ids = [0, 1]\n", "= ", "[[x]]\n", "\"",
        "'''", "\n", "1\n", "abc", "{a = 1}", "trainer = 5\n", "[", "]", "#", "1979-05-27T07:32:00Z", "0x1f",
        "nan", "[wandb]\nmode = \"x\"\n",
    ]
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=80), st.lists(_toml_fragments, max_size=10).map("".join)))
def test_arbitrary_toml_text_raises_only_config_error(tmp_path, text):
    path = tmp_path / "fuzz.toml"
    try:
        path.write_text(text, encoding="utf-8")
    except UnicodeEncodeError:  # lone surrogates cannot be written as UTF-8
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        load_toml(path)
    except ConfigError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)
    try:
        load(["@", str(path)])
    except ConfigError as e:
        assert str(e)


# -- orchestrator.workflow = "sft": the teacher writes the training completions -----------------------------

def test_workflow_defaults_to_distill_and_sft_loads():
    assert from_dict({}).orchestrator.workflow == "distill"
    cfg = load(["@", str(REPO / "experiments" / "reverse_text" / "rl.toml"), "--orchestrator.workflow", "sft"])
    assert cfg.orchestrator.workflow == "sft" and cfg.trainer.loss.adv_tau == 0.0


def test_workflow_choices_are_the_registered_workflows():
    """The config's choices and the plug-in registry name the same workflows (a new module needs both)."""
    import typing

    from orchestrator.workflows import REGISTRY
    from shared.config import OrchestratorConfig

    tp = {f.name: f.type for f in msgspec.structs.fields(OrchestratorConfig)}["workflow"]
    choices = typing.get_args(typing.get_args(tp)[0])
    assert set(choices) == set(REGISTRY)


@pytest.mark.parametrize("raw, match", [
    ({"orchestrator": {"workflow": "teacher"}}, r'^orchestrator\.workflow: expected one of "distill", "judge", "comparator", "sft", got "teacher"$'),
    ({"trainer": {"loss": {"adv_tau": 1.0}}}, r'^trainer\.loss\.adv_tau: must be 0 with orchestrator\.workflow = "sft"'),
    ({"trainer": {"loss": {"lockin_coef": 0.1}}}, r"^trainer\.loss\.lockin_coef: must be 0 with"),
    ({"trainer": {"loss": {"entropy_coef": 0.1}}}, r"^trainer\.loss\.entropy_coef: must be 0 with"),
    ({"orchestrator": {"max_async_level": 1}}, r"^orchestrator\.max_async_level: must be 0 with orchestrator\.workflow"),
    ({"teacher": {"endpoint": "http://127.0.0.1:8000/v1"}}, r"^orchestrator\.workflow: \"sft\" needs the in-cluster"),
])
def test_sft_refuses_on_policy_settings(raw, match):
    raw = deep_merge({"orchestrator": {"workflow": "sft"}}, raw)
    with pytest.raises(ConfigError, match=match):
        from_dict(raw)
