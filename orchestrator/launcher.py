"""``rl``: parse the config, check inputs, plan placement, start the orchestrator actor and wait.

All checks that can fail on a user's mistake run here, before Ray or any engine starts.
"""

from __future__ import annotations

import json
import os
import sys
from array import array
from pathlib import Path
from typing import Any

import msgspec

from orchestrator import skips
from orchestrator.data import DatasetView
from shared.config import Config, ConfigError, teacher_configs, to_toml
from shared.fsutil import MB, WriteError, atomic_write_chunks, atomic_write_text, free_bytes
from shared.metrics import TrainingStopped, read_metrics
from shared.placement import ActorPlan, RunPlan, node_affinity, node_ids, node_list, node_order, plan
from shared.redact import redact_toml

# Prompts rendered from a generating environment to find the longest (a dataset file is checked whole).
LENGTH_SAMPLE = 256
DISK_MARGIN = 100 * MB  # metrics, logs, plots, report, W&B


def preflight(cfg: Config) -> RunPlan:
    """Validate what the config points at, before Ray or any engine starts; every problem is a
    one-line ConfigError.  Returns the run's plan: the resolved model directories, every actor's placement
    (planned here, once), and, when dataset rows were skipped for length, the file of the rows kept.

    With ``cfg.dry_run`` (``rl --dry_run``) the same checks run, except those that write, cost much or
    need another machine (:data:`DRY_RUN_SKIPS`): nothing is created, built or contacted."""
    from orchestrator import environments, teacher_set, vocabulary
    from orchestrator.teacher_set import teacher_backend
    from shared import models
    from shared.config import teacher_view

    dry = cfg.dry_run
    tcfg = teacher_view(cfg)  # [teacher], or among [teachers.NAME] the teacher of the run's own environment
    out = _check_output_dir(cfg)
    _check_resume(cfg)
    # the actors get the entries of rl's own CUDA_VISIBLE_DEVICES (shared/placement.py); an id beyond what rl
    # sees is a one-line error now, not in an actor later
    actors = plan(cfg, os.environ.get("CUDA_VISIBLE_DEVICES"))
    _check_nodes(cfg, actors)
    if not dry:
        from orchestrator import ckpt_sign

        ckpt_sign.load_key()  # created now (first use): signing a checkpoint mid-run must not be the first to fail on it
        _check_gpus(actors)
    env = environments.make(cfg)  # an unknown environment, or a bad dataset row (file:line), raises here
    skipped = {"malformed": env.bad_rows} if env.bad_rows else {}
    if env.bad_rows:  # on_bad_row = "skip": said at once, and counted in metrics.jsonl and the report
        dataset = env.dataset
        print(skips.rows_line(dataset.path, env.bad_rows, len(dataset) + env.bad_rows, dataset.bad_lines, "malformed"),
              file=sys.stderr)
    teacher_set.check_rows(cfg, env.dataset)  # teacher_route.by = "column": every row names a known teacher
    if dry and not (models.is_built(cfg.model.name) and all(models.is_built(t.name) for t in teacher_configs(cfg).values())):
        print(f"dry run: model, tokenizer, prompt-length and disk checks skipped: {cfg.model.name} or "
              f"{tcfg.teacher.name} is built on first use (a real run does it, then checks)", file=sys.stderr)
        return RunPlan(student=cfg.model.name, teacher=tcfg.teacher.name, actors=actors, skipped=skipped)
    student = models.resolve(cfg.model.name, "model.name")
    teacher = models.resolve(tcfg.teacher.name, "teacher.name")
    s_tok = models.load_tokenizer(student, "model.name")
    t_tok = s_tok if teacher == student else models.load_tokenizer(teacher, "teacher.name")
    # one vocabulary and agreeing templates, or (teacher.vocabulary = "align", one teacher) tokenizers to align
    vocabulary.preflight(tcfg, student, teacher, s_tok, t_tok, [p.text for p in env.eval_prompts(3)])
    run = RunPlan(student=str(student), teacher=str(teacher), actors=actors, skipped=skipped,
                  teachers=teacher_set.check_teachers(cfg, student, s_tok, [p.text for p in env.eval_prompts(3)]))
    if not dry:  # an endpoint teacher: reachable, serves what the run needs (a dry run contacts nothing)
        run = msgspec.structs.replace(run, **teacher_backend(cfg).preflight(cfg, t_tok))
    kept = check_prompt_lengths(cfg, env, s_tok, student)
    if kept is not None:
        run.skipped["too_long"] = len(kept.base) - len(kept)
        if not dry:
            run.dataset = str(_write_kept_rows(out, kept))
    if cfg.trainer.finetune == "full":  # each step writes a whole model; the newest two are kept (all with a gate)
        cont = cfg.orchestrator.continual
        _check_free_space(cfg, out, models.weights_bytes(student), "model", copies=3,
                          every_step=bool(cont.core_environments and cont.gate))
    else:
        _check_free_space(cfg, out, models.adapter_bytes(student, cfg.model.lora.rank, cfg.model.lora.target_modules))
    return run


