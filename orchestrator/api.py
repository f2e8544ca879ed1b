"""The Python API: what ``rl`` does, from a script or a notebook (the CLI is a thin layer over it).

    from orchestrator.api import export_student, load_config, run

    cfg = load_config("experiments/reverse_text/rl.toml", {"orchestrator": {"batch_size": 8}},
                      overrides={"trainer.lr": 1e-3}, max_steps=2, output_dir="outputs/api_demo")
    result = run(cfg, export="exported/api_demo")       # trains, writes the report, exports the merged student
    result.metrics["teacher_kl"], result.eval_end, result.adapter, result.report, result.merged_model
    export_student(result.output_dir, "exported/api_demo_adapter", merged=False)

Several runs that differ only in per-run keys (seed, loss weights, learning rate, workflow, environment,
step budget; :data:`RUN_KEYS`) can share one start of the roles: a :class:`Session` (a sweep)::

    from orchestrator.api import Session

    with Session("experiments/reverse_text/rl.toml", output_dir="outputs/sweep") as session:
        for seed in (0, 1, 2):
            r = session.run(seed=seed, max_steps=20, output_dir=f"outputs/sweep/rl_s{seed}",
                            overrides={"trainer.loss.adv_tau": 1.0, "trainer.loss.kl_coef": 0.0})

Mistakes raise :class:`shared.config.ConfigError` (one line naming the key, before anything starts); a
role that fails raises ``RoleFailure``; too many bad steps in a row raise ``TrainingStopped``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from orchestrator.export import export_student, latest_adapter
from shared.config import Config, ConfigError, deep_merge, from_dict, load_toml
from shared.sampling import sampler_logprobs_mode

Source = str | Path | Mapping[str, Any] | Config

__all__ = ["RUN_KEYS", "RunResult", "Session", "export_student", "load_config", "run", "session_mismatch",
           "session_run_config"]


@dataclass(frozen=True)
class RunResult:
    """What a finished run left behind."""

    config: Config
    output_dir: Path
    steps: int  # training steps run (fewer than max_steps when a continual gate stopped the run)
    metrics: dict[str, Any]  # the last training step's row of metrics.jsonl
    eval: dict[str, Any]  # the last evaluation row (eval/<env>/avg, ...)
    eval_start: float  # eval/<env>/avg before training
    eval_end: float  # ... and at the end
    adapter: Path | None  # the final LoRA adapter (broadcast/step_N); None if no step trained
    report: Path  # report.md
    merged_model: Path | None  # the exported student (``run(..., export=path)``), else None
    summary: dict[str, Any]  # the orchestrator's summary (wall time, time per role, ...)


def _nested(flat: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``{"trainer.lr": 1e-3, "orchestrator": {...}}`` → nested dicts (dotted keys split)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: keys must be non-empty strings, got {key!r}")
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is both a value and a table in {where}")
        value = _nested(value, where) if isinstance(value, Mapping) else value
        node[last] = deep_merge(node[last], value) if isinstance(node.get(last), dict) and isinstance(value, dict) \
            else value
    return out


def load_config(*sources: Source, overrides: Mapping[str, Any] | None = None, **keys: Any) -> Config:
    """A validated :class:`Config` from TOML paths, dicts and ``Config`` objects, deep-merged left to
    right, then ``overrides`` (dotted keys allowed: ``{"trainer.lr": 1e-3}``), then keyword arguments
    (top-level keys or whole sections: ``max_steps=2, trainer={"lr": 1e-3}``) — as ``rl @ a.toml --key v``."""
    return from_dict(_merged(*sources, overrides=overrides, **keys))


def _merged(*sources: Source, overrides: Mapping[str, Any] | None = None, **keys: Any) -> dict[str, Any]:
    """:func:`load_config`'s merged dict, before validation (and before derived defaults are filled in)."""
    raw: dict[str, Any] = {}
    for src in sources:
        if isinstance(src, Config):
            part = msgspec.to_builtins(src)
        elif isinstance(src, Mapping):
            part = _nested(src, "load_config")
        elif isinstance(src, (str, Path)):
            part = load_toml(src)
        else:
            raise ConfigError(f"load_config: expected a TOML path, a dict or a Config, got {type(src).__name__}")
        raw = deep_merge(raw, part)
    raw = deep_merge(raw, _nested(overrides or {}, "overrides"))
    return deep_merge(raw, _nested(keys, "load_config"))


