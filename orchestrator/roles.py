"""The run's actors, started from the placement plan, and the calls the loop makes to them.

:class:`Roles` starts every actor of the plan (student engines, the teacher, trainer ranks), hands out their
sampling and scoring calls, and moves new weights to the engines. The teacher is one of two backends that
implement :class:`orchestrator.teachers.TeacherBackend` (its preflight, actor and metrics): the in-cluster vLLM
engine (teacher/engine.py) or an external OpenAI-compatible server (teacher/endpoint.py). Both actors answer the
same calls (``ready``, ``generate``, ``score``), so nothing else asks which one runs.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from orchestrator import vocabulary
from orchestrator.colocation import Colocation
from orchestrator.deadlines import Deadlines
from orchestrator.failures import RoleFailure, get
from orchestrator.teacher_set import teacher_backend
from shared.config import Config, primary_teacher, topk_in_loss, weight_transfer
from shared.fsutil import atomic_write_text
from shared.placement import ActorPlan, RunPlan, node_affinity
from shared.sampling import policy_temperature, sampler_logprobs_mode
from shared.wire import RolloutBatch, ScoreRequest, ScoreResult, TrainBatch, decode, encode

ROLES = ("inference", "teacher", "trainer")


def split(items: list, parts: int) -> list[list]:
    return [items[i::parts] for i in range(parts)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the actors ---------------------------------------------------------------------------------------
class Roles:
    """Every actor of the run by role (``actors``); started by :meth:`start`, stopped by :meth:`kill`."""

    def __init__(self, cfg: Config, out: Path, run: RunPlan, started: Roles | None = None):
        """``started``: a session's roles, already running, that this run's config now drives."""
        self.cfg, self.out, self.run = cfg, out, run
        self.teacher = teacher_backend(cfg)
        self.vocab = vocabulary.make(cfg, run.student, run.teacher)  # what the teacher reads (orchestrator/vocabulary.py)
        self.actors: dict[str, list] = started.actors if started else {}
        self.weight_info: dict | None = started.weight_info if started else None
        self.transfer = weight_transfer(cfg)  # trainer.weight_transfer, "auto" resolved
        self.deadlines = Deadlines(cfg, out)
        self.owner: dict[Any, str] = {}  # a call in flight -> the actor it was made to (for a deadline's message)

    def start(self) -> dict[str, float]:
        """Create every planned actor, wait until all are ready; each role's start-up seconds."""
        from inference.engine import InferenceEngine
        from shared.engines import engine_env, omp_env
        from trainer.worker import TrainerRank

        cfg, out = self.cfg, self.out
        actors = self.run.actors
        port = free_port()
        # Trainer ranks meet through a file store, not a TCP store: torch's TCPStore listens on every
        # interface whatever address it is given. (Ranks on several nodes need a shared filesystem.)
        rendezvous = out / ".rendezvous" / f"trainer-{port}"
        rendezvous.parent.mkdir(parents=True, exist_ok=True)
        rendezvous.unlink(missing_ok=True)
        world = sum(1 for b in actors if b.role == "trainer")
        base = dict(max_model_len=cfg.model.max_model_len, seed=cfg.seed, enforce_eager=cfg.inference.enforce_eager)
        self.actors = {role: [] for role in ROLES}
        for a in actors:
            if a.role == "orchestrator":
                continue
            log = str(out / "logs" / f"{a.name}.log")
            options = dict(name=f"{out.name}-{a.name}-{port}", num_cpus=0, num_gpus=0, max_concurrency=1,
                           runtime_env={"env_vars": dict(a.env)},
                           **node_affinity(a, self.run.nodes))  # on the plan's node when the cluster has several
            if a.role == "teacher":
                self.actors["teacher"].append(self.teacher.actor(cfg, self.run, a, options, base, log))
            elif a.role == "inference":
                inf = cfg.inference
                spec = dict(base, dtype=cfg.model.dtype, tp=a.tp, lora_rank=cfg.model.lora.rank,
                            lora_mode=inf.lora_mode, answers=list(cfg.orchestrator.env_args.answers),
                            answer_choice=cfg.orchestrator.env_args.answer_choice,
                            gpu_memory_utilization=inf.gpu_memory_utilization,
                            finetune=cfg.trainer.finetune, weight_transfer=self.transfer,
                            sleep=a.sleeps, logprobs_mode=sampler_logprobs_mode(cfg))
                options["runtime_env"]["env_vars"].update(engine_env(inf.kv_cache_gib, cpu=not a.devices))
                self.actors["inference"].append(
                    ray.remote(InferenceEngine).options(**options).remote(self.run.student, spec, log))
            else:
                options["runtime_env"]["env_vars"].update(TOKENIZERS_PARALLELISM="false", **omp_env())
                self.actors["trainer"].append(ray.remote(TrainerRank).options(**options).remote(
                    a.index, world, a.backend, f"file://{rendezvous.resolve()}", self.run.student,
                    {**self.trainer_spec(), **memory_spec(a)}, str(out), log))
        # Start everything at once; report each role's start-up time.
        refs = {role: [x.setup.remote() if role == "trainer" else x.ready.remote() for x in self.actors[role]]
                for role in ROLES}
        owners = {ref: (role, f"{role}-{i}") for role, rs in refs.items() for i, ref in enumerate(rs)}
        limit = cfg.orchestrator.deadline.startup_s
        _, pending = ray.wait(list(owners), num_returns=len(owners), timeout=limit)
        if pending:  # a role that neither started nor failed within the deadline: hung
            role, actor = owners[pending[0]]
            raise self.deadlines.expired(role, actor, "start-up", 0, limit, limit)
        times = {f"time/startup_{role}": max(get(role, r)) for role, r in refs.items()}
        if self.transfer == "nccl":
            self._join_weight_group()
        self.write_pids()
        return times

    @property
    def colocation(self) -> Colocation:
        """The engines that sleep while the trainer steps (none unless placement.colocate put one beside it)."""
        return Colocation(self)

    def kill(self) -> None:
        for actors in self.actors.values():
            for actor in actors:
                try:
                    ray.kill(actor)
                except Exception:  # already gone
                    pass
        self.actors = {}

    def trainer_spec(self) -> dict[str, Any]:
        cfg, t, m, cont = self.cfg, self.cfg.trainer, self.cfg.model, self.cfg.orchestrator.continual
        return dict(
            seed=cfg.seed, dtype=m.dtype, lr=t.lr, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
            lr_schedule=t.lr_schedule, warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio,
            total_steps=cfg.max_steps,
            lora_rank=m.lora.rank, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
            lora_targets=list(m.lora.target_modules),
            mask_ratio_low=t.loss.mask_ratio_low, mask_ratio_high=t.loss.mask_ratio_high,
            ref_kl_coef=t.loss.ref_kl_coef, ref_kl_estimator=t.loss.ref_kl_estimator,
            entropy_coef=t.loss.entropy_coef,
            # the student's policy softmax(z / T) (shared/sampling.py) and the top-k estimator (trainer/topk.py)
            temperature=policy_temperature(cfg), topk_coef=t.loss.topk_coef if topk_in_loss(cfg) else 0.0,
            topk_reverse_weight=t.loss.topk_reverse_weight, logprob_floor=t.loss.logprob_floor,
            # how the weights leave the trainer; full fine-tuning (trainer/full.py): a whole model a step is big,
            # so only the newest two stay on disk, unless a continual gate may restore an older one
            finetune=t.finetune, weight_transfer=self.transfer,
            keep_full_steps=0 if cont.core_environments and cont.gate else 2,
        )

    # -- calls ---------------------------------------------------------------------------------------
    def sample_refs(self, role: str, prompt_ids: list[list[int]], first_index: int, n: int, temperature: float,
                    max_tokens: int | None = None, indices: list[int] | None = None) -> list:
        """Submit sampling to ``role``'s engines (prompts spread across them); the refs of their replies. The
        prompts' global indices are ``first_index, first_index + 1, ...`` unless ``indices`` gives them."""
        engines = self.teacher_engines() if role == "teacher" else list(enumerate(self.actors[role]))
        idx = indices if indices is not None else list(range(first_index, first_index + len(prompt_ids)))
        inf = self.cfg.inference
        return [self._owned(e.generate.remote(ids, ix, n, temperature, inf.top_p, max_tokens or inf.max_tokens,
                                              self.cfg.seed * 1_000_003), f"{role}-{i}")
                for (i, e), ids, ix in zip(engines, split(prompt_ids, len(engines)), split(idx, len(engines)))
                if ids]

    def teacher_engines(self, name: str | None = None) -> list[tuple[int, Any]]:
        """``(index, actor)`` of teacher ``name``'s actors among ``actors["teacher"]`` (None: the teacher of the
        run's own environment, :func:`shared.config.primary_teacher`); with one ``[teacher]``, every one."""
        names = [a.teacher for a in self.run.actors if a.role == "teacher"]
        want = name if name is not None else primary_teacher(self.cfg) if self.cfg.teachers else ""
        return [(i, e) for i, (e, n) in enumerate(zip(self.actors["teacher"], names)) if n == want]

    def _owned(self, ref: Any, actor: str) -> Any:
        self.owner[ref] = actor
        return ref

    def call(self, role: str, kind: str, refs: Any) -> Any:
        """The results of synchronous calls (evaluation, the teacher's answers, checkpoints), within the deadline
        of their kind; their duration counts towards it."""
        import time

        t0 = time.perf_counter()
        limit = self.deadlines.limit(kind)
        each = refs if isinstance(refs, list) else [refs]
        try:
            out = get(role, refs, timeout=limit, what=f"{kind} (deadline {limit:.0f} s)")
        except RoleFailure:
            for ref in each:  # which actor failed: its own error, named (the others are still pending or fine)
                if ray.wait([ref], timeout=0)[0]:
                    get(role, ref, actor=self.owner.get(ref, ""))
            raise
        self.deadlines.record(kind, time.perf_counter() - t0)
        for ref in each:
            self.owner.pop(ref, None)
        return out

    def score_refs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                   teachers: list[str] | None = None, topk: int = 0) -> tuple[list, list]:
        """Submit teacher scoring of each completion (spread across the teacher's actors): (refs, parts). With
        ``teachers`` (the name of each completion's teacher, ``TeacherBackend.route``) each goes to its own
        teacher's actors: one call per actor, the parts holding rollout indices so :func:`scores_of` merges the
        replies back in order. ``topk > 0``: the replies also carry the teacher's top-k tokens at each position
        (the top-k estimator, trainer/topk.py). A pair longer than ``model.max_model_len`` is never sent
        (:func:`orchestrator.skips.scorable`): it comes back unscored (None in :func:`scores_of`). With another
        teacher vocabulary, the teacher's own tokens are sent (:meth:`teacher_logprobs` maps their log-probs back)."""
        from orchestrator.skips import scorable

        prompt_ids, completion_ids = self.vocab.to_teacher(prompt_ids, completion_ids)
        fit = scorable(prompt_ids, completion_ids, self.cfg.model.max_model_len)
        names = teachers if teachers is not None else [None] * len(prompt_ids)
        refs, parts = [], []
        for name in dict.fromkeys(names[i] for i in fit):  # each teacher once, in order of first use
            engines = self.teacher_engines(name)
            for (k, e), part in zip(engines, split([i for i in fit if names[i] == name], len(engines))):
                if part:
                    parts.append(part)
                    refs.append(self._owned(e.score.remote(encode(ScoreRequest(
                        prompt_ids=[prompt_ids[i] for i in part],
                        completion_ids=[completion_ids[i] for i in part], topk=topk))), f"teacher-{k}"))
        return refs, parts

    def teacher_logprobs(self, scores: Scores, completion_ids: list[list[int]],
                         student_lp: list[list[float]] | None = None) -> list[list[float] | None]:
        """The decoded replies of :meth:`score_refs` (:func:`scores_of`) as teacher log-probs of each (student)
        completion token; None where unscored.  ``student_lp``: the sampler's log-probs (another vocabulary
        spreads a group by them)."""
        return self.vocab.to_student(completion_ids, scores.logprobs, student_lp)

    def train_refs(self, step: int, samples: list, total_tokens: int, micro_batch_size: int,
                   micro_batch_tokens: int = 0) -> list:
        """One optimizer step on every trainer rank, the samples dealt round robin (every rank runs the same
        number of micro-batches, for the collectives: counted here from the lengths each rank will pack)."""
        from trainer.packing import micro_batch_count

        ranks = self.actors["trainer"]
        shares = [samples[i::len(ranks)] for i in range(len(ranks))]
        micro = micro_batch_count([[len(s.input_ids) for s in sh] for sh in shares], micro_batch_size,
                                  micro_batch_tokens)
        return [self._owned(rank.train_step.remote(encode(TrainBatch(
                    step=step, samples=share, total_tokens=total_tokens, num_micro_batches=micro,
                    micro_batch_tokens=micro_batch_tokens))), f"trainer-{i}")
                for i, (rank, share) in enumerate(zip(ranks, shares))]

    def weight_update_refs(self, adapter: str, version: int, trained_step: int | None = None) -> list:
        """The engines load ``broadcast/step_N``, or (NCCL) receive what the trainer ranks send, all at once.
        With ``trained_step`` (the step just trained) and the ``memory`` transfer they merge the adapter trainer
        rank 0 still holds: its ``adapter_payload`` goes to every engine through Ray's object store, not the
        orchestrator (and ``persist_refs`` writes ``adapter`` afterwards)."""
        engines = self.actors["inference"]
        if trained_step is not None and self.transfer == "memory":
            payload = self.actors["trainer"][0].adapter_payload.remote(trained_step)
            return [self._owned(e.load_adapter_tensors.remote(payload, version), f"inference-{i}")
                    for i, e in enumerate(engines)]
        if self.transfer != "nccl":
            return [self._owned(e.load_adapter.remote(adapter, version), f"inference-{i}")
                    for i, e in enumerate(engines)]
        return ([self._owned(e.receive_weights.remote(self.weight_info, version), f"inference-{i}")
                 for i, e in enumerate(engines)]
                + [self._owned(r.send_weights.remote(version), f"trainer-{i}")
                   for i, r in enumerate(self.actors["trainer"])])

    def persist_refs(self, step: int) -> list:
        """``memory`` transfer: trainer rank 0 writes step ``step``'s adapter (already served) to disk."""
        if self.transfer != "memory":
            return []
        return [self._owned(self.actors["trainer"][0].persist.remote(step), "trainer-0")]

    def trainer_call(self, method: str, *args: Any) -> list:
        """The same call on every trainer rank; their results (within the deadline of ``method``)."""
        return self.call("trainer", method, [self._owned(getattr(r, method).remote(*args), f"trainer-{i}")
                                             for i, r in enumerate(self.actors["trainer"])])

    def _join_weight_group(self) -> None:
        """Trainer rank 0 and every engine open the NCCL weight-update group together (shared/weight_sync.py)."""
        from shared.weight_sync import plan as group_plan, update_info

        engines, trainers = self.actors["inference"], self.actors["trainer"]
        self.weight_info = update_info(get("trainer", trainers[0].weight_metadata.remote()))  # the same every step
        address, port = get("trainer", trainers[0].weight_endpoint.remote())
        group = group_plan(address, port, get("inference", [e.node_address.remote() for e in engines]),
                           self.cfg.inference.parallel.tp)
        refs = ([trainers[0].join_weight_group.remote(group.master_address, port, group.world_size)]
                + [e.join_weight_group.remote(group.engine_init(i)) for i, e in enumerate(engines)])
        get("weight_update", refs)

    def write_pids(self) -> None:
        """``logs/pids.json``: the process of every actor, by name (what an operator, or a test, can watch)."""
        names = {f"{role}-{i}": a for role, actors in self.actors.items() for i, a in enumerate(actors)}
        pids = get("orchestrator", [a.__ray_call__.remote(lambda actor: os.getpid()) for a in names.values()]) \
            if names else []
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "logs" / "pids.json",
                          json.dumps({"orchestrator-0": os.getpid(), **dict(zip(names, pids))}, indent=1) + "\n")