# What `rl --dry_run` leaves out of :func:`preflight`, and why.
DRY_RUN_SKIPS = {
    "output_dir write test": "a dry run creates nothing; it checks the nearest existing folder is a writable directory",
    "checkpoint key creation": "a dry run creates nothing (a --resume dry run still verifies the checkpoint)",
    "GPU count": "placements are drafted on another machine than the one that runs them (README, --dry_run)",
    "teacher.endpoint probe": "it sends requests to another machine, perhaps a paid API",
    "models built on first use": "building the tiny pair (~2.5 min) or converting SmolLM2 (~1 min) is a run's work; "
                                 "once built (or given as paths) they are checked",
    "dataset.kept.jsonl": "the rows that fit are counted, not written",
}


def _check_output_dir(cfg: Config) -> Path:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} exists and is not a directory")
    if cfg.dry_run:  # nothing is created: the nearest existing ancestor must be a directory we may write in
        near = out.absolute()
        while not near.exists() and near != near.parent:
            near = near.parent
        if not near.is_dir() or not os.access(near, os.W_OK | os.X_OK):
            raise ConfigError(f"output_dir: {out} is not writable ({near} is not a writable directory)")
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / ".write_test", "ok")
        (out / ".write_test").unlink()
    except OSError as e:
        raise ConfigError(f"output_dir: {out} is not writable ({e.strerror or e})") from None
    return out


def _check_resume(cfg: Config) -> None:
    """``--resume``: a complete checkpoint exists, written with a compatible config (orchestrator/checkpoint.py)."""
    if not cfg.resume:
        return
    from orchestrator import checkpoint

    step, directory = checkpoint.require_latest(cfg.output_dir, cfg.ckpt.trust_unsigned)  # verified before it is read
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"resume: {directory}/meta.json is unreadable ({e})") from None
    checkpoint.check_compatible(meta["config"], cfg)
    if step >= cfg.max_steps:
        raise ConfigError(f"resume: the latest checkpoint ({directory}) is at step {step}, and max_steps is "
                          f"{cfg.max_steps}; raise max_steps to train further")


def _check_gpus(actors: list[ActorPlan]) -> None:
    """The ids of this node (node 0) against the GPUs torch sees here; other nodes' GPUs are not visible from
    here (an id too high there fails in its actor)."""
    wanted = [g for a in actors if a.node == 0 for g in a.devices]
    if wanted:
        import torch

        have = torch.cuda.device_count()
        if max(wanted) >= have:
            raise ConfigError(f"gpu ids {sorted(wanted)} requested but this machine has {have} CUDA device(s)")


def _check_nodes(cfg: Config, actors: list[ActorPlan]) -> None:
    """Ids on other nodes (``N:G``) need a cluster to join: a private Ray is this one node."""
    if cfg.ray_address:
        return
    for a in actors:
        if a.node:
            raise ConfigError(f"{a.key}.gpu_ids: {a.name} is on node {a.node}, but without ray_address rl starts a "
                              "private one-node Ray; join a cluster with --ray_address (slurm/multi_node.sbatch)")