def run(config: Source, *, export: str | Path | None = None, merged: bool = True, progress: bool = False) -> RunResult:
    """Train ``config`` to the end (Ray starts and stops inside the call) and return a :class:`RunResult`;
    with ``export``, the final student is then written there (merged base + LoRA, or the adapter alone
    with ``merged=False``).  ``progress`` shows the console bar of ``rl``."""
    from shared.runtime import ray_env_defaults

    from orchestrator.launcher import launch, loopback_env_defaults, preflight

    ray_env_defaults()  # before anything imports ray
    loopback_env_defaults()
    cfg = config if isinstance(config, Config) else load_config(config)
    if cfg.dry_run:
        raise ConfigError("dry_run: run() trains; print the plan with shared.placement.describe(plan(cfg)) instead")
    if export is not None and Path(export).exists():  # found out now, not after training
        raise ConfigError(f"{export}: already exists; choose a new export path")
    summary = launch(cfg, progress=progress, run=preflight(cfg))
    return _result(cfg, summary, export, merged)


def _result(cfg: Config, summary: dict[str, Any], export: str | Path | None, merged: bool) -> RunResult:
    from shared.metrics import read_metrics

    out = Path(cfg.output_dir)
    rows = read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if "teacher_kl" in r]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    try:
        adapter = latest_adapter(out)
    except ConfigError:  # every step was skipped: nothing to point at (or export)
        adapter = None
    exported = export_student(out, export, merged=merged) if export is not None else None
    return RunResult(config=cfg, output_dir=out, steps=int(summary["steps"]), metrics=train[-1] if train else {},
                     eval=evals[-1] if evals else {}, eval_start=summary.get("eval_start", math.nan),
                     eval_end=summary.get("eval_end", math.nan),
                     adapter=adapter, report=Path(summary["report"]), merged_model=exported,
                     summary=summary)


# What a session's runs may change: the keys the orchestrator and the trainer read per run.  Everything
# else (models, engines, placement, the LoRA shape) was fixed when the session started its roles.
RUN_KEYS = ("max_steps", "seed", "output_dir", "wandb", "orchestrator", "inference.temperature", "inference.top_p",
            "inference.max_tokens", "trainer.lr", "trainer.lr_schedule", "trainer.warmup_steps", "trainer.min_lr_ratio",
            "trainer.weight_decay", "trainer.max_grad_norm", "trainer.micro_batch_size",
            "trainer.micro_batch_tokens", "trainer.max_bad_steps",
            "trainer.loss", "ckpt.interval", "ckpt.keep", "ckpt.stop_timeout")
FIXED_KEYS = ("orchestrator.env_args.answers", "orchestrator.env_args.answer_choice")  # the student engines' setup


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_flat(value, f"{name}.") if isinstance(value, Mapping) else {name: value})
    return out


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def session_mismatch(session: Config, run: Config) -> str | None:
    """The first key (dotted) where ``run`` differs from ``session`` but must not (see :data:`RUN_KEYS`), or None."""
    a, b = _flat(msgspec.to_builtins(session)), _flat(msgspec.to_builtins(run))
    for key in sorted(a.keys() | b.keys()):
        if a.get(key) != b.get(key) and (not _under(key, RUN_KEYS) or _under(key, FIXED_KEYS)):
            return key
    return None


def session_run_config(session: Mapping[str, Any], *sources: Source, overrides: Mapping[str, Any] | None = None,
                       **keys: Any) -> Config:
    """The config of a session's run: ``sources`` / ``overrides`` / ``keys`` (as :func:`load_config`) on top of
    ``session`` (the session's merged, unvalidated sources).  A ConfigError names a key the run may not change.

    Merging onto the sources rather than the resolved config keeps derived defaults live: a run that sets
    ``trainer.loss.kl_coef = 0`` also sets ``teacher_tau`` and ``student_tau``, which default to it."""
    base = from_dict(dict(session))
    cfg = from_dict(deep_merge(dict(session), _merged(*sources, overrides=overrides, **keys)))
    _check_session_config(cfg, "session's run")
    if sampler_logprobs_mode(cfg) != sampler_logprobs_mode(base):  # fixed when the student engines started
        raise ConfigError(f"inference.temperature: {cfg.inference.temperature:g} needs the student engines' "
                          f"logprobs_mode = {sampler_logprobs_mode(cfg)}, and the session's were started with "
                          f"{sampler_logprobs_mode(base)} (temperature {base.inference.temperature:g}; shared/sampling.py)")
    key = session_mismatch(base, cfg)
    if key is not None:
        raise ConfigError(f"{key}: differs from the session's, whose roles are already started with it "
                          "(a session's runs may change only orchestrator.api.RUN_KEYS)")
    return cfg


