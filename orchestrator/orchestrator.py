"""The orchestrator: the only role that decides what happens next.

Each step: prompts → student engines (sample ``group_size`` completions with log-probs) → teacher
engines (log-probs of the same tokens) → per-token advantages → trainer ranks (one optimizer step,
adapter written to ``broadcast/step_N``) → student engines load that adapter.  Evaluation runs at the
start (baseline), every ``eval.interval`` steps and at the end.

With ``orchestrator.max_async_level`` k > 0 the batches of the next k steps are sampled and scored while the
trainer works (Ray futures; :meth:`Orchestrator._fill`, ``_advance``, ``_await``; staleness and busy-time
bookkeeping in ``pipeline.py``).  Every ``ckpt.interval`` steps, and on SIGTERM/SIGINT, all roles' state is
checkpointed (``checkpoint.py``); ``resume`` continues from it, and ``ckpt.on_failure = "restart"`` does the
same in-process after a role fails.

``orchestrator.sampler = "teacher"`` is off-policy distillation (SFT): the teacher samples the completions
and the trainer fits them by NLL (:meth:`Orchestrator._sft_samples`); the student samples nothing.  A session
(``orchestrator/api.py``) starts the roles once (``open_session``) and runs several configs on them
(``run_in_session``), each from a fresh LoRA adapter (``_reset_roles``).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import ray
import torch

from orchestrator import checkpoint, continual, environments, workflows
from orchestrator.pipeline import Batch, Timeline, split_stale
from orchestrator.prompts import Renderer
from shared.config import Config
from shared.fsutil import atomic_write_text
from shared.metrics import MetricsLogger
from shared.placement import ActorPlan, node_affinity, plan
from shared.runtime import first_line, redirect_output
from shared.wire import RolloutBatch, ScoreRequest, ScoreResult, StepResult, TrainBatch, TrainSample, decode, encode
from shared.wire import SUMMED_METRICS
from trainer.loss import combined_advantages, group_advantages, sanitize_logprobs, subtract_baseline


class StepSamples(NamedTuple):
    """What a step trains on (``samples``) and what its row reports about them."""

    samples: list[TrainSample]
    lens: list[int]  # completion tokens of each sampled rollout; their sum normalises every loss term
    rewards: list[float]
    reward_metrics: dict[str, float]
    groups: list[int]  # each rollout's prompt index (the task baseline's group)
    kls: list[torch.Tensor]  # per-token logp_S - logp_T of each rollout
    advs: list[torch.Tensor]
    clipped: int  # teacher log-probs clipped to logprob_floor
    lockin: list[float]
    t_reward: float  # seconds spent on rewards (teacher time for a judge or comparator)


class RoleFailure(RuntimeError):
    """A role's actor died or raised; ``role`` names it, the message is the cause's first line."""

    def __init__(self, role: str, cause: str):
        super().__init__(role, cause)  # args stay (role, cause) so the error survives Ray's pickling
        self.role = role
        self.cause = cause

    def __str__(self) -> str:
        return f"{self.role} failed: {self.cause}"


def _get(role: str, refs: Any) -> Any:
    try:
        return ray.get(refs)
    except ray.exceptions.RayError as e:  # the actor died (killed, out of memory) or its method raised
        raise RoleFailure(role, first_line(e)) from None


def _split(items: list, parts: int) -> list[list]:
    return [items[i::parts] for i in range(parts)]


class Orchestrator:
    """Ray actor body; ``run`` returns a summary dict.  The actor runs two threads so that the launcher's
    ``request_stop`` (on SIGTERM/SIGINT) reaches it while ``run`` is busy."""

    def __init__(self, cfg_json: bytes, model_paths: dict[str, str]):
        self._begin(msgspec.json.decode(cfg_json, type=Config), model_paths)
        redirect_output(str(self.out / "logs" / "orchestrator.log"))
        self.actors: dict[str, list] = {}
        # Adapters are served under versions unique across a session's runs (vLLM caches a LoRA by its id):
        # step N of the current run is version adapter_base + N.
        self.adapter_base = 0
        self.next_version = 1

    def _begin(self, cfg: Config, model_paths: dict[str, str]) -> None:
        """The state of one run (a session's next run starts from here again, with the same roles)."""
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.paths = model_paths
        self.role_seconds: dict[str, float] = {"inference": 0.0, "teacher": 0.0, "trainer": 0.0}
        # An external teacher is asked for log-probs only when the advantage uses them (teacher/endpoint.py);
        # the teacher's own samples (sampler = "teacher") need no scoring.
        self.scores = not (cfg.teacher.endpoint and cfg.trainer.loss.teacher_tau == 0) and \
            cfg.orchestrator.sampler == "student"
        self.score_failed = 0
        self.inflight: dict[Any, tuple[str, float]] = {}  # ref -> (role, submitted at): see _submit / _poll
        self.results: dict[Any, Any] = {}
        self.timeline = Timeline()
        self.queue: deque[Batch] = deque()  # batches sampled ahead (max_async_level)
        self.next_draw = 1  # the step whose prompts are drawn next
        self._stop = threading.Event()
        self.step = 0  # the step in progress

    # ------------------------------------------------------------------------------------------
    def _start_roles(self) -> dict[str, float]:
        cfg, out = self.cfg, self.out
        from inference.engine import InferenceEngine
        from shared.engines import engine_env
        from teacher.engine import TeacherEngine
        from trainer.worker import TrainerRank

        actors = plan(cfg, self.paths.get("cuda_visible_devices"))
        port = _free_port()
        # Trainer ranks meet through a file store, not a TCP store: torch's TCPStore listens on every
        # interface whatever address it is given. (Ranks on several nodes need a shared filesystem.)
        rendezvous = out / ".rendezvous" / f"trainer-{port}"
        rendezvous.parent.mkdir(parents=True, exist_ok=True)
        rendezvous.unlink(missing_ok=True)

        def opts(a: ActorPlan, extra_env: dict[str, str]) -> dict:
            return dict(
                name=f"{out.name}-{a.name}-{port}",
                num_cpus=0,
                num_gpus=0,
                max_concurrency=1,
                runtime_env={"env_vars": {**a.env, **extra_env}},
                **node_affinity(a, self.paths),  # on the plan's node when the cluster has several
            )

        base = dict(max_model_len=cfg.model.max_model_len, seed=cfg.seed, enforce_eager=cfg.inference.enforce_eager)
        for a in actors:
            log = str(out / "logs" / f"{a.name}.log")
            if a.role == "inference":
                spec = dict(base, dtype=cfg.model.dtype, tp=a.tp, lora_rank=cfg.model.lora.rank,
                            lora_mode=cfg.inference.lora_mode, answers=list(cfg.orchestrator.env_args.answers),
                            answer_choice=cfg.orchestrator.env_args.answer_choice,
                            gpu_memory_utilization=cfg.inference.gpu_memory_utilization,
                            finetune=cfg.trainer.finetune, weight_transfer=cfg.trainer.weight_transfer)
                actor = ray.remote(InferenceEngine).options(**opts(a, engine_env(cfg.inference.kv_cache_gib)))
                self.actors.setdefault("inference", []).append(actor.remote(self.paths["student"], spec, log))
            elif a.role == "teacher" and cfg.teacher.endpoint:  # an external teacher (teacher/endpoint.py)
                from teacher.endpoint import EndpointTeacher

                actor = ray.remote(EndpointTeacher).options(**opts(a, {"TOKENIZERS_PARALLELISM": "false"}))
                self.actors.setdefault("teacher", []).append(actor.remote(
                    msgspec.json.encode(cfg), self.paths["endpoint_model"], self.paths["endpoint_prompts"],
                    self.paths["teacher"], log))
            elif a.role == "teacher":
                spec = dict(base, dtype=cfg.teacher.dtype, tp=a.tp,
                            gpu_memory_utilization=cfg.teacher.gpu_memory_utilization)
                actor = ray.remote(TeacherEngine).options(**opts(a, engine_env(cfg.teacher.kv_cache_gib)))
                self.actors.setdefault("teacher", []).append(actor.remote(self.paths["teacher"], spec, log))
            elif a.role == "trainer":
                spec = self._trainer_spec()
                world = sum(1 for b in actors if b.role == "trainer")
                actor = ray.remote(TrainerRank).options(**opts(a, {"TOKENIZERS_PARALLELISM": "false"}))
                self.actors.setdefault("trainer", []).append(
                    actor.remote(a.index, world, a.backend, f"file://{rendezvous.resolve()}", self.paths["student"],
                                 {**spec, **self._finetune_spec()}, str(out), log)
                )
        # Start everything at once; report each role's start-up time.
        refs = {
            "inference": [x.ready.remote() for x in self.actors["inference"]],
            "teacher": [x.ready.remote() for x in self.actors["teacher"]],
            "trainer": [x.setup.remote() for x in self.actors["trainer"]],
        }
        times = {f"time/startup_{role}": max(_get(role, r)) for role, r in refs.items()}
        if cfg.trainer.weight_transfer == "nccl":
            self._join_weight_group()
        return times

    def _trainer_spec(self) -> dict[str, Any]:
        cfg, t, m = self.cfg, self.cfg.trainer, self.cfg.model
        return dict(
            seed=cfg.seed, dtype=m.dtype, lr=t.lr, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
            lr_schedule=t.lr_schedule, warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio,
            total_steps=cfg.max_steps,
            lora_rank=m.lora.rank, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
            lora_targets=list(m.lora.target_modules),
            mask_ratio_low=t.loss.mask_ratio_low, mask_ratio_high=t.loss.mask_ratio_high,
            ref_kl_coef=t.loss.ref_kl_coef, ref_kl_estimator=t.loss.ref_kl_estimator,
            entropy_coef=t.loss.entropy_coef,
        )

    def _serve_refs(self, adapter: str, step: int) -> list:
        """Ask every student engine to serve ``adapter`` (this run's step ``step``); the refs of the calls."""
        version = self.adapter_base + step
        self.next_version = max(self.next_version, version + 1)
        return self._weight_update_refs(adapter, version)

    # -- sessions (orchestrator/api.py): roles started once, several runs ------------------------------
    def open_session(self) -> dict[str, float]:
        """Start the roles for the runs of a session; each role's start-up seconds."""
        self.startup = self._start_roles()
        self._write_pids()
        return self.startup

    def run_in_session(self, cfg_json: bytes, model_paths: dict[str, str]) -> dict[str, Any]:
        """The session's next run: ``run`` with the roles already started (the caller checked that the
        config differs from the session's only in per-run keys)."""
        self._begin(msgspec.json.decode(cfg_json, type=Config), model_paths)
        return self.run(fresh_roles=False)

    def _reset_roles(self) -> dict[str, float]:
        """Before a session's run: the trainer ranks start a new LoRA adapter and optimizer from this run's
        seed and write ``broadcast/step_0`` (B = 0, so it computes exactly the base model), which the engines
        then serve under a new version."""
        t0 = time.perf_counter()
        spec = self._trainer_spec()
        adapter = _get("trainer", [r.reset.remote(spec, str(self.out)) for r in self.actors["trainer"]])[0]
        self.adapter_base = self.next_version
        _get("inference", self._serve_refs(adapter, 0))
        return {"time/reset": time.perf_counter() - t0}

    # ------------------------------------------------------------------------------------------
    def _sample_refs(self, prompt_ids: list[list[int]], first_index: int, n: int, temperature: float,
                     role: str = "inference", max_tokens: int | None = None) -> list:
        """Submit sampling to the role's engines (prompts spread across them); the refs of their replies."""
        engines = self.actors[role]
        idx = list(range(first_index, first_index + len(prompt_ids)))
        inf = self.cfg.inference
        max_tokens = max_tokens or inf.max_tokens
        return [
            e.generate.remote(ids, ix, n, temperature, inf.top_p, max_tokens, self.cfg.seed * 1_000_003)
            for e, ids, ix in zip(engines, _split(prompt_ids, len(engines)), _split(idx, len(engines)))
            if ids
        ]

    def _rollouts(self, replies: list[bytes]) -> tuple[list, dict[int, int]]:
        """The engines' replies as rollouts sorted by prompt index, and the adapter step (of this run) that
        sampled each prompt."""
        rollouts, adapter_steps = [], {}
        for data in replies:
            batch = decode(data, RolloutBatch)
            rollouts.extend(batch.rollouts)
            step = batch.adapter_step - self.adapter_base
            adapter_steps.update(dict.fromkeys((r.prompt_index for r in batch.rollouts), step))
        rollouts.sort(key=lambda r: r.prompt_index)
        return rollouts, adapter_steps

    def _sample(self, prompt_ids: list[list[int]], first_index: int, n: int, temperature: float,
                role: str = "inference", max_tokens: int | None = None) -> list:
        refs = self._sample_refs(prompt_ids, first_index, n, temperature, role, max_tokens)
        return self._rollouts(_get(role, refs))[0]

    def _score_refs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> tuple[list, list]:
        """Submit teacher scoring of each completion (spread across the teacher engines): (refs, parts)."""
        engines = self.actors["teacher"]
        parts = [p for p in _split(list(range(len(prompt_ids))), len(engines)) if p]
        refs = [
            e.score.remote(encode(ScoreRequest(prompt_ids=[prompt_ids[i] for i in part],
                                               completion_ids=[completion_ids[i] for i in part])))
            for e, part in zip(engines, parts)
        ]
        return refs, parts

    @staticmethod
    def _scores(parts: list[list[int]], replies: list[bytes], n: int) -> list[list[float] | None]:
        """Teacher log-probs of each completion; None where an external teacher failed to score it."""
        out: list[list[float] | None] = [[] for _ in range(n)]
        for part, data in zip(parts, replies):
            result = decode(data, ScoreResult)
            for i, lps in zip(part, result.logprobs):
                out[i] = lps
            for k in result.failed:
                out[part[k]] = None
        return out

    def _score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float] | None]:
        """Teacher log-probs of each completion; None where an external teacher failed to score it."""
        refs, parts = self._score_refs(prompt_ids, completion_ids)
        return self._scores(parts, _get("teacher", refs), len(prompt_ids))

    def _evaluate(self, env, role: str = "inference", teacher_view: bool = False) -> float:
        """Mean score of one completion per held-out prompt (``eval.temperature``; 0 = greedy)."""
        prompts = env.eval_prompts(self.cfg.orchestrator.eval.num_prompts)
        ids = [self.renderer.ids(p, teacher=teacher_view) for p in prompts]
        rollouts = self._sample(ids, 0, 1, self.cfg.orchestrator.eval.temperature, role=role)
        return statistics.fmean(env.score(prompts[r.prompt_index], r.text) for r in rollouts)

    def _teacher_generate(self, ids: list[list[int]], max_tokens: int, temperature: float) -> list:
        """The teacher's answers (one per prompt, in order): judge replies, reference answers."""
        self._teacher_calls += 1
        return self._sample(ids, self._teacher_calls * 1_000_000, 1, temperature, role="teacher", max_tokens=max_tokens)

    def _setup_workflow(self, env) -> None:
        """Prompt source (the environment, mixed with core replay), reward source, core suite (workflows.py,
        continual.py)."""
        from transformers import AutoTokenizer

        cfg, oc = self.cfg, self.cfg.orchestrator
        self._teacher_calls = 0
        self.t_tok = AutoTokenizer.from_pretrained(self.paths["teacher"]) if oc.workflow != "distill" else None
        self.prompts, self.suite = env, None
        if oc.workflow == "comparator" and oc.comparator.question_source != "generator":
            from orchestrator.question_sources import make_question_source

            self.prompts = make_question_source(cfg, self._question_generate)
        if continual.enabled(cfg):
            cores = continual.make_core_envs(cfg)
            self.suite = continual.CoreSuite(cfg, cores, self.out)
            if oc.continual.replay_ratio:
                self.prompts = continual.ReplayMix(self.prompts, cores, oc.continual.replay_ratio)
        mix = self.prompts if isinstance(self.prompts, continual.ReplayMix) else None
        score = mix.score if mix else (lambda i, p, text: env.score(p, text))
        if oc.workflow == "judge":
            chat = cfg.model.chat_template != "off"
            jc = oc.judge
            options = tuple(self.t_tok(w, add_special_tokens=False).input_ids for w in (jc.yes, jc.no)) \
                if jc.verdict == "loglik" else None
            self.reward = workflows.JudgeReward(cfg, lambda m: workflows.render_messages(self.t_tok, m, chat),
                                                self._teacher_generate, check=score, score=self._score,
                                                options=options)
        elif oc.workflow == "comparator":
            from orchestrator.transfer import parameter_ratio

            self.reward = workflows.ComparatorReward(cfg, lambda p: self.renderer.ids(p, teacher=True),
                                                     self._teacher_generate,
                                                     parameter_ratio(self.paths["student"], self.paths["teacher"]))
        else:
            self.reward = workflows.RewardSource(score)

    def _question_generate(self, messages: list[dict[str, str]]) -> str:
        """question_source = teacher: one teacher reply to the question request."""
        cc = self.cfg.orchestrator.comparator
        ids = workflows.render_messages(self.t_tok, messages, self.cfg.model.chat_template != "off")
        room = max(1, self.cfg.model.max_model_len - len(ids))
        return self._teacher_generate([ids], min(cc.question_max_tokens, room), cc.question_temperature)[0].text

    def _endpoint_metrics(self) -> dict[str, float]:
        """An external teacher's request counts (cumulative) and this step's rollouts dropped for want of scores."""
        if not self.cfg.teacher.endpoint:
            return {}
        row = _get("teacher", self.actors["teacher"][0].stats.remote())
        row["teacher/score_failed"] = float(self.score_failed)
        if not self.scores:
            row.update({"teacher_kl": float("nan"), "teacher_kl/seq": float("nan")})
        return row

    def _eval_row(self, env, step: int, gate: bool = True) -> tuple[dict[str, float], bool]:
        """The evaluation row: the trained environment and, with [orchestrator.continual], the core suite and
        its gate (``passed`` is False when a core metric regressed beyond max_regression)."""
        row = {"step": step, f"eval/{env.name}/avg": self._evaluate(env)}
        if self.suite is None:
            return row, True
        core, passed = self.suite.evaluate(self._evaluate, step, gate)
        return {**row, **core}, passed

    def _restore(self, step: int) -> dict[str, float]:
        """The gate failed at ``step``: the engines serve the last passing adapter again, which becomes the final one."""
        path = self.suite.restore(step)
        _get("inference", self._serve_refs(str(path), self.suite.last_pass_step))
        return {"continual/restored_step": float(self.suite.last_pass_step)}

    # -- the pipeline: remote calls in flight, and batches sampled ahead --------------------------------
    def _submit(self, role: str, refs: list) -> list:
        """Track ``refs`` (calls just made to ``role``): their results are collected by :meth:`_poll`."""
        now = time.perf_counter()
        self.inflight.update(dict.fromkeys(refs, (role, now)))
        return refs

    def _poll(self) -> None:
        """Block until at least one tracked call finishes; collect every finished one (a failed call raises
        RoleFailure at once, naming its role, even if it was work for a later step)."""
        assert self.inflight, "nothing in flight to wait for"
        ray.wait(list(self.inflight), num_returns=1)
        ready, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0)
        now = time.perf_counter()
        for ref in ready:
            label, start = self.inflight.pop(ref)
            self.timeline.add(label, start, now)
            self.results[ref] = _get("inference" if label == "weight_update" else label, ref)

    def _await(self, refs: list) -> list:
        """The results of tracked ``refs``, in order; queued batches move on (sampled -> scored) meanwhile."""
        while True:
            self._advance()
            if all(r in self.results for r in refs):
                return [self.results.pop(r) for r in refs]
            self._poll()

    def _start_batch(self, step: int) -> Batch:
        """Draw the prompts of ``step`` and submit their sampling (with whatever adapter the engines serve)."""
        oc = self.cfg.orchestrator
        stream = checkpoint.state_of(self.prompts)  # before the draw: a checkpoint can rewind to here
        prompts = self.prompts.next_prompts(oc.batch_size)  # the environment, or a replay mix / question source
        base = self.prompts.position - len(prompts)  # rollouts carry global prompt indices (seeds follow them)
        batch = Batch(step=step, prompts=prompts, base=base, stream=stream)
        if isinstance(self.prompts, continual.ReplayMix):  # which environment scores each prompt
            envs = [self.prompts.main, *self.prompts.cores]
            batch.envs = [next(i for i, e in enumerate(envs) if e is env) for env in self.prompts.batch_envs]
            batch.replayed = self.prompts.replayed
        self._render(batch)
        if oc.sampler == "teacher":  # SFT: the teacher (with its context) writes the completions
            batch.sample_refs = self._submit("teacher", self._sample_refs(
                batch.teacher_ids, base, oc.group_size, self.cfg.inference.temperature, role="teacher"))
        else:
            batch.sample_refs = self._submit("inference", self._sample_refs(
                batch.prompt_ids, base, oc.group_size, self.cfg.inference.temperature))
        return batch

    def _render(self, batch: Batch) -> None:
        batch.prompt_ids = [self.renderer.ids(p) for p in batch.prompts]
        batch.teacher_ids = ([self.renderer.ids(p, teacher=True) for p in batch.prompts]
                             if self.renderer.has_context else batch.prompt_ids)

    def _advance(self) -> None:
        """Move every queued batch whose calls have finished to its next stage: sampled -> scoring submitted
        -> scored.  Never blocks."""
        for b in self.queue:
            if b.rollouts is None and all(r in self.results for r in b.sample_refs):
                rollouts, b.adapter_steps = self._rollouts([self.results.pop(r) for r in b.sample_refs])
                if self.cfg.orchestrator.sampler == "teacher":  # no student adapter sampled them: never stale
                    b.adapter_steps = {}
                b.empty = sum(1 for r in rollouts if not r.completion_ids)
                b.rollouts = [r for r in rollouts if r.completion_ids]
                b.t_sampled = time.perf_counter()
                if self.scores:
                    refs, b.score_parts = self._score_refs([b.teacher_ids[r.prompt_index - b.base] for r in b.rollouts],
                                                           [r.completion_ids for r in b.rollouts])
                    b.score_refs = self._submit("teacher", refs)
                else:  # an endpoint with teacher_tau = 0 is never asked for log-probs (teacher_kl is logged as NaN),
                    # nor are the teacher's own samples
                    b.teacher_lp = [list(r.logprobs) for r in b.rollouts]
                    b.t_scored = b.t_sampled
            if b.rollouts is not None and b.teacher_lp is None and all(r in self.results for r in b.score_refs):
                b.teacher_lp = self._scores(b.score_parts, [self.results.pop(r) for r in b.score_refs], len(b.rollouts))
                b.t_scored = time.perf_counter()

    def _finish(self, batch: Batch) -> None:
        """Wait until ``batch`` (queued) is sampled and scored."""
        while True:
            self._advance()
            if batch.teacher_lp is not None:
                return
            self._poll()

    def _fill(self, step: int) -> None:
        """Queue the batches of steps ``step .. step + k`` (k = max_async_level): their sampling starts now,
        with the adapter the engines serve (that of ``step - 1``), and runs while earlier steps train."""
        k = self.cfg.orchestrator.max_async_level
        while len(self.queue) <= k and self.next_draw <= self.cfg.max_steps:
            self.queue.append(self._start_batch(self.next_draw))
            self.next_draw += 1

    def _drain(self, timeout: float) -> int:
        """Wait at most ``timeout`` seconds for the calls in flight, then cancel the rest; how many were
        cancelled.  Never raises: a failed call's result is simply not used."""
        deadline = time.perf_counter() + timeout
        while self.inflight and time.perf_counter() < deadline:
            ready, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight),
                                timeout=max(0.0, deadline - time.perf_counter()))
            for ref in ready:
                self.inflight.pop(ref)
            if not ready:
                break
        left = list(self.inflight)
        for ref in left:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        self.inflight.clear()
        self.results.clear()
        return len(left)

    def _write_pids(self) -> None:
        """``logs/pids.json``: the process of every actor, by name (what an operator, or a test, can watch)."""
        names = {f"{role}-{i}": a for role, actors in self.actors.items() for i, a in enumerate(actors)}
        pids = _get("orchestrator", [a.__ray_call__.remote(lambda actor: os.getpid()) for a in names.values()]) \
            if names else []
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "logs" / "pids.json",
                          json.dumps({"orchestrator-0": os.getpid(), **dict(zip(names, pids))}, indent=1) + "\n")

    def request_stop(self) -> None:
        """Called by the launcher on SIGTERM/SIGINT (from another thread of this actor): finish the step in
        progress, write a checkpoint and return."""
        self._stop.set()

    # -- checkpoints (orchestrator/checkpoint.py) -------------------------------------------------------
    def _save_checkpoint(self, step: int, history: dict[str, Any]) -> float:
        """Trainer shards + the orchestrator's state, made complete atomically; the batches queued ahead are
        waited for (at most ``orchestrator.drain_timeout``) so that a resumed run trains on the same rollouts."""
        t0 = time.perf_counter()
        deadline = t0 + self.cfg.orchestrator.drain_timeout
        while self.inflight and any(b.teacher_lp is None for b in self.queue) and time.perf_counter() < deadline:
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=max(0.0, deadline - time.perf_counter()))
            if ready:
                self._poll()
            self._advance()
        buffer, stream = [], checkpoint.state_of(self.prompts)
        for b in self.queue:
            if b.teacher_lp is None:  # not ready in time: a resumed run draws these prompts again
                stream = b.stream
                break
            buffer.append(b.state())
        tmp = checkpoint.begin(self.out, step)
        trainer_seconds = max(_get("trainer", [r.save_checkpoint.remote(str(tmp)) for r in self.actors["trainer"]]))
        checkpoint.write_state(tmp, {
            "step": step, "stream": stream, "teacher_calls": self._teacher_calls,
            "reward": checkpoint.state_of(self.reward),
            "suite": checkpoint.state_of(self.suite) if self.suite is not None else None,
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
        _get("trainer", [r.load_checkpoint.remote(str(directory), step) for r in self.actors["trainer"]])
        adapter = str(self.out / "broadcast" / f"step_{step}")
        _get("inference", self._serve_refs(adapter, step))
        checkpoint.restore(self.prompts, state["stream"])
        self._teacher_calls = state["teacher_calls"]
        checkpoint.restore(self.reward, state["reward"])
        if self.suite is not None and state["suite"] is not None:
            checkpoint.restore(self.suite, state["suite"])
        self.role_seconds.update(state["role_seconds"])
        for saved in state["buffer"]:
            batch = Batch.from_state(saved)
            self._render(batch)
            self.queue.append(batch)
        self.next_draw = step + 1 + len(self.queue)
        return state["history"]

    def _restart(self, step: int, directory: Path, logger: MetricsLogger, attempt: int) -> dict[str, Any]:
        """``ckpt.on_failure = "restart"``: stop every role (a trainer rank whose peer died hangs in a collective;
        the engines serve a newer adapter), start them again and rewind the run to the checkpoint of ``step``:
        metrics.jsonl loses the rows after it, which the next steps write again."""
        self._drain(0.0)
        self.queue.clear()
        self.timeline = Timeline()
        for actors in self.actors.values():
            for actor in actors:
                with contextlib.suppress(Exception):
                    ray.kill(actor)
        self.actors = {}
        t0 = time.perf_counter()
        startup = self._start_roles()
        self._write_pids()
        history = self._load_checkpoint(step, directory)
        checkpoint.truncate_metrics(logger.path, step)
        logger.reopen()
        logger.log({"step": step, "restarted_from": float(step), "restarts": float(attempt), **startup,
                    "time/restart": time.perf_counter() - t0})
        return history

    # ------------------------------------------------------------------------------------------
    def run(self, fresh_roles: bool = True) -> dict[str, Any]:
        """Train ``self.cfg`` to the end; the roles are started here, or (a session's run) reset."""
        from transformers import AutoTokenizer

        from shared.metrics import BadSteps

        cfg = self.cfg
        self.t_run = time.perf_counter()
        env = environments.make(cfg)
        self.tok = AutoTokenizer.from_pretrained(self.paths["student"])
        self.renderer = Renderer(self.tok, cfg.model.chat_template, cfg.orchestrator.teacher_model)
        self._setup_workflow(env)
        resume = checkpoint.require_latest(self.out, cfg.ckpt.trust_unsigned) if cfg.resume else None
        if resume is not None:  # rows of steps after the checkpoint were written by the run that died
            checkpoint.truncate_metrics(self.out / "metrics.jsonl", resume[0])
        checkpoint.remove_partial(self.out)
        logger = MetricsLogger(str(self.out), msgspec.to_builtins(cfg.wandb), msgspec.to_builtins(cfg),
                               experiment=self.out.name)
        self.bad_steps = BadSteps(cfg.trainer.max_bad_steps)
        key = f"eval/{env.name}/avg"
        restarts: list[dict[str, Any]] = []
        try:
            if fresh_roles:
                startup = self._start_roles()
                self._write_pids()
            else:
                startup = self._reset_roles()
            if resume is not None:
                t0 = time.perf_counter()
                history = self._load_checkpoint(*resume)
                self.t_run -= history["wall_seconds"]
                logger.log({"step": resume[0], "resumed_from": float(resume[0]), **startup,
                            "time/resume": time.perf_counter() - t0})
            else:
                logger.log({"step": 0, **startup})
                history = {"first_eval": self._first_eval(env)}
                logger.log(history["first_eval"])
            start = resume[0] if resume is not None else 0
            while True:
                self.evals = {"first": history["first_eval"], "last": history.get("last_eval", history["first_eval"])}
                if "bad_steps" in history:
                    self.bad_steps.in_a_row, self.bad_steps.last_good = history["bad_steps"]
                try:
                    step, stopped = self._steps(env, logger, start)
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
            if self.suite is not None and not self.suite.regressions and not stopped:
                self.suite.write_final(self.out / "broadcast" / f"step_{step}", gate_failed=False)
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
                **({"continual": self.suite.summary()} if self.suite is not None else {}),
            }
        except BaseException:
            self._drain(0.0)  # a failure: whatever is still in flight is of no use
            raise
        finally:
            self._drain(cfg.orchestrator.drain_timeout)  # the normal end has nothing in flight; never waits longer
            logger.close()

    def _first_eval(self, env) -> dict[str, float]:
        """The evaluation before training (and the baselines, with ``orchestrator.eval_baseline``)."""
        key = f"eval/{env.name}/avg"
        if self.suite is not None:  # broadcast/step_0: the untouched student, the gate's first fallback
            _get("trainer", [r.save_adapter.remote(0) for r in self.actors["trainer"]])
        first_eval, _ = self._eval_row(env, 0)
        if self.cfg.orchestrator.eval_baseline:
            teacher = self._evaluate(env, role="teacher", teacher_view=True)
            first_eval.update({
                f"eval/{env.name}/baseline_student/avg": first_eval[key],
                f"eval/{env.name}/baseline_teacher/avg": teacher,
                f"eval/{env.name}/baseline_diff": teacher - first_eval[key],
            })
        return first_eval

    def _steps(self, env, logger: MetricsLogger, start: int) -> tuple[int, bool]:
        """Steps ``start + 1 .. max_steps`` with their evaluations and checkpoints; ``(last step, stopped)``:
        stopped early by SIGTERM/SIGINT (after a checkpoint), or by a failed continual gate."""
        cfg = self.cfg
        step = start
        for step in range(start + 1, cfg.max_steps + 1):
            self.step = step
            row = self._train_step(env, step)
            row.update(self._endpoint_metrics())
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

    def _corrective_samples(self, groups: list[int], rewards: list[float], teacher_ids: list[list[int]],
                            prompt_ids: list[list[int]], base: int) -> list[TrainSample]:
        """Supervised targets for failed prompts: the teacher's greedy answer (with its context) to each,
        reusing the comparator's references where it already has them."""
        failed = self.reward.failed_prompts(groups, rewards)
        answers = dict(self.reward.references())
        missing = [i for i in failed if i not in answers]
        if missing:
            for ans in self._sample([teacher_ids[i - base] for i in missing], 0, 1, 0.0, role="teacher"):
                answers[missing[ans.prompt_index]] = ans
        weight = self.cfg.trainer.loss.corrective_coef
        return [TrainSample(input_ids=prompt_ids[i - base] + answers[i].completion_ids,
                            prompt_len=len(prompt_ids[i - base]), inference_logprobs=[], advantages=[],
                            sft_weight=weight, policy=False)
                for i in failed if answers[i].completion_ids]

    def _policy_samples(self, prompts: list, rollouts: list, teacher_lp: list, base: int) -> StepSamples:
        """On-policy: the student's rollouts with per-token advantages (and lock-in weights)."""
        lc = self.cfg.trainer.loss
        # A_t = adv_tau * A_task + teacher_tau * logp_T(t) - student_tau * logp_S(t) (trainer/loss.py);
        # rollouts of one prompt share prompt_index, the group of the task baseline.
        t_reward = time.perf_counter()  # the workflow's reward source (workflows.py): env score, judge, comparator
        skip = self.cfg.orchestrator.skip_verification
        rewards, reward_metrics = ([], {}) if skip else self.reward.rewards(prompts, rollouts, base)
        keep = [i for i, rw in enumerate(rewards) if rw is not None]  # None: dropped (e.g. an unparseable verdict)
        if len(keep) < len(rewards):
            rollouts, teacher_lp, rewards = ([x[i] for i in keep] for x in (rollouts, teacher_lp, rewards))
        groups = [r.prompt_index for r in rollouts]
        t_reward = time.perf_counter() - t_reward
        a_task = group_advantages(rewards, groups, lc.reward_std_scale) if lc.adv_tau else [0.0] * len(rollouts)
        kls, advs, lens = [], [], []
        clipped = 0
        for r, tlp, a in zip(rollouts, teacher_lp, a_task):
            t_lp, n_bad = sanitize_logprobs(torch.tensor(tlp, dtype=torch.float64), lc.logprob_floor)
            clipped += n_bad
            s_lp = torch.tensor(r.logprobs, dtype=torch.float64)
            kls.append(s_lp - t_lp)
            advs.append(combined_advantages(s_lp, t_lp, a, lc.adv_tau, lc.teacher_tau, lc.student_tau, lc.kl_level,
                                            lc.kl_discount))
            lens.append(len(r.completion_ids))
        if lc.kl_baseline == "batch_mean":
            advs = subtract_baseline(advs)
        lockin = [lc.lockin_coef if rw > 0 else 0.0 for rw in rewards] or [0.0] * len(rollouts)
        samples = [
            TrainSample(input_ids=r.prompt_ids + r.completion_ids, prompt_len=len(r.prompt_ids),
                        inference_logprobs=r.logprobs, advantages=adv.tolist(), sft_weight=w)
            for r, adv, w in zip(rollouts, advs, lockin)
        ]
        return StepSamples(samples, lens, rewards, reward_metrics, groups, kls, advs, clipped, lockin, t_reward)

    @staticmethod
    def _sft_samples(prompt_ids: list[list[int]], rollouts: list, base: int) -> StepSamples:
        """Off-policy distillation (``sampler = "teacher"``): each teacher sample after the student's view of
        its prompt, a supervised NLL term of weight 1 (``policy = False``; the loss divides by these tokens)."""
        samples = [TrainSample(input_ids=prompt_ids[r.prompt_index - base] + r.completion_ids,
                               prompt_len=len(prompt_ids[r.prompt_index - base]), inference_logprobs=[],
                               advantages=[], sft_weight=1.0, policy=False) for r in rollouts]
        return StepSamples(samples, [len(r.completion_ids) for r in rollouts], [], {}, [], [], [], 0, [], 0.0)

    def _train_step(self, env, step: int) -> dict[str, float]:
        cfg, oc, lc = self.cfg, self.cfg.orchestrator, self.cfg.trainer.loss
        t0 = time.perf_counter()
        self._fill(step)  # k = 0: this step's sampling starts now; k > 0: it was queued k steps ago
        batch = self.queue[0]
        self._finish(batch)
        self.queue.popleft()
        prompts, base, prompt_ids, teacher_ids = batch.prompts, batch.base, batch.prompt_ids, batch.teacher_ids
        if batch.envs is not None:  # a replay mix scores each prompt with the environment it was drawn from
            envs = [self.prompts.main, *self.prompts.cores]
            self.prompts.batch_envs, self.prompts.replayed = [envs[i] for i in batch.envs], batch.replayed
        empty, rollouts, teacher_lp = batch.empty, batch.rollouts, batch.teacher_lp
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

        if oc.sampler == "teacher":
            built = self._sft_samples(prompt_ids, rollouts, base)
        else:
            built = self._policy_samples(prompts, rollouts, teacher_lp, base)
        samples, lens, rewards, reward_metrics, groups, kls, advs, clipped, lockin, t_reward = built
        t2 += t_reward  # judge and reference answers are teacher time
        t_corrective = time.perf_counter()
        if lc.corrective_coef:
            samples += self._corrective_samples(groups, rewards, teacher_ids, prompt_ids, base)
        t_corrective = time.perf_counter() - t_corrective
        t2 += t_corrective  # teacher time, not trainer time
        total_tokens = sum(lens)  # policy tokens: the normaliser of every loss term
        ranks = self.actors["trainer"]
        if len(samples) < len(ranks):  # every rank needs a sample for the collectives; nothing to learn from
            return {"step": step, "skipped_step": 1.0, "rollouts/empty": float(empty), "teacher_kl": float("nan"),
                    **reward_metrics, "async/dropped_rollouts": float(n_dropped), "time/step": time.perf_counter() - t0}
        shares = _split(samples, len(ranks))
        per_rank = max(len(s) for s in shares)
        micro = -(-per_rank // cfg.trainer.micro_batch_size)
        refs = [
            rank.train_step.remote(encode(TrainBatch(step=step, samples=share, total_tokens=total_tokens,
                                                     num_micro_batches=micro)))
            for rank, share in zip(ranks, shares)
        ]
        results = [decode(d, StepResult) for d in self._await(self._submit("trainer", refs))]
        t3 = time.perf_counter()
        self._await(self._submit("weight_update", self._serve_refs(results[0].adapter_path, step)))
        t4 = time.perf_counter()

        tm = {k: sum(r.metrics.get(k, 0.0) for r in results) for k in SUMMED_METRICS}
        n_policy = max(tm["tokens"], 1)
        extra = {"reward/mean": statistics.fmean(rewards)} if rewards else {}  # absent with skip_verification
        extra.update(reward_metrics)  # judge/*, comparator/*
        if isinstance(self.prompts, continual.ReplayMix):
            extra["continual/replay_prompts"] = float(self.prompts.replayed)
        if lc.ref_kl_coef:
            extra.update({"loss/ref_kl": tm["loss/ref_kl"], "ref_kl/mean": tm["ref_kl_sum"] / n_policy})
        if lc.lockin_coef:
            extra.update({"loss/lockin": tm["loss/lockin"], "lockin/samples": float(sum(1 for w in lockin if w))})
        if lc.corrective_coef:
            extra.update({"loss/corrective": tm["loss/corrective"], "time/teacher_corrective": t_corrective,
                          "corrective/samples": float(sum(1 for x in samples if not x.policy))})
        if lc.entropy_coef:
            extra.update({"loss/entropy": tm["loss/entropy"], "entropy/mean": tm["entropy_sum"] / n_policy})
        if oc.sampler == "teacher":  # the trainer counts a non-policy sample's NLL as its corrective term
            extra["loss/sft"] = tm["loss/corrective"]
        all_kl = torch.cat(kls) if kls else torch.zeros(1)
        all_adv = torch.cat(advs) if advs else torch.zeros(1)
        if oc.sampler == "teacher":  # SFT: the teacher did the sampling (no scoring)
            times = {"inference": 0.0, "teacher": t2 - t0, "trainer": t3 - t2}
        elif oc.max_async_level:  # roles overlap: each role's busy seconds in this step's wall time
            busy = self.timeline.busy(t0, t4)
            times = {"inference": busy.get("inference", 0.0),
                     "teacher": busy.get("teacher", 0.0) + t_reward + t_corrective,
                     "trainer": busy.get("trainer", 0.0)}
        else:  # one role after the other: the segments of the step
            times = {"inference": t1 - t0, "teacher": t2 - t1, "trainer": t3 - t2}
        for role, seconds in times.items():
            self.role_seconds[role] += seconds
        pipeline_row = {**self.timeline.metrics(t0, t4, ("inference", "teacher", "trainer")),
                        "async/staleness": statistics.fmean(stale) if stale else 0.0,
                        "async/staleness_max": float(max(stale, default=0)),
                        "async/dropped_rollouts": float(n_dropped)}
        self.timeline.forget(t4)
        no_kl = oc.sampler == "teacher"  # the student sampled nothing for the teacher to score
        return {
            "step": step,
            "teacher_kl": float("nan") if no_kl else float(all_kl.mean()),
            "teacher_kl/seq": float("nan") if no_kl else
            float(statistics.fmean(float(k.sum()) for k in kls)) if kls else 0.0,
            "combined_advantage": float(all_adv.mean()),
            "loss/policy": tm["loss/policy"],
            **extra,
            "seq_len/mean": statistics.fmean(lens) if lens else 0.0,
            "grad_norm": results[0].metrics["grad_norm"],
            "train/lr": results[0].metrics.get("lr", 0.0),
            "skipped_step": results[0].metrics["skipped_step"],
            "zero_grad_step": results[0].metrics.get("zero_grad_step", 0.0),
            "masked/low_frac": tm["masked_low"] / max(tm["tokens"], 1),
            "masked/high_frac": tm["masked_high"] / max(tm["tokens"], 1),
            "masked/low": tm["masked_low"],
            "masked/high": tm["masked_high"],
            "ratio/mean": tm["ratio_sum"] / max(tm["tokens"], 1),
            "teacher/logprob_clipped": float(clipped),
            "rollouts/empty": float(empty),
            "tokens/step": float(total_tokens),
            "time/step": t4 - t0,
            "time/inference": times["inference"],
            "time/teacher": times["teacher"],
            "time/trainer": times["trainer"],
            "time/weight_update": t4 - t3,
            "time/reward": t_reward,
            **pipeline_row,
        }

    # -- how new weights reach the engines -----------------------------------------------------------
    def _finetune_spec(self) -> dict[str, Any]:
        """The trainer's full fine-tuning keys (trainer/full.py); a whole model a step is big, so only the newest
        two stay on disk, unless a continual gate may restore an older one."""
        t, cont = self.cfg.trainer, self.cfg.orchestrator.continual
        return dict(finetune=t.finetune, weight_transfer=t.weight_transfer,
                    keep_full_steps=0 if cont.core_environments and cont.gate else 2)

    def _weight_update_refs(self, adapter: str, step: int) -> list:
        """The engines load ``broadcast/step_N``, or (NCCL) receive what the trainer ranks send, all at once."""
        if self.cfg.trainer.weight_transfer != "nccl":
            return [e.load_adapter.remote(adapter, step) for e in self.actors["inference"]]
        return ([e.receive_weights.remote(self.weight_info, step) for e in self.actors["inference"]]
                + [r.send_weights.remote(step) for r in self.actors["trainer"]])

    def _join_weight_group(self) -> None:
        """Trainer rank 0 and every engine open the NCCL weight-update group together (shared/weight_sync.py)."""
        from shared.weight_sync import plan, update_info

        engines, trainers = self.actors["inference"], self.actors["trainer"]
        self.weight_info = update_info(_get("trainer", trainers[0].weight_metadata.remote()))  # the same every step
        address, port = _get("trainer", trainers[0].weight_endpoint.remote())
        group = plan(address, port, _get("inference", [e.node_address.remote() for e in engines]),
                     self.cfg.inference.parallel.tp)
        refs = ([trainers[0].join_weight_group.remote(group.master_address, port, group.world_size)]
                + [e.join_weight_group.remote(group.engine_init(i)) for i, e in enumerate(engines)])
        _get("weight_update", refs)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