def _check_free_space(cfg: Config, out: Path, per_step: int, what: str = "adapter", copies: int = 2,
                      every_step: bool = True) -> None:
    """Room for ``copies`` of what a step writes (the newest is written next to the previous ones) and a
    margin; a warning when the steps that are all kept (``every_step``) would not fit."""
    need, free = copies * per_step + DISK_MARGIN, free_bytes(out)
    if free < need:
        raise ConfigError(
            f"output_dir: {out} has {free / MB:.0f} MB free; a run needs at least {need / MB:.0f} MB "
            f"({copies} x the {per_step / MB:.1f} MB {what} + {DISK_MARGIN // MB} MB); free space or choose another "
            "output_dir"
        )
    all_steps = cfg.max_steps * per_step + DISK_MARGIN
    if every_step and free < all_steps:
        print(f"warning: output_dir: {out} has {free / MB:.0f} MB free, and keeping the {what} of every step takes "
              f"about {all_steps / MB:.0f} MB ({cfg.max_steps} x {per_step / MB:.1f} MB + margin); the run stops "
              "when the disk is full", file=sys.stderr)


def check_prompt_lengths(cfg: Config, env: Any, tokenizer: Any, student_dir: Path) -> DatasetView | None:
    """Render prompts as the orchestrator will (student and, with a context, teacher view) and check
    that the longest fits ``model.max_model_len`` with ``inference.max_tokens`` of completion.

    A missing chat template that the config needs is reported here too.  Returns ``None``, or for a
    dataset file with ``on_bad_row = "skip"`` and rows too long, the rows that fit."""
    from orchestrator.prompts import Renderer

    try:
        renderer = Renderer(tokenizer, cfg.model.chat_template, cfg.orchestrator.teacher_model)
    except ConfigError as e:
        raise ConfigError(f"{e}; student tokenizer: {student_dir}") from None
    mml, mt = cfg.model.max_model_len, cfg.inference.max_tokens
    budget = mml - mt

    def length(prompt: Any) -> tuple[int, str]:
        n = len(renderer.ids(prompt))
        if renderer.teacher_differs(prompt):
            nt = len(renderer.ids(prompt, teacher=True))
            if nt > n:
                return nt, " (with the teacher's context)"
        return n, ""

    def too_small(n: int, view: str, what: str) -> str:
        return (f"model.max_model_len: {mml} is too small for {what}: {n} prompt tokens{view} + "
                f"inference.max_tokens {mt} = {n + mt}")

    ds = cfg.orchestrator.dataset
    dataset = getattr(env, "dataset", None)
    kept, skipped = array("I"), []  # indices of the rows that fit: 4 bytes a row, the rows stay in the file
    if dataset is not None:
        for i, prompt in enumerate(dataset):  # one read of the file, row by row
            n, view = length(prompt)
            if n <= budget:
                kept.append(i)
            elif ds.on_bad_row == "skip":
                if len(skipped) < skips.SHOWN:
                    skipped.append(dataset.lines[i])
            else:
                raise ConfigError(
                    f"{ds.path}:{dataset.lines[i]}: {too_small(n, view, 'this prompt')}; raise model.max_model_len, "
                    "shorten the prompt, or set orchestrator.dataset.on_bad_row = \"skip\""
                )
        if not kept:
            raise ConfigError(f"{ds.path}: every prompt is longer than model.max_model_len = {mml} minus "
                              f"inference.max_tokens = {mt} allows")
        sample = list(env.eval_prompts(cfg.orchestrator.eval.num_prompts))
    else:
        sample = list(env.next_prompts(LENGTH_SAMPLE)) + list(env.eval_prompts(cfg.orchestrator.eval.num_prompts))
    if sample:
        n, view = max(length(p) for p in sample)
        if n > budget:
            raise ConfigError(
                f"{too_small(n, view, f'the longest of {len(sample)} prompts of {env.name!r}')}; "
                f"raise model.max_model_len to at least {n + mt} or lower inference.max_tokens"
            )
    if len(kept) == len(dataset or ()):
        return None
    why = f"prompts longer than model.max_model_len = {mml} minus inference.max_tokens = {mt} allows"
    print(skips.rows_line(ds.path, len(dataset) - len(kept), len(dataset), skipped, why), file=sys.stderr)
    return DatasetView(dataset, kept)