def memory_spec(a: ActorPlan) -> dict[str, Any]:
    """A colocated trainer rank's memory (shared/placement.py): ``gpu_memory_fraction`` caps torch's allocator
    while it steps; with engines asleep beside it, ``empty_cache`` after each step returns what its cache keeps
    beyond ``held`` before they wake. Nothing for a rank that has its GPU to itself."""
    if not a.memory:
        return {}
    return {"gpu_memory_fraction": a.memory, "empty_cache": a.held != a.memory}


def rollouts_of(replies: list[bytes], adapter_base: int) -> tuple[list, dict[int, int], float]:
    """The engines' replies as rollouts sorted by prompt index, the adapter step (of this run) that sampled
    each prompt, and the engines' own seconds on it (the slowest engine's: they run at once)."""
    rollouts, adapter_steps, seconds = [], {}, 0.0
    for data in replies:
        batch = decode(data, RolloutBatch)
        rollouts.extend(batch.rollouts)
        adapter_steps.update(dict.fromkeys((r.prompt_index for r in batch.rollouts), batch.adapter_step - adapter_base))
        seconds = max(seconds, batch.seconds)
    rollouts.sort(key=lambda r: r.prompt_index)
    return rollouts, adapter_steps, seconds


@dataclass
class Scores:
    """The teacher's replies to one batch's scoring calls (:meth:`Roles.score_refs`), decoded once."""

    logprobs: list[list[float] | None]  # per completion, in order; None where not scored
    topk: dict[int, tuple[list[list[int]], list[list[float]]]]  # completion index -> its top-k ids, log-probs
    seconds: float  # the teacher engines' own seconds (the slowest engine's: they run at once)

    def attach_topk(self, rollouts: list) -> None:
        """Put the teacher's top-k ids and log-probs of each scored rollout on it (``Rollout.teacher_topk_*``),
        where the replies carry them (``ScoreRequest.topk``); rollouts that were not scored keep none."""
        for i, (ids, lps) in self.topk.items():
            rollouts[i].teacher_topk_ids, rollouts[i].teacher_topk_logprobs = ids, lps


def scores_of(parts: list[list[int]], replies: list[bytes], n: int) -> Scores:
    """The replies of :meth:`Roles.score_refs` for ``n`` completions: teacher log-probs of each, None where an
    external teacher failed to score it or where it was not sent (longer than ``model.max_model_len``); the
    top-k of each scored one where asked for; the engines' own seconds."""
    out = Scores(logprobs=[None] * n, topk={}, seconds=0.0)
    for part, data in zip(parts, replies):
        result = decode(data, ScoreResult)
        out.seconds = max(out.seconds, result.seconds)
        for i, lps in zip(part, result.logprobs):
            out.logprobs[i] = lps
        for i, ids, lps in zip(part, result.topk_ids, result.topk_logprobs):
            out.topk[i] = (ids, lps)
        for k in result.failed:
            out.logprobs[part[k]] = None
            out.topk.pop(part[k], None)
    return out