def _check_session_config(cfg: Config, what: str) -> None:
    """What a session (``what = "session"``) or one of its runs cannot do."""
    if cfg.dry_run:
        raise ConfigError(f"dry_run: a {what} trains; print the plan with shared.placement.describe(plan(cfg))")
    if cfg.resume:
        raise ConfigError(f"resume: a {what} starts from the base student; resume with run() or rl")
    if cfg.ckpt.on_failure == "restart":
        raise ConfigError(f'ckpt.on_failure: "restart" starts new roles, which a {what} shares; use "stop"')
    if cfg.trainer.finetune == "full":
        raise ConfigError(f'trainer.finetune: a {what} resets a LoRA adapter between runs; full fine-tuning runs '
                          "one at a time (run() or rl)")


class Session:
    """The roles of ``config`` started once, for several runs (:meth:`run`) that differ from it only in
    per-run keys (:data:`RUN_KEYS`; anything else is a ConfigError naming the key).

    Each run starts from the base student: the trainer draws a fresh LoRA adapter (B = 0) and optimizer from
    the run's seed and the engines serve it before the first step, so a run's result does not depend on the
    runs before it.  The actors' logs go to ``<config's output_dir>/logs``; each run writes its own
    ``output_dir`` (metrics.jsonl, broadcast/, report.md) as ``run`` does.  Ray stops at :meth:`close`
    (or the end of a ``with`` block)."""

    def __init__(self, *sources: Source, overrides: Mapping[str, Any] | None = None, progress: bool = False,
                 **keys: Any):
        from shared.runtime import ray_env_defaults

        from orchestrator.launcher import (loopback_env_defaults, orchestrator_result, place_on_nodes, preflight,
                                           ray_init_kwargs)

        ray_env_defaults()  # before anything imports ray
        loopback_env_defaults()
        self.sources = _merged(*sources, overrides=overrides, **keys)  # a run's keys go on top (session_run_config)
        self.config = from_dict(self.sources)
        _check_session_config(self.config, "session")
        self.progress = progress
        self.plan = preflight(self.config)
        import ray

        from orchestrator.orchestrator import Orchestrator

        ray.init(**ray_init_kwargs(self.config))
        try:
            self.plan, pin = place_on_nodes(self.config, self.plan)  # a node map when the cluster has several
            self._orch = ray.remote(Orchestrator).options(num_cpus=0, max_concurrency=2, **pin).remote(
                msgspec.json.encode(self.config), msgspec.json.encode(self.plan))
            self.startup: dict[str, float] = orchestrator_result(self._orch.open_session.remote())
        except BaseException:
            ray.shutdown()
            raise

    def run(self, *sources: Source, overrides: Mapping[str, Any] | None = None, export: str | Path | None = None,
            merged: bool = True, **keys: Any) -> RunResult:
        """Train the session's config changed by ``sources`` / ``overrides`` / ``keys`` (as :func:`load_config`)
        to the end, on the session's roles; a :class:`RunResult` as :func:`run` returns."""
        from orchestrator.launcher import await_run, prepare_output, preflight

        if self._orch is None:
            raise RuntimeError("this session is closed")
        cfg = session_run_config(self.sources, *sources, overrides=overrides, **keys)
        if export is not None and Path(export).exists():
            raise ConfigError(f"{export}: already exists; choose a new export path")
        run = msgspec.structs.replace(preflight(cfg), nodes=self.plan.nodes)  # the session's actors and nodes
        run_cfg = prepare_output(cfg, run)
        ref = self._orch.run_in_session.remote(msgspec.json.encode(run_cfg), msgspec.json.encode(run))
        summary = await_run(self._orch, ref, cfg, self.progress)
        return _result(cfg, summary, export, merged)

    def close(self) -> None:
        """Stop the roles and Ray (idempotent)."""
        if self._orch is not None:
            import ray

            self._orch = None
            ray.shutdown()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