def _write_kept_rows(out: Path, kept: DatasetView) -> Path:
    """The rows that fit, copied line by line from the dataset file, as the file the orchestrator reads
    instead of the original (streamed: never the whole file in memory)."""
    path = out / "dataset.kept.jsonl"
    try:
        atomic_write_chunks(path, (kept.base.raw(i) for i in kept.index))
    except WriteError as e:
        raise ConfigError(f"output_dir: {e}") from None
    return path


def ray_init_kwargs(cfg: Config) -> dict[str, Any]:
    """Arguments of ``ray.init``: a private local Ray with no dashboard; its servers bind loopback.

    With ``ray_address`` set, join that running cluster instead (``slurm/multi_node.sbatch`` starts one)."""
    if cfg.ray_address:
        host = cfg.ray_address.rsplit(":", 1)[0]
        loopback = host == "localhost" or host.startswith("127.")
        if not loopback and cfg.ray_address != "auto" and os.environ.get(LOOPBACK_ENV_CLUSTER) == "0":
            raise ConfigError(f"ray_address: {cfg.ray_address} is on another host, but {LOOPBACK_ENV_CLUSTER}=0 keeps "
                              f"this Ray client on loopback; set {LOOPBACK_ENV_CLUSTER}=1 (slurm/multi_node.sbatch does)")
        return dict(address=cfg.ray_address, log_to_driver=False, logging_level="WARNING", configure_logging=True)
    return dict(
        address="local",  # a new private instance even when `ray start` left a cluster running on this machine
        num_cpus=os.cpu_count() or 2,
        include_dashboard=False,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
        logging_level="WARNING",
        configure_logging=True,
    )


def with_nodes(run: RunPlan) -> RunPlan:
    """After ``ray.init``: ``run`` with the Ray node id of each of the run's nodes (``RunPlan.nodes``) when the
    cluster has several alive nodes, so that :func:`node_affinity` pins every actor (node 0 too: a plain id
    means rl's node, not wherever Ray finds room); on one node, ``run`` as it was."""
    import ray

    nodes = node_order(ray.nodes(), ray.get_runtime_context().get_node_id())
    ids = node_ids(run.actors, nodes)
    if len(ids) < 2:
        return run
    print(f"placement: {len(ids)} Ray nodes: {node_list(nodes)}", file=sys.stderr)
    return msgspec.structs.replace(run, nodes=ids)


def place_on_nodes(cfg: Config, run: RunPlan) -> tuple[RunPlan, dict[str, Any]]:
    """After ``ray.init``: ``run`` with the node map (:func:`with_nodes`) and the orchestrator's ``.options()``
    that keep it on node 0. Only a joined cluster (``ray_address``) can span nodes: a private Ray is skipped
    without a call to Ray, so a single-node run starts exactly as before."""
    if not cfg.ray_address:
        return run, {}
    run = with_nodes(run)
    return run, node_affinity(run.actors[0], run.nodes)  # actors[0]: the orchestrator


LOOPBACK_ENV_CLUSTER = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Set before Ray is imported (unless the user set them); every actor inherits them.
LOOPBACK_ENV = {
    # Ray's "no cluster" mode (the variable's name dates from when that meant Windows/macOS): the node's
    # address is 127.0.0.1, so GCS, raylet and workers listen on loopback instead of on every interface.
    LOOPBACK_ENV_CLUSTER: "0",
    "GLOO_SOCKET_IFNAME": "lo",  # the trainer's gloo collectives (CPU)
    "NCCL_SOCKET_IFNAME": "lo",  # NCCL's bootstrap (GPU)
    "VLLM_HOST_IP": "127.0.0.1",  # vLLM's own process group
}


def loopback_env_defaults() -> None:
    """Keep every socket of the run on loopback. Best before anything imports ``ray``; when something did (a
    notebook, a test process), Ray's import-time reading of the cluster switch is brought in line with the
    environment, since otherwise this driver would look for a loopback cluster's GCS on the host's address and
    wait ten minutes for it."""
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = constants.env_bool(LOOPBACK_ENV_CLUSTER, True)  # as Ray read it at import


