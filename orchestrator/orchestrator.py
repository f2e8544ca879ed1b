"""The orchestrator: the only role that decides what happens next.

Each step: prompts → student engines (sample ``group_size`` completions with log-probs) → teacher
engines (log-probs of the same tokens) → per-token advantages → trainer ranks (one optimizer step,
adapter written to ``broadcast/step_N``) → student engines load that adapter.  Evaluation runs at the
start (baseline), every ``eval.interval`` steps and at the end.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import msgspec
import ray
import torch

from orchestrator import continual, environments, workflows
from orchestrator.prompts import Renderer
from shared.config import Config
from shared.metrics import MetricsLogger
from shared.placement import ActorPlan, plan
from shared.runtime import first_line, redirect_output
from shared.wire import RolloutBatch, ScoreRequest, ScoreResult, StepResult, TrainBatch, TrainSample, decode, encode
from shared.wire import SUMMED_METRICS
from trainer.loss import combined_advantages, group_advantages, sanitize_logprobs, subtract_baseline


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
    except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
        raise RoleFailure(role, first_line(e)) from None


def _split(items: list, parts: int) -> list[list]:
    return [items[i::parts] for i in range(parts)]


class Orchestrator:
    """Ray actor body; ``run`` returns a summary dict."""

    def __init__(self, cfg_json: bytes, model_paths: dict[str, str]):
        self.cfg: Config = msgspec.json.decode(cfg_json, type=Config)
        self.out = Path(self.cfg.output_dir)
        redirect_output(str(self.out / "logs" / "orchestrator.log"))
        self.paths = model_paths
        self.actors: dict[str, list] = {}
        self.role_seconds: dict[str, float] = {"inference": 0.0, "teacher": 0.0, "trainer": 0.0}
        # An external teacher is asked for log-probs only when the advantage uses them (teacher/endpoint.py).
        self.scores = not (self.cfg.teacher.endpoint and self.cfg.trainer.loss.teacher_tau == 0)
        self.score_failed = 0

    # ------------------------------------------------------------------------------------------
    def _start_roles(self) -> dict[str, float]:
        cfg, out = self.cfg, self.out
        from inference.engine import InferenceEngine
        from shared.engines import engine_env
        from teacher.engine import TeacherEngine
        from trainer.worker import TrainerRank

        actors = plan(cfg)
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
            )

        base = dict(max_model_len=cfg.model.max_model_len, seed=cfg.seed, enforce_eager=cfg.inference.enforce_eager)
        for a in actors:
            log = str(out / "logs" / f"{a.name}.log")
            if a.role == "inference":
                spec = dict(base, dtype=cfg.model.dtype, tp=a.tp, lora_rank=cfg.model.lora.rank,
                            lora_mode=cfg.inference.lora_mode, answers=list(cfg.orchestrator.env_args.answers),
                            answer_choice=cfg.orchestrator.env_args.answer_choice,
                            gpu_memory_utilization=cfg.inference.gpu_memory_utilization)
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
                t, m = cfg.trainer, cfg.model
                spec = dict(
                    seed=cfg.seed, dtype=m.dtype, lr=t.lr, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                    lr_schedule=t.lr_schedule, warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio,
                    total_steps=cfg.max_steps,
                    lora_rank=m.lora.rank, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                    lora_targets=list(m.lora.target_modules),
                    mask_ratio_low=t.loss.mask_ratio_low, mask_ratio_high=t.loss.mask_ratio_high,
                    ref_kl_coef=t.loss.ref_kl_coef, ref_kl_estimator=t.loss.ref_kl_estimator,
                    entropy_coef=t.loss.entropy_coef,
                )
                world = sum(1 for b in actors if b.role == "trainer")
                actor = ray.remote(TrainerRank).options(**opts(a, {"TOKENIZERS_PARALLELISM": "false"}))
                self.actors.setdefault("trainer", []).append(
                    actor.remote(a.index, world, a.backend, f"file://{rendezvous.resolve()}", self.paths["student"], spec,
                                 str(out), log)
                )
        # Start everything at once; report each role's start-up time.
        refs = {
            "inference": [x.ready.remote() for x in self.actors["inference"]],
            "teacher": [x.ready.remote() for x in self.actors["teacher"]],
            "trainer": [x.setup.remote() for x in self.actors["trainer"]],
        }
        return {f"time/startup_{role}": max(_get(role, r)) for role, r in refs.items()}

    # ------------------------------------------------------------------------------------------
    def _sample(self, prompt_ids: list[list[int]], first_index: int, n: int, temperature: float,
                role: str = "inference", max_tokens: int | None = None) -> list:
        engines = self.actors[role]
        idx = list(range(first_index, first_index + len(prompt_ids)))
        inf = self.cfg.inference
        max_tokens = max_tokens or inf.max_tokens
        refs = [
            e.generate.remote(ids, ix, n, temperature, inf.top_p, max_tokens, self.cfg.seed * 1_000_003)
            for e, ids, ix in zip(engines, _split(prompt_ids, len(engines)), _split(idx, len(engines)))
            if ids
        ]
        rollouts = []
        for data in _get(role, refs):
            rollouts.extend(decode(data, RolloutBatch).rollouts)
        rollouts.sort(key=lambda r: r.prompt_index)
        return rollouts

    def _score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float] | None]:
        """Teacher log-probs of each completion; None where an external teacher failed to score it."""
        engines = self.actors["teacher"]
        order = list(range(len(prompt_ids)))
        parts = _split(order, len(engines))
        refs = [
            e.score.remote(encode(ScoreRequest(prompt_ids=[prompt_ids[i] for i in part],
                                               completion_ids=[completion_ids[i] for i in part])))
            for e, part in zip(engines, parts) if part
        ]
        out: list[list[float] | None] = [[] for _ in order]
        for part, data in zip([p for p in parts if p], _get("teacher", refs)):
            result = decode(data, ScoreResult)
            for i, lps in zip(part, result.logprobs):
                out[i] = lps
            for k in result.failed:
                out[part[k]] = None
        return out

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
            self.reward = workflows.JudgeReward(cfg, lambda m: workflows.render_messages(self.t_tok, m, chat),
                                                self._teacher_generate, check=score)
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
        _get("inference", [e.load_adapter.remote(str(path), self.suite.last_pass_step)
                           for e in self.actors["inference"]])
        return {"continual/restored_step": float(self.suite.last_pass_step)}

    # ------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from transformers import AutoTokenizer

        cfg = self.cfg
        t_run = time.perf_counter()
        env = environments.make(cfg)
        self.tok = AutoTokenizer.from_pretrained(self.paths["student"])
        self.renderer = Renderer(self.tok, cfg.model.chat_template, cfg.orchestrator.teacher_model)
        self._setup_workflow(env)
        logger = MetricsLogger(str(self.out), msgspec.to_builtins(cfg.wandb), msgspec.to_builtins(cfg),
                               experiment=self.out.name)
        try:
            startup = self._start_roles()
            logger.log({"step": 0, **startup})
            key = f"eval/{env.name}/avg"
            if self.suite is not None:  # broadcast/step_0: the untouched student, the gate's first fallback
                _get("trainer", [r.save_adapter.remote(0) for r in self.actors["trainer"]])
            first_eval, _ = self._eval_row(env, 0)
            if cfg.orchestrator.eval_baseline:
                teacher = self._evaluate(env, role="teacher", teacher_view=True)
                first_eval.update({
                    f"eval/{env.name}/baseline_student/avg": first_eval[key],
                    f"eval/{env.name}/baseline_teacher/avg": teacher,
                    f"eval/{env.name}/baseline_diff": teacher - first_eval[key],
                })
            logger.log(first_eval)
            last_eval = first_eval
            from shared.metrics import BadSteps

            bad_steps = BadSteps(cfg.trainer.max_bad_steps)
            for step in range(1, cfg.max_steps + 1):
                row = self._train_step(env, step)
                row.update(self._endpoint_metrics())
                logger.log(row)
                bad_steps.update(row)  # TrainingStopped after trainer.max_bad_steps skipped steps in a row
                interval = cfg.orchestrator.eval.interval
                if step == cfg.max_steps or (interval and step % interval == 0):
                    last_eval, passed = self._eval_row(env, step)
                    logger.log(last_eval)
                    if not passed:  # a core metric regressed beyond max_regression: restore and stop
                        restored = self._restore(step)  # first: the evaluation below is of the restored adapter
                        last_eval = {**self._eval_row(env, step, gate=False)[0], **restored}
                        logger.log(last_eval)
                        break
            if self.suite is not None and not self.suite.regressions:
                self.suite.write_final(self.out / "broadcast" / f"step_{step}", gate_failed=False)
            return {
                "steps": step,
                "wall_seconds": time.perf_counter() - t_run,
                "eval_start": first_eval[key],
                "eval_end": last_eval[key],
                "role_seconds": dict(self.role_seconds),
                "bad_rows": env.bad_rows,
                **({"continual": self.suite.summary()} if self.suite is not None else {}),
            }
        finally:
            logger.close()

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

    def _train_step(self, env, step: int) -> dict[str, float]:
        cfg, oc, lc = self.cfg, self.cfg.orchestrator, self.cfg.trainer.loss
        t0 = time.perf_counter()
        prompts = self.prompts.next_prompts(oc.batch_size)  # the environment, or a replay mix / question source
        base = self.prompts.position - len(prompts)  # rollouts carry global prompt indices (seeds follow them)
        prompt_ids = [self.renderer.ids(p) for p in prompts]
        teacher_ids = [self.renderer.ids(p, teacher=True) for p in prompts] if self.renderer.has_context else prompt_ids
        rollouts = self._sample(prompt_ids, base, oc.group_size, cfg.inference.temperature)
        empty = sum(1 for r in rollouts if not r.completion_ids)
        rollouts = [r for r in rollouts if r.completion_ids]
        t1 = time.perf_counter()
        if self.scores:
            teacher_lp = self._score([teacher_ids[r.prompt_index - base] for r in rollouts],
                                     [r.completion_ids for r in rollouts])
        else:  # an endpoint with teacher_tau = 0 is never asked for log-probs; teacher_kl is logged as NaN
            teacher_lp = [list(r.logprobs) for r in rollouts]
        self.score_failed = sum(1 for lp in teacher_lp if lp is None)
        if self.score_failed:  # the endpoint could not score them: dropped (and counted), never trained on
            scored = [i for i, lp in enumerate(teacher_lp) if lp is not None]
            rollouts, teacher_lp = [rollouts[i] for i in scored], [teacher_lp[i] for i in scored]
        t2 = time.perf_counter()

        # A_t = adv_tau * A_task + teacher_tau * logp_T(t) - student_tau * logp_S(t) (trainer/loss.py);
        # rollouts of one prompt share prompt_index, the group of the task baseline.
        t_reward = time.perf_counter()  # the workflow's reward source (workflows.py): env score, judge, comparator
        rewards, reward_metrics = ([], {}) if oc.skip_verification else self.reward.rewards(prompts, rollouts, base)
        keep = [i for i, rw in enumerate(rewards) if rw is not None]  # None: dropped (e.g. an unparseable verdict)
        if len(keep) < len(rewards):
            rollouts, teacher_lp, rewards = ([x[i] for i in keep] for x in (rollouts, teacher_lp, rewards))
        groups = [r.prompt_index for r in rollouts]
        t_reward = time.perf_counter() - t_reward
        t2 += t_reward  # judge and reference answers are teacher time
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
        t_corrective = time.perf_counter()
        if lc.corrective_coef:
            samples += self._corrective_samples(groups, rewards, teacher_ids, prompt_ids, base)
        t_corrective = time.perf_counter() - t_corrective
        t2 += t_corrective  # teacher time, not trainer time
        total_tokens = sum(lens)  # policy tokens: the normaliser of every loss term
        ranks = self.actors["trainer"]
        if len(samples) < len(ranks):  # every rank needs a sample for the collectives; nothing to learn from
            return {"step": step, "skipped_step": 1.0, "rollouts/empty": float(empty), "teacher_kl": float("nan"),
                    **reward_metrics, "time/step": time.perf_counter() - t0}
        shares = _split(samples, len(ranks))
        per_rank = max(len(s) for s in shares)
        micro = -(-per_rank // cfg.trainer.micro_batch_size)
        refs = [
            rank.train_step.remote(encode(TrainBatch(step=step, samples=share, total_tokens=total_tokens,
                                                     num_micro_batches=micro)))
            for rank, share in zip(ranks, shares)
        ]
        results = [decode(d, StepResult) for d in _get("trainer", refs)]
        t3 = time.perf_counter()
        adapter = results[0].adapter_path
        _get("inference", [e.load_adapter.remote(adapter, step) for e in self.actors["inference"]])
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
        all_kl = torch.cat(kls) if kls else torch.zeros(1)
        all_adv = torch.cat(advs) if advs else torch.zeros(1)
        self.role_seconds["inference"] += t1 - t0
        self.role_seconds["teacher"] += t2 - t1
        self.role_seconds["trainer"] += t3 - t2
        return {
            "step": step,
            "teacher_kl": float(all_kl.mean()),
            "teacher_kl/seq": float(statistics.fmean(float(k.sum()) for k in kls)) if kls else 0.0,
            "combined_advantage": float(all_adv.mean()),
            "loss/policy": tm["loss/policy"],
            **extra,
            "seq_len/mean": statistics.fmean(lens) if lens else 0.0,
            "grad_norm": results[0].metrics["grad_norm"],
            "train/lr": results[0].metrics.get("lr", 0.0),
            "skipped_step": results[0].metrics["skipped_step"],
            "masked/low_frac": tm["masked_low"] / max(tm["tokens"], 1),
            "masked/high_frac": tm["masked_high"] / max(tm["tokens"], 1),
            "masked/low": tm["masked_low"],
            "masked/high": tm["masked_high"],
            "ratio/mean": tm["ratio_sum"] / max(tm["tokens"], 1),
            "teacher/logprob_clipped": float(clipped),
            "rollouts/empty": float(empty),
            "tokens/step": float(total_tokens),
            "time/step": t4 - t0,
            "time/inference": t1 - t0,
            "time/teacher": t2 - t1,
            "time/trainer": t3 - t2,
            "time/weight_update": t4 - t3,
            "time/reward": t_reward,
        }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
