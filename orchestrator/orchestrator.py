"""The orchestrator: the loop, and the only role that decides what happens next.

Each step: the pipeline hands over the step's batch, sampled by the workflow's sampler and scored by the teacher
(``pipeline.py``; with ``orchestrator.max_async_level`` k > 0 sampled up to k steps ahead) -> the workflow turns
it into training samples (``workflows/``) -> the trainer ranks take one optimizer step and write
``broadcast/step_N`` -> the student engines serve it (``roles.py``).  Evaluation runs at the start, every
``eval.interval`` steps and at the end, with the continual suite and gate when ``[orchestrator.continual]`` is on
(``continual.py``).  Every ``ckpt.interval`` steps, and on SIGTERM/SIGINT, all roles' state is checkpointed
(``checkpoint.py``); ``resume`` continues from it, and ``ckpt.on_failure = "restart"`` does the same in-process
after a role fails.

The loop never asks which workflow, teacher backend or prompt source it has: those are plug-ins behind the
interfaces of ``workflows/base.py``, ``roles.TeacherBackend`` and ``continual.Off``.  A session
(``orchestrator/api.py``) starts the roles once (``open_session``) and runs several configs on them
(``run_in_session``), each from a fresh LoRA adapter (``_reset_roles``).
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from orchestrator import checkpoint, continual, environments, skips, workflows
from orchestrator.pipeline import Pipeline, split_stale
from orchestrator.prompts import Renderer
from orchestrator.failures import RoleFailure
from orchestrator.roles import Roles, rollouts_of, scores_of
from shared.config import Config, kl_in_advantage, topk_in_loss
from shared.fsutil import atomic_write_text
from shared.metrics import MetricsLogger
from shared.placement import RunPlan
from shared.runtime import redirect_output
from shared.wire import SUMMED_METRICS, StepResult, decode

__all__ = ["Orchestrator"]


def loss_rows(lc: Any, tm: dict[str, float]) -> dict[str, float]:
    """The optional loss terms' entries of a step's row, from the trainer ranks' summed metrics ``tm``."""
    n = max(tm["tokens"], 1)
    row: dict[str, float] = {}
    if lc.ref_kl_coef:
        row.update({"loss/ref_kl": tm["loss/ref_kl"], "ref_kl/mean": tm["ref_kl_sum"] / n})
    if lc.lockin_coef:
        row["loss/lockin"] = tm["loss/lockin"]
    if lc.corrective_coef:
        row["loss/corrective"] = tm["loss/corrective"]
    if lc.entropy_coef:
        row.update({"loss/entropy": tm["loss/entropy"], "entropy/mean": tm["entropy_sum"] / n})
    if lc.teacher_topk and lc.topk_coef:  # the top-k estimator's KL (its reverse/forward mixture) per policy token
        row.update({"loss/topk": tm.get("loss/topk", 0.0), "teacher_kl/topk": tm.get("topk_kl_sum", 0.0) / n})
    return row