def launch(cfg: Config, progress: bool = True, run: RunPlan | None = None) -> dict[str, Any]:
    """Run ``cfg`` to the end; ``run`` is :func:`preflight`'s plan when the caller already made it."""
    run = run if run is not None else preflight(cfg)
    run_cfg = prepare_output(cfg, run)

    from shared.runtime import ray_env_defaults

    ray_env_defaults()
    loopback_env_defaults()  # `rl` already called it at its start; Session and tests come straight here
    import ray

    from orchestrator.orchestrator import Orchestrator

    ray.init(**ray_init_kwargs(cfg))
    try:
        run, pin = place_on_nodes(cfg, run)
        orch = ray.remote(Orchestrator).options(num_cpus=0, max_concurrency=2, **pin).remote(
            msgspec.json.encode(run_cfg), msgspec.json.encode(run)
        )
        return await_run(orch, orch.run.remote(), cfg, progress)
    finally:
        ray.shutdown()


def prepare_output(cfg: Config, run: RunPlan) -> Config:
    """Write ``config.toml``, start a fresh ``metrics.jsonl`` (a resumed run keeps its rows); the config
    the orchestrator runs (reading the kept rows of a dataset, when some were skipped for length)."""
    out = Path(cfg.output_dir)
    try:
        atomic_write_text(out / "config.toml", redact_toml(to_toml(cfg)))
    except WriteError as e:
        raise ConfigError(f"output_dir: {e}") from None
    metrics_path = out / "metrics.jsonl"
    if metrics_path.exists() and not cfg.resume:
        metrics_path.unlink()  # a fresh run (a resumed one keeps the rows up to its checkpoint)
    if not run.dataset:
        return cfg
    ds = msgspec.structs.replace(cfg.orchestrator.dataset, path=run.dataset)
    return msgspec.structs.replace(cfg, orchestrator=msgspec.structs.replace(cfg.orchestrator, dataset=ds))


def await_run(orch: Any, ref: Any, cfg: Config, progress: bool) -> dict[str, Any]:
    """Wait for the orchestrator's run ``ref`` (a progress bar; SIGTERM/SIGINT ask it to checkpoint and
    stop), turn a failure into RoleFailure / ConfigError / TrainingStopped, write the report; the summary."""
    import ray

    out = Path(cfg.output_dir)
    bar = _Progress(cfg.max_steps, out / "metrics.jsonl") if progress else None
    try:  # the bar is closed (its line ended) before any error line is printed
        with _StopOnSignal(cfg.ckpt.stop_timeout) as stop:
            while True:
                done, _ = ray.wait([ref], timeout=0.5)
                if bar:
                    bar.update()
                if done:
                    break
                stop.check(orch)
        summary = orchestrator_result(ref)
        summary["signal"] = stop.signum
    finally:
        if bar:
            bar.close()
    from orchestrator.report import write_report

    summary["report"] = str(write_report(out, summary, redact_toml(to_toml(cfg))))
    return summary


def orchestrator_result(ref: Any) -> Any:
    """``ray.get`` of an orchestrator call; a failure becomes the RoleFailure, ConfigError or TrainingStopped
    it raised (anything else: a RoleFailure of the orchestrator with the error's first line)."""
    import ray

    from orchestrator.failures import RoleFailure
    from shared.runtime import first_line

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if getattr(e, "cause", None) is not None else e
        if isinstance(cause, (RoleFailure, ConfigError, TrainingStopped)):
            raise cause from None
        raise RoleFailure("orchestrator", first_line(e)) from None
    except Exception as e:  # actor death, or an error Ray could not carry back intact
        raise RoleFailure("orchestrator", first_line(e)) from None