class Orchestrator:
    """Ray actor body; ``run`` returns a summary dict.  The actor runs two threads so that the launcher's
    ``request_stop`` (on SIGTERM/SIGINT) reaches it while ``run`` is busy."""

    def __init__(self, cfg_json: bytes, plan_json: bytes):
        self.roles: Roles | None = None
        self._begin(msgspec.json.decode(cfg_json, type=Config), plan_json)
        redirect_output(str(self.out / "logs" / "orchestrator.log"))
        # Adapters are served under versions unique across a session's runs (vLLM caches a LoRA by its id):
        # step N of the current run is version adapter_base + N.
        self.adapter_base = 0
        self.next_version = 1

    def _begin(self, cfg: Config, plan_json: bytes) -> None:
        """The state of one run (a session's next run starts from here again, with the same roles)."""
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.plan = msgspec.json.decode(plan_json, type=RunPlan)  # launcher.preflight's, planned once
        self.roles = Roles(cfg, self.out, self.plan, self.roles)
        self.role_seconds: dict[str, float] = {"inference": 0.0, "teacher": 0.0, "trainer": 0.0}
        self.score_failed = 0
        self._stop = threading.Event()
        self.step = 0  # the step in progress
        self.persisting: list = []  # trainer rank 0 writing the last served adapter to disk (memory transfer)

    # -- roles ------------------------------------------------------------------------------------------
    def _start_roles(self) -> dict[str, float]:
        return self.roles.start()

    def _serve_refs(self, adapter: str, step: int, trained: bool = False) -> list:
        """Ask every student engine to serve ``adapter`` (this run's step ``step``); the refs of the calls.
        ``trained``: the step just trained, whose adapter trainer rank 0 may still hold in memory."""
        version = self.adapter_base + step
        self.next_version = max(self.next_version, version + 1)
        return self.roles.weight_update_refs(adapter, version, step if trained else None)

    def _persisted(self) -> None:
        """Wait until the last trained adapter is on disk (``memory`` transfer: it is written after the engines
        have it, while the next batch is sampled, so this rarely waits)."""
        if self.persisting:
            self.pipe.wait(self.persisting)
            self.persisting = []

    def open_session(self) -> dict[str, float]:
        """Start the roles for the runs of a session; each role's start-up seconds."""
        self.startup = self._start_roles()
        return self.startup

    def run_in_session(self, cfg_json: bytes, plan_json: bytes) -> dict[str, Any]:
        """The session's next run: ``run`` with the roles already started (the caller checked that the
        config differs from the session's only in per-run keys)."""
        self._begin(msgspec.json.decode(cfg_json, type=Config), plan_json)
        return self.run(fresh_roles=False)

    def _reset_roles(self) -> dict[str, float]:
        """Before a session's run: the trainer ranks start a new LoRA adapter and optimizer from this run's
        seed and write ``broadcast/step_0`` (B = 0, so it computes exactly the base model), which the engines
        then serve under a new version."""
        t0 = time.perf_counter()
        adapter = self.roles.trainer_call("reset", self.roles.trainer_spec(), str(self.out))[0]
        self.adapter_base = self.next_version
        self.roles.call("inference", "load_adapter", self._serve_refs(adapter, 0))
        return {"time/reset": time.perf_counter() - t0}

    # -- synchronous calls (evaluation, and what workflows ask of the teacher) ------------------------
    def _sample(self, role: str, ids: list[list[int]], first_index: int, n: int, temperature: float,
                max_tokens: int | None = None) -> list:
        refs = self.roles.sample_refs(role, ids, first_index, n, temperature, max_tokens)
        return rollouts_of(self.roles.call(role, f"{role} generate", refs), self.adapter_base)[0]

    def _teacher_generate(self, ids: list[list[int]], max_tokens: int, temperature: float) -> list:
        """The teacher's answers (one per prompt, in order): judge replies, reference answers, questions."""
        self._teacher_calls += 1
        return self._sample("teacher", ids, self._teacher_calls * 1_000_000, 1, temperature, max_tokens)

    def _score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float] | None]:
        """Teacher log-probs of each completion; None where an external teacher failed to score it."""
        refs, parts = self.roles.score_refs(prompt_ids, completion_ids)
        return self.roles.teacher_logprobs(scores_of(parts, self.roles.call("teacher", "score", refs),
                                                     len(completion_ids)), completion_ids)

    def _evaluate(self, env, role: str = "inference", teacher_view: bool = False,
                  extra: dict[str, float] | None = None) -> float:
        """Mean score of one completion per held-out prompt (``eval.temperature``; 0 = greedy); ``extra``
        receives the environment's own further scores (``env.eval_metrics``) as ``eval/<env>/<key>``."""
        return self._eval_collect(env, role, *self._eval_submit(env, role, teacher_view), extra=extra)

    def _eval_submit(self, env, role: str, teacher_view: bool) -> tuple[list, Any]:
        """The held-out prompts, and the refs of ``role``'s samples of them (:meth:`_evaluate`'s first half)."""
        prompts = env.eval_prompts(self.cfg.orchestrator.eval.num_prompts)
        ids = [self.renderer.ids(p, teacher=teacher_view) for p in prompts]
        return prompts, self.roles.sample_refs(role, ids, 0, 1, self.cfg.orchestrator.eval.temperature)

    def _eval_collect(self, env, role: str, prompts: list, refs: Any, extra: dict[str, float] | None = None) -> float:
        rollouts = rollouts_of(self.roles.call(role, f"{role} generate", refs), self.adapter_base)[0]
        scored = [(prompts[r.prompt_index], r.text) for r in rollouts]
        if extra is not None:
            extra.update({f"eval/{env.name}/{k}": v for k, v in env.eval_metrics(scored).items()})
        return statistics.fmean(env.score(p, text) for p, text in scored)

    # -- the plug-ins ----------------------------------------------------------------------------------
    def _setup(self, env) -> None:
        """The workflow, the continual part (or its no-op), the prompt source and whoever scores its prompts."""
        cfg = self.cfg
        self._teacher_calls = 0
        ctx = workflows.Context(
            cfg=cfg, render=lambda p, teacher: self.renderer.ids(p, teacher=teacher), generate=self._teacher_generate,
            sample=lambda ids, first, n, temperature: self._sample("teacher", ids, first, n, temperature),
            score=self._score, env_score=lambda p, text: self.scorer.score(p, text),
            student_dir=self.plan.student, teacher_dir=self.plan.teacher)
        self.workflow = workflows.make(ctx)
        self.continual = continual.make(cfg, self.out)
        self.source = self.continual.source(self.workflow.prompt_source(env), env)
        self.scorer = self.continual.scorer(env)
        # The teacher scores the student's rollouts when the advantage uses its log-probs, or when scoring is
        # cheap enough to do for the teacher_kl metric alone (not over a paid endpoint).
        self.scores = self.workflow.scores_rollouts and (kl_in_advantage(cfg) or topk_in_loss(cfg)
                                                          or self.roles.teacher.scores_for_metrics)

    def _pipeline(self) -> Pipeline:
        return Pipeline(self.cfg, self.roles, self.source, lambda p, teacher: self.renderer.ids(p, teacher=teacher),
                        self.renderer.has_context, self.workflow.sampler, self.scores, self.adapter_base)

    # -- one step ---------------------------------------------------------------------------------------
    def _train_step(self, env, step: int) -> dict[str, float]:
        cfg, oc = self.cfg, self.cfg.orchestrator
        t0 = time.perf_counter()
        batch = self.pipe.next_batch(step)  # k = 0: its sampling starts now; k > 0: it was queued k steps ago
        rollouts, teacher_lp = batch.rollouts, batch.teacher_lp
        t1 = max(t0, batch.t_sampled)
        dropped, stale = split_stale(step, batch.adapter_steps, oc.max_async_level)
        n_dropped = sum(1 for r in rollouts if r.prompt_index in dropped)
        if n_dropped:  # sampled by an adapter older than max_async_level allows: never trained on
            kept = [i for i, r in enumerate(rollouts) if r.prompt_index not in dropped]
            rollouts, teacher_lp = [rollouts[i] for i in kept], [teacher_lp[i] for i in kept]
        self.score_failed = sum(1 for lp in teacher_lp if lp is None)
        if self.score_failed:  # the endpoint could not score them: dropped (and counted), never trained on
            scored = [i for i, lp in enumerate(teacher_lp) if lp is not None]
            rollouts, teacher_lp = [rollouts[i] for i in scored], [teacher_lp[i] for i in scored]
        t2 = max(t1, batch.t_scored)

        built = self.workflow.samples(batch, rollouts, teacher_lp)
        t2 += built.teacher_seconds  # judge verdicts, reference and corrective answers are teacher time
        samples, lens = built.samples, built.lens
        total_tokens = sum(lens)  # policy tokens: the normaliser of every loss term
        if len(samples) < len(self.roles.actors["trainer"]):  # every rank needs a sample for the collectives
            return {"step": step, "skipped_step": 1.0, "rollouts/empty": float(batch.empty),
                    "teacher_kl": float("nan"), **built.reward_metrics, "async/dropped_rollouts": float(n_dropped),
                    "time/step": time.perf_counter() - t0}
        self.roles.colocation.before_train()  # engines beside the trainer on its GPUs sleep while it steps
        refs = self.roles.train_refs(step, samples, total_tokens, cfg.trainer.micro_batch_size,
                                     cfg.trainer.micro_batch_tokens)
        results = [decode(d, StepResult) for d in self.pipe.wait(self.pipe.submit("trainer", refs))]
        self.roles.colocation.after_train()  # ... and wake before they load the new adapter
        t3 = time.perf_counter()
        self.pipe.wait(self.pipe.submit("weight_update", self._serve_refs(results[0].adapter_path, step, True)))
        t4 = time.perf_counter()
        self._persisted()  # the previous step's file (long written)
        self.persisting = self.pipe.submit("persist", self.roles.persist_refs(step))  # this one's, in the background

        tm = {k: sum(r.metrics.get(k, 0.0) for r in results) for k in SUMMED_METRICS}
        times = self._role_times(t0, t1, t2, t3, t4, built.teacher_seconds)
        n = max(tm["tokens"], 1)
        pipeline_row = {**self.pipe.timeline.metrics(t0, t4, ("inference", "teacher", "trainer")),
                        "async/staleness": statistics.fmean(stale) if stale else 0.0,
                        "async/staleness_max": float(max(stale, default=0)),
                        "async/dropped_rollouts": float(n_dropped)}
        self.pipe.timeline.forget(t4)
        return {
            "step": step, **built.metrics, "loss/policy": tm["loss/policy"], **loss_rows(cfg.trainer.loss, tm),
            **self.workflow.train_metrics(tm), **self.continual.metrics(batch.prompts),
            "seq_len/mean": statistics.fmean(lens) if lens else 0.0,
            "grad_norm": results[0].metrics["grad_norm"],
            "train/lr": results[0].metrics.get("lr", 0.0),
            "skipped_step": results[0].metrics["skipped_step"],
            "zero_grad_step": results[0].metrics.get("zero_grad_step", 0.0),
            "masked/low_frac": tm["masked_low"] / n, "masked/high_frac": tm["masked_high"] / n,
            "masked/low": tm["masked_low"], "masked/high": tm["masked_high"],
            "ratio/mean": tm["ratio_sum"] / n,
            "rollouts/empty": float(batch.empty),
            "tokens/step": float(total_tokens),
            "time/step": t4 - t0,
            **{f"time/{role}": seconds for role, seconds in times.items()},
            "time/weight_update": t4 - t3,
            # inside the roles' calls (the rest of time/<role> is Ray, serialization and waiting):
            **{f"time/{role}_engine": s for role, s in batch.engine_seconds.items()},  # vLLM's own time
            "time/trainer_compute": max(r.metrics.get("time/trainer_compute", 0.0) for r in results),
            "time/trainer_update": max(r.metrics.get("time/trainer_update", 0.0) for r in results),
            "time/adapter_save": results[0].metrics.get("time/adapter_save", 0.0),  # rank 0 writes broadcast/step_N
            **pipeline_row,
        }

    def _role_times(self, t0: float, t1: float, t2: float, t3: float, t4: float, teacher_extra: float) -> dict:
        """Each role's busy seconds in the step: with max_async_level > 0 measured on the timeline (the roles
        overlap); otherwise the step's consecutive segments (sampling, scoring, training)."""
        if self.cfg.orchestrator.max_async_level:
            busy = self.pipe.timeline.busy(t0, t4)
            times = {"inference": busy.get("inference", 0.0), "teacher": busy.get("teacher", 0.0) + teacher_extra,
                     "trainer": busy.get("trainer", 0.0)}
        else:
            times = {"inference": 0.0, "teacher": t2 - t1, "trainer": t3 - t2}
            times[self.workflow.sampler] += t1 - t0
        for role, seconds in times.items():
            self.role_seconds[role] += seconds
        return times

    def _step_row(self, env, step: int) -> dict[str, float]:
        """The step's row with the teacher backend's entries (an endpoint's request counts)."""
        row = self._train_step(env, step)
        row.update(self.roles.teacher.step_metrics(self.roles.actors.get("teacher", []), self.score_failed))
        row.update({**self.pipe.heartbeat(), **self.pipe.counts(), **self.roles.vocab.metrics()})
        if not self.scores:  # nothing was scored: the sampler's log-probs stood in for the teacher's
            row.update({"teacher_kl": float("nan"), "teacher_kl/seq": float("nan")})
        return row

    # -- evaluation and the continual gate ---------------------------------------------------------------
    def _eval_row(self, env, step: int, gate: bool = True) -> tuple[dict[str, float], bool]:
        """The evaluation row, with the continual suite's core scores and gate (``passed`` is False when a core
        metric regressed beyond max_regression)."""
        t0 = time.perf_counter()
        extra: dict[str, float] = {}
        row = {"step": step, f"eval/{env.name}/avg": self._evaluate(env, extra=extra), **extra}
        core, passed = self.continual.evaluate(self._evaluate, step, gate)
        return {**row, **core, "time/eval": time.perf_counter() - t0}, passed

    def _restore(self, step: int) -> dict[str, float]:
        """The gate failed at ``step``: the engines serve the last passing adapter again, which becomes the final one."""
        self._persisted()  # step N's adapter is on disk before the later ones are set aside
        path, last = self.continual.restore(step)
        self.roles.call("inference", "load_adapter", self._serve_refs(str(path), last))
        return {"continual/restored_step": float(last)}

    def _first_eval(self, env) -> dict[str, float]:
        """The evaluation before training (and the baselines, with ``orchestrator.eval_baseline``)."""
        key, t0 = f"eval/{env.name}/avg", time.perf_counter()
        if self.continual.keeps_step_0:  # broadcast/step_0: the untouched student, the gate's first fallback
            self.roles.trainer_call("save_adapter", 0)
        # the teacher's baseline samples on its own engine while the student's are sampled on theirs
        pending = self._eval_submit(env, "teacher", True) if self.cfg.orchestrator.eval_baseline else None
        first_eval, _ = self._eval_row(env, 0)
        if pending is not None:
            def teacher_score(e) -> float:
                return self._evaluate(e, role="teacher", teacher_view=True)
            teacher = self._eval_collect(env, "teacher", *pending)
            first_eval.update({
                f"eval/{env.name}/baseline_student/avg": first_eval[key],
                f"eval/{env.name}/baseline_teacher/avg": teacher,
                f"eval/{env.name}/baseline_diff": teacher - first_eval[key],
                **self.continual.baseline(teacher_score),  # the teacher on the core behaviours, if any
            })
        first_eval["time/eval"] = time.perf_counter() - t0  # the baselines' too
        return first_eval

    def request_stop(self) -> bool:
        """Called by the launcher on SIGTERM/SIGINT (from another thread of this actor): finish the step in
        progress, write a checkpoint and return. False while no step has started (start-up, the first
        evaluation): there is nothing to checkpoint, and the launcher stops the run at once."""
        self._stop.set()
        return self.step > 0

    # -- checkpoints (orchestrator/checkpoint.py) -------------------------------------------------------
    def _save_checkpoint(self, step: int, history: dict[str, Any]) -> float:
        """Trainer shards + the orchestrator's state, made complete atomically; the batches queued ahead are
        waited for (at most ``orchestrator.drain_timeout``) so that a resumed run trains on the same rollouts."""
        t0 = time.perf_counter()
        buffer, stream = self.pipe.settle(self.cfg.orchestrator.drain_timeout)
        tmp = checkpoint.begin(self.out, step)
        trainer_seconds = max(self.roles.trainer_call("save_checkpoint", str(tmp)))
        checkpoint.write_state(tmp, {
            "step": step, "stream": stream, "teacher_calls": self._teacher_calls,
            "workflow": self.workflow.state(), "continual": self.continual.state(),
            "buffer": buffer, "history": history, "role_seconds": dict(self.role_seconds),
        })
        atomic_write_text(tmp / "meta.json", json.dumps({"step": step, "config": msgspec.to_builtins(self.cfg),
                                                         "trainer_seconds": trainer_seconds}, indent=1) + "\n")
        checkpoint.commit(self.out, step, tmp, self.cfg.ckpt.keep)
        return time.perf_counter() - t0

    def _load_checkpoint(self, step: int, directory: Path) -> dict[str, Any]:
        """Restore every role from ``directory``: trainer shards (the ranks rewrite broadcast/step_N from
        them), the engines serve that adapter, the orchestrator's stream, buffer and counters."""
        state = checkpoint.read_state(directory)
        self.roles.trainer_call("load_checkpoint", str(directory), step)
        self.roles.call("inference", "load_adapter", self._serve_refs(str(self.out / "broadcast" / f"step_{step}"), step))
        checkpoint.restore(self.source, state["stream"])
        self._teacher_calls = state["teacher_calls"]
        self.workflow.restore(state["workflow"])
        self.continual.restore_state(state["continual"])
        self.role_seconds.update(state["role_seconds"])
        self.pipe.load(state["buffer"], step)
        return state["history"]

    def _restart(self, step: int, directory: Path, logger: MetricsLogger, attempt: int) -> dict[str, Any]:
        """``ckpt.on_failure = "restart"``: stop every role (a trainer rank whose peer died hangs in a collective;
        the engines serve a newer adapter), start them again and rewind the run to the checkpoint of ``step``:
        metrics.jsonl loses the rows after it, which the next steps write again."""
        self.pipe.drain(0.0)
        self.persisting = []
        self.roles.kill()
        t0 = time.perf_counter()
        startup = self._start_roles()
        self.pipe = self._pipeline()
        history = self._load_checkpoint(step, directory)
        checkpoint.truncate_metrics(logger.path, step)
        logger.reopen()
        logger.log({"step": step, "restarted_from": float(step), "restarts": float(attempt), **startup,
                    "time/restart": time.perf_counter() - t0})
        return history

    # -- the run ------------------------------------------------------------------------------------------
    def run(self, fresh_roles: bool = True) -> dict[str, Any]:
        """Train ``self.cfg`` to the end; the roles are started here, or (a session's run) reset."""
        from transformers import AutoTokenizer

        from shared.metrics import BadSteps

        cfg = self.cfg
        self.t_run = time.perf_counter()
        env = environments.make(cfg)
        self.tok = AutoTokenizer.from_pretrained(self.plan.student)
        self.renderer = Renderer(self.tok, cfg.model.chat_template, cfg.orchestrator.teacher_model)
        self._setup(env)
        resume = checkpoint.require_latest(self.out, cfg.ckpt.trust_unsigned) if cfg.resume else None
        if resume is not None:  # rows of steps after the checkpoint were written by the run that died
            checkpoint.truncate_metrics(self.out / "metrics.jsonl", resume[0])
        checkpoint.remove_partial(self.out)
        logger = MetricsLogger(str(self.out), msgspec.to_builtins(cfg.wandb), msgspec.to_builtins(cfg),
                               experiment=self.out.name)
        self.bad_steps = BadSteps(cfg.trainer.max_bad_steps)
        key = f"eval/{env.name}/avg"
        restarts: list[dict[str, Any]] = []
        self.pipe, self.persisting = None, []
        try:
            startup = self._start_roles() if fresh_roles else self._reset_roles()
            self.pipe = self._pipeline()
            if resume is not None:
                t0 = time.perf_counter()
                history = self._load_checkpoint(*resume)
                self.t_run -= history["wall_seconds"]
                logger.log({"step": resume[0], "resumed_from": float(resume[0]), **startup,
                            "time/resume": time.perf_counter() - t0})
            else:
                logger.log({"step": 0, **startup, **skips.data_metrics(self.plan.skipped)})  # rows skipped at start
                history = {"first_eval": self._first_eval(env)}
                logger.log(history["first_eval"])
            start = resume[0] if resume is not None else 0
            while True:
                self.evals = {"first": history["first_eval"], "last": history.get("last_eval", history["first_eval"])}
                if "bad_steps" in history:
                    self.bad_steps.in_a_row, self.bad_steps.last_good = history["bad_steps"]
                try:
                    step, stopped = self._steps(env, logger, start)
                    self._persisted()  # the last adapter on disk before the run returns it
                    break
                except RoleFailure as failure:  # on_failure = "restart": every role again, from the last checkpoint
                    found = checkpoint.latest(self.out)
                    if cfg.ckpt.on_failure != "restart" or len(restarts) >= cfg.ckpt.max_restarts or found is None:
                        raise
                    restarts.append({"step": self.step, "role": failure.role, "cause": failure.cause})
                    print(f"step {self.step}: {failure}; restarting every role from {found[1]} "
                          f"(restart {len(restarts)} of {cfg.ckpt.max_restarts})", flush=True)
                    start = found[0]
                    history = self._restart(*found, logger, len(restarts))
            if not stopped:
                self.continual.finish(self.out / "broadcast" / f"step_{step}")
            return {
                "steps": step,
                "wall_seconds": time.perf_counter() - self.t_run,
                "eval_start": self.evals["first"][key],
                "eval_end": self.evals["last"][key],
                "role_seconds": dict(self.role_seconds),
                "bad_rows": env.bad_rows,
                "stopped": stopped,
                "resumed_from": resume[0] if resume is not None else 0,
                "restarts": restarts,
                **self.continual.summary(),
            }
        except BaseException:
            if self.pipe is not None:
                self.pipe.drain(0.0)  # a failure: whatever is still in flight is of no use
            raise
        finally:
            if self.pipe is not None:  # the normal end has nothing in flight; never waits longer
                self.pipe.drain(cfg.orchestrator.drain_timeout)
            logger.close()

    def _steps(self, env, logger: MetricsLogger, start: int) -> tuple[int, bool]:
        """Steps ``start + 1 .. max_steps`` with their evaluations and checkpoints; ``(last step, stopped)``:
        stopped early by SIGTERM/SIGINT (after a checkpoint), or by a failed continual gate."""
        cfg = self.cfg
        step = start
        for step in range(start + 1, cfg.max_steps + 1):
            self.step = step
            row = self._step_row(env, step)
            logger.log(row)
            self.bad_steps.update(row)  # TrainingStopped after trainer.max_bad_steps skipped steps in a row
            interval = cfg.orchestrator.eval.interval
            if step == cfg.max_steps or (interval and step % interval == 0):
                self.evals["last"], passed = self._eval_row(env, step)
                logger.log(self.evals["last"])
                if not passed:  # a core metric regressed beyond max_regression: restore and stop
                    restored = self._restore(step)  # first: the evaluation below is of the restored adapter
                    self.evals["last"] = {**self._eval_row(env, step, gate=False)[0], **restored}
                    logger.log(self.evals["last"])
                    return step, False
            stopped = self._stop.is_set() and step < cfg.max_steps  # the last step ends the run anyway
            if stopped or (cfg.ckpt.interval and step % cfg.ckpt.interval == 0):
                history = {"first_eval": self.evals["first"], "last_eval": self.evals["last"],
                           "bad_steps": [self.bad_steps.in_a_row, self.bad_steps.last_good],
                           "wall_seconds": time.perf_counter() - self.t_run}
                logger.log({"step": step, "time/checkpoint": self._save_checkpoint(step, history)})
            if stopped:
                return step, True
        return step, False