class Interrupted(RuntimeError):
    """A second SIGTERM/SIGINT, or the first one's checkpoint took longer than ``ckpt.stop_timeout``."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class _StopOnSignal:
    """While a run is in progress, SIGTERM/SIGINT ask the orchestrator to finish its step, write a checkpoint
    and return (``request_stop``); during start-up (no step has run, so there is nothing to checkpoint), a second
    signal, or no return within ``timeout`` seconds, the run stops at once (Ray is shut down with the launcher:
    no actor is left behind).

    The handler itself never raises: a signal can arrive inside one of Ray's C calls (``ray.wait``), where an
    exception from a Python handler surfaces as a ``SystemError`` traceback. It records the signal, and
    :meth:`check`, called from the waiting loop every half second, acts on it."""

    def __init__(self, timeout: float):
        import signal

        self.timeout = timeout
        self.signals = (signal.SIGTERM, signal.SIGINT)
        self.signum: int | None = None
        self.since = 0.0
        self.again = False  # a second signal arrived
        self.asked: Any = None  # the orchestrator's answer to request_stop: whether a checkpoint will follow
        self.previous: dict = {}

    def __enter__(self) -> "_StopOnSignal":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
            for sig in self.signals:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        import signal
        import time

        if self.signum is not None:
            self.again = True
            return
        self.signum, self.since = signum, time.monotonic()
        try:
            print(f"\n{signal.Signals(signum).name}: finishing the current step and writing a checkpoint "
                  "(signal again to stop at once)", file=sys.stderr)
        except OSError:  # the terminal closed (SIGHUP, passed on as SIGTERM) or `| tee` died: stop all the same
            pass

    def check(self, orch: Any) -> None:
        import signal
        import time

        import ray

        if self.signum is None:
            return
        name = signal.Signals(self.signum).name
        if self.again:
            raise Interrupted(self.signum, f"stopped by a second {name} without a checkpoint")
        if self.asked is None:
            self.asked = orch.request_stop.remote()
            return
        if isinstance(self.asked, ray.ObjectRef) and ray.wait([self.asked], timeout=0)[0]:
            try:
                self.asked = ray.get(self.asked)
            except ray.exceptions.RayError:  # the orchestrator is gone; its run's result says why
                self.asked = True
            if self.asked is False:
                raise Interrupted(self.signum, f"{name} during start-up: stopped (no step had run, so no checkpoint)")
        if time.monotonic() - self.since > self.timeout:
            raise Interrupted(self.signum, f"{name}: no checkpoint within "
                                           f"ckpt.stop_timeout = {self.timeout:g}s; stopped without one")


RESTART_MARK = "; restarting every role from "  # in the orchestrator's line for each restart (orchestrator.py)


class _Progress:
    """A console bar fed from metrics.jsonl: step, teacher_kl, step time; and one line for each restart of the
    roles (``ckpt.on_failure = "restart"``), copied from the orchestrator's log, whose output goes there."""

    def __init__(self, total: int, path: Path):
        from tqdm import tqdm

        self.path = path
        self.bar = tqdm(total=total, desc="starting roles", unit="step", file=sys.stderr, dynamic_ncols=True)
        self.seen = 0
        self.restarts = 0

    def update(self) -> None:
        rows = read_metrics(self.path) if self.path.exists() else []
        restarts = sum(1 for r in rows if "restarted_from" in r)
        if restarts > self.restarts:
            for line in restart_lines(self.path.parent / "logs" / "orchestrator.log")[self.restarts:restarts]:
                self.bar.write(line, file=sys.stderr)
            self.restarts = restarts
        rows = [r for r in rows if "teacher_kl" in r]
        if len(rows) < self.seen:  # a restart cut the rows after its checkpoint: they run again
            self.bar.n = self.seen = len(rows)
            self.bar.refresh()
        if len(rows) > self.seen:
            last = rows[-1]
            self.bar.set_description("training")
            kl = last.get("teacher_kl")
            self.bar.set_postfix(teacher_kl="-" if kl is None else f"{kl:.3f}", step_s=f"{last['time/step']:.1f}")
            self.bar.update(len(rows) - self.seen)
            self.seen = len(rows)

    def close(self) -> None:
        self.bar.close()


def restart_lines(log: Path) -> list[str]:
    """The orchestrator's line for each restart so far (``step N: <role> failed: ...; restarting ...``)."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [ln for ln in text.splitlines() if RESTART_MARK in ln]
