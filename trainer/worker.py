"""One trainer rank: the student (transformers + peft LoRA) sharded with FSDP2 over gloo (CPU) or NCCL.

The orchestrator sends each rank its share of a :class:`TrainBatch` (msgpack bytes); all ranks run the
same number of micro-batches so the collectives line up.  The loss is the policy term plus the optional
terms the spec switches on (reference KL, lock-in / corrective NLL, entropy bonus; ``trainer/loss.py``),
each divided by the batch's policy tokens.  After the optimizer step the LoRA weights
are gathered (``full_tensor``) and rank 0 writes a peft adapter to ``broadcast/step_N`` atomically (with
``trainer.weight_transfer = "memory"`` the engines get it from rank 0's memory first, and the file is written
afterwards: ``adapter_payload``, ``persist``).
With ``trainer.finetune = "full"`` every weight trains and ``broadcast/step_N`` is a whole model
(``trainer/full.py``), or the weights go to the engines by NCCL broadcast (``shared/weight_sync.py``).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from shared.runtime import ADAPTER_COMPLETE, redirect_output
from trainer.loss import entropy, masked_nll, policy_loss, reference_kl, token_logprobs
from trainer.packing import pack, padded, plan_micro_batches, use_segment_attention
from trainer.schedule import lr_multiplier
from trainer.topk import packed_topk_tensors, support_logprobs, topk_kl, topk_tensors

if TYPE_CHECKING:  # msgspec is imported where bytes are decoded, so the step runs without it
    from shared.wire import TrainBatch


@contextlib.contextmanager
def _first_failure():
    """``torch.distributed.checkpoint`` raises a ``CheckpointException``: a BaseException (not an Exception)
    whose text is every rank's traceback. Raise the first rank's own error instead (e.g. ``OSError: [Errno 28]
    No space left on device``), which the run reports in one line like any other failure of the role."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        error = next((exc for exc, _ in e.failures.values() if isinstance(exc, Exception)), None)
        if error is None:
            raise
        raise error from None


class TrainerRank:
    def __init__(self, rank: int, world: int, backend: str, init_method: str, model_path: str, spec: dict,
                 output_dir: str, log_path: str):
        redirect_output(log_path)
        self.rank, self.world, self.backend = rank, world, backend
        self.init_method = init_method
        self.model_path = model_path
        self.spec = spec
        self.output_dir = Path(output_dir)
        # placement.colocate (shared/placement.py): this rank's share of its GPU, and whether engines sleep beside
        # it (then its cache is emptied after each step, so that only its weights and optimizer stay while they run)
        self.memory_fraction = float(spec.get("gpu_memory_fraction", 1.0))
        self.empty_cache = bool(spec.get("empty_cache", False))
        self.model = None
        self.last_step = 0  # the step whose weights the model holds (set by train_step and load_checkpoint)
        self.unsaved: tuple[int, dict] | None = None  # rank 0, "memory" transfer: (step, adapter) not on disk yet

    def setup(self) -> float:
        """Join the process group, load and shard the model; returns seconds taken."""
        import torch.distributed as dist
        from peft import LoraConfig, get_peft_model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        spec = self.spec
        torch.manual_seed(spec["seed"])
        if self.backend == "nccl":
            torch.cuda.set_device(0)  # each rank sees exactly its own GPU
            if self.memory_fraction < 1:  # a GPU shared with engines: torch's allocator stays within the share
                torch.cuda.set_per_process_memory_fraction(self.memory_fraction, 0)
            device_type = "cuda"
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))
            device_type = "cpu"
        dist.init_process_group(self.backend, init_method=self.init_method, rank=self.rank, world_size=self.world)
        mesh = init_device_mesh(device_type, (self.world,))
        dtype = getattr(torch, spec["dtype"])
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        self.reference = None  # full fine-tuning's frozen starting weights (trainer/full.py)
        if spec.get("finetune") == "full":
            from trainer import full

            model, self.reference = full.build(self.model_path, mesh, mp, device_type,
                                               reference=bool(spec.get("ref_kl_coef", 0.0)))
        else:
            model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32, use_safetensors=True)
            lora = LoraConfig(
                r=spec["lora_rank"],
                lora_alpha=spec["lora_alpha"],
                lora_dropout=spec["lora_dropout"],
                target_modules=spec["lora_targets"],
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, lora)
            if device_type == "cuda":
                model = model.to("cuda")
            for layer in model.base_model.model.model.layers:
                fully_shard(layer, mesh=mesh, mp_policy=mp)
            fully_shard(model, mesh=mesh, mp_policy=mp)
        for m in (model, self.reference):  # packed rows attend within each sequence only (trainer/packing.py)
            if m is not None:
                use_segment_attention(m)
        self.model = model
        self.device = torch.device(device_type)
        self._make_optimizer()
        self.pad_id = 0
        return time.perf_counter() - t0

    def _make_optimizer(self) -> None:
        spec = self.spec
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=spec["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(
            lr_multiplier, kind=spec.get("lr_schedule", "constant"), total=spec.get("total_steps", 1),
            warmup=spec.get("warmup_steps", 0), min_ratio=spec.get("min_lr_ratio", 0.0)))

    def reset(self, spec: dict, output_dir: str) -> str:
        """A session's next run (``orchestrator/api.py``): a fresh LoRA adapter drawn from ``spec["seed"]``, a
        new optimizer and schedule from ``spec``, adapters written under ``output_dir``.  Returns the path of
        ``broadcast/step_0`` (written here; B = 0, so it computes exactly the base model).

        The draw is peft's default initialisation (``lora_A`` Kaiming-uniform with a = sqrt(5), ``lora_B``
        zero) from a generator seeded by the run alone, so a run's start does not depend on the runs before
        it.  Every rank draws the same full tensors and keeps its own shard."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        fixed = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "dtype")
        changed = [k for k in fixed if spec.get(k) != self.spec.get(k)]
        if changed:
            raise ValueError(f"reset: {', '.join(changed)} cannot change after setup (the model is built with them)")
        # on top of the setup's spec: what a run does not restate (a colocated rank's memory caps) stays
        self.spec, self.output_dir = {**self.spec, **spec}, Path(output_dir)
        torch.manual_seed(spec["seed"])
        gen = torch.Generator().manual_seed(spec["seed"])
        fresh = {}
        for name, p in self.model.named_parameters():
            if "lora_A" in name:
                fresh[name] = torch.nn.init.kaiming_uniform_(torch.empty(p.shape), a=math.sqrt(5), generator=gen)
            elif "lora_B" in name:
                fresh[name] = torch.zeros(p.shape)
        set_model_state_dict(self.model, fresh, options=StateDictOptions(full_state_dict=True, strict=False))
        self._make_optimizer()
        self.unsaved = None
        return str(self.save_adapter(0))

    # ------------------------------------------------------------------------------------------
    def _chunks(self, batch) -> list[list]:
        """This rank's micro-batches, exactly ``batch.num_micro_batches`` of them (empty ones padded in).

        By sequence count (``micro_batch_tokens = 0``): dealt round-robin.  By tokens: the
        :func:`~trainer.packing.plan_micro_batches` plan, which the orchestrator counted from the same lengths.
        """
        samples, n = batch.samples, batch.num_micro_batches
        budget = getattr(batch, "micro_batch_tokens", 0)
        if not budget:
            return [samples[i::n] for i in range(n)]
        plan = plan_micro_batches([len(s.input_ids) for s in samples], budget)
        if len(plan) > n:  # the ranks would disagree on the number of collectives: fail, never hang
            raise ValueError(f"{len(plan)} packed micro-batches of {budget} tokens on rank {self.rank}, but the "
                             f"batch allows {n}")
        return [[samples[i] for i in b] for b in plan] + [[] for _ in range(n - len(plan))]

    def train_step(self, batch_bytes: bytes) -> bytes:
        """One optimizer step on a msgpack :class:`TrainBatch`: :meth:`accumulate`, :meth:`apply_update`,
        then the adapter published; returns a msgpack :class:`StepResult`."""
        from shared.wire import SUMMED_METRICS, StepResult, TrainBatch, decode, encode  # msgspec: the wire only

        batch = decode(batch_bytes, TrainBatch)
        t0 = time.perf_counter()
        totals = self.accumulate(batch)
        t_update = time.perf_counter()
        update = self.apply_update()
        t_done = time.perf_counter()
        train_seconds = t_done - t0
        adapter = self._publish(batch.step)
        if self.empty_cache and self.backend == "nccl":  # engines wake on this GPU next: hand back the cache
            torch.cuda.empty_cache()
        metrics = {
            **dict.fromkeys(SUMMED_METRICS, 0.0),
            **totals,
            **update,
            "time/trainer_compute": train_seconds,
            "time/trainer_update": t_done - t_update,  # clipping and AdamW: a part of trainer_compute
            "time/adapter_save": time.perf_counter() - t0 - train_seconds,
        }
        return encode(StepResult(step=batch.step, metrics=metrics, adapter_path=str(adapter)))

    def accumulate(self, batch: TrainBatch) -> dict[str, float]:
        """Forward and backward of each micro-batch of ``batch``; the gradients stay on the parameters.

        ``batch`` is a :class:`TrainBatch` or anything with its fields (``scripts/gpu_check.py`` passes
        plain objects: no msgspec there).  Returns the summed metrics (``SUMMED_METRICS``'s keys that
        occurred)."""
        spec = self.spec
        model = self.model
        model.train()
        samples = batch.samples
        chunks = self._chunks(batch)
        packed = bool(getattr(batch, "micro_batch_tokens", 0))
        ref_coef, ent_coef = float(spec.get("ref_kl_coef", 0.0)), float(spec.get("entropy_coef", 0.0))
        topk_coef, floor = float(spec.get("topk_coef", 0.0)), float(spec.get("logprob_floor", -20.0))
        # the student's policy is softmax(z / T) at the sampling temperature T (shared/sampling.py); T = 1: as is
        temperature = float(spec.get("temperature", 1.0))
        n_tokens = float(max(batch.total_tokens, 1))  # every term's normaliser: policy tokens across ranks
        totals: dict[str, float] = defaultdict(float)
        for k, chunk in enumerate(chunks):
            weight = 1.0
            if not chunk:  # keep collectives aligned across ranks: a zero-weight pass on the shortest sample
                chunk, weight = [min(samples, key=lambda s: len(s.input_ids))], 0.0
            mb = pack(chunk, self.device) if packed else padded(chunk, self.pad_id, self.device)
            mask, lockin, corrective = mb.mask * weight, mb.lockin * weight, mb.corrective * weight
            model.set_requires_gradient_sync(k == len(chunks) - 1)
            if ref_coef:  # the frozen reference: the LoRA adapter switched off, or full FT's frozen copy
                with torch.no_grad(), self._reference() as ref:
                    ref_logits = ref(**mb.model_kwargs).logits
                    if temperature != 1.0:
                        ref_logits = ref_logits / temperature
                    ref_lp = token_logprobs(ref_logits, mb.targets)
            logits = model(**mb.model_kwargs).logits  # [B, M, V]: only the positions that predict a target
            if temperature != 1.0:
                logits = logits / temperature
            logp = token_logprobs(logits, mb.targets)
            loss, stats = policy_loss(
                logp, mb.inference_logprobs, mb.advantages, mask, spec["mask_ratio_low"], spec["mask_ratio_high"],
                n_tokens,
            )
            terms = {"loss/policy": loss}
            if ref_coef:
                kl = mask * reference_kl(logp, ref_lp, spec.get("ref_kl_estimator", "k3"))
                terms["loss/ref_kl"] = ref_coef * kl.sum() / n_tokens
                totals["ref_kl_sum"] += float(kl.detach().sum())
            if bool(lockin.any()):
                terms["loss/lockin"] = masked_nll(logp, lockin, n_tokens)
            if bool(corrective.any()):
                terms["loss/corrective"] = masked_nll(logp, corrective, n_tokens)
            topk = None
            if topk_coef:  # laid out like the micro-batch's per-token arrays, packed or padded
                topk = (packed_topk_tensors(chunk, floor) if packed else
                        topk_tensors(chunk, mb.model_kwargs["input_ids"].shape[1],
                                     int(mb.model_kwargs["logits_to_keep"][0]), floor))
            if topk is not None:  # the top-k estimator (trainer/topk.py): an exact KL over the teacher's top k + tail
                s_lp, s_tail = support_logprobs(logits, topk[0].to(self.device))
                kl = mask * topk_kl(s_lp, s_tail, topk[1].to(self.device), float(spec["topk_reverse_weight"]), floor)
                terms["loss/topk"] = topk_coef * kl.sum() / n_tokens
                totals["topk_kl_sum"] += float(kl.detach().sum())
            if ent_coef:
                ent = mask * entropy(logits)
                terms["loss/entropy"] = -ent_coef * ent.sum() / n_tokens  # a bonus: more entropy, lower loss
                totals["entropy_sum"] += float(ent.detach().sum())
            # FSDP averages gradients over ranks; every term is already normalised by the global count.
            (sum(terms.values()) * self.world).backward()
            for name, term in terms.items():
                totals[name] += float(term.detach())
            totals["masked_low"] += stats["masked_low"]
            totals["masked_high"] += stats["masked_high"]
            totals["ratio_sum"] += stats["ratio_mean"] * stats["tokens"]
            totals["tokens"] += stats["tokens"]
        return dict(totals)

    def apply_update(self) -> dict[str, float]:
        """Clip the accumulated gradients, step AdamW (unless the norm is not finite or exactly 0), zero the
        gradients and advance the schedule; returns ``grad_norm``, ``lr``, ``skipped_step``, ``zero_grad_step``."""
        spec, model = self.spec, self.model
        params = [p for p in model.parameters() if p.requires_grad]
        max_norm = spec["max_grad_norm"] or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        skipped = not math.isfinite(grad_norm)  # global (all-reduced): every rank decides alike
        # Nothing to learn (every advantage 0 and no other term, e.g. RL with no rewarded sample): AdamW would
        # still move the weights on its momentum and weight decay, so the step is not applied.
        zero = grad_norm == 0.0
        if skipped or zero:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()  # a skipped step still advances the schedule: it follows the step number
        return {"grad_norm": grad_norm, "lr": lr, "skipped_step": float(skipped), "zero_grad_step": float(zero)}

    # -- checkpoints (orchestrator/checkpoint.py assembles the directory) --------------------------
    def _state(self) -> dict:
        """The trainable (LoRA) weights and the AdamW state, as this rank's DTensor shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model, optim = get_state_dict(self.model, self.optimizer, options=StateDictOptions(ignore_frozen_params=True))
        return {"model": model, "optim": optim}

    def save_checkpoint(self, directory: str) -> float:
        """Write this rank's shards (``directory/trainer``, a collective: every rank calls it) and its
        scheduler and RNG state (``trainer/rank_R.pt``); returns seconds taken."""
        import random

        import torch.distributed.checkpoint as dcp

        t0 = time.perf_counter()
        where = Path(directory) / "trainer"
        with _first_failure():
            dcp.save(self._state(), checkpoint_id=str(where))
        extra = {
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if self.backend == "nccl" else None,
            "python_rng": random.getstate(),
        }
        torch.save(extra, where / f"rank_{self.rank}.pt")
        if self.spec.get("weight_transfer") == "nccl":  # the step's weights on disk too, for export and resume
            if not (self.output_dir / "broadcast" / f"step_{self.last_step}" / ADAPTER_COMPLETE).exists():
                self.save_adapter(self.last_step)
        return time.perf_counter() - t0

    def load_checkpoint(self, directory: str, step: int) -> float:
        """Restore the weights, optimizer, scheduler and RNG of ``directory`` (after :meth:`setup`), and
        rewrite ``broadcast/step_N`` from them, so the engines can serve exactly the resumed adapter."""
        import random

        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        t0 = time.perf_counter()
        where = Path(directory) / "trainer"
        state = self._state()
        with _first_failure():
            dcp.load(state, checkpoint_id=str(where))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))  # frozen: from setup
        extra = torch.load(where / f"rank_{self.rank}.pt", weights_only=True)
        self.scheduler.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["torch_rng"])
        if extra["cuda_rng"] is not None and self.backend == "nccl":
            torch.cuda.set_rng_state(extra["cuda_rng"])
        version, internal, gauss = extra["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        self.last_step, self.unsaved = step, None
        self.save_adapter(step)
        return time.perf_counter() - t0

    def save_adapter(self, step: int) -> Path:
        """Gather the LoRA weights (a collective) and let rank 0 write ``broadcast/step_N`` atomically
        (with full fine-tuning: every weight, as a model directory; ``trainer/full.py``)."""
        if self.spec.get("finetune") == "full":
            from trainer import full

            return full.write_model_dir(self.model, self.model_path, self.output_dir / "broadcast" / f"step_{step}",
                                        step, self.rank, getattr(torch, self.spec["dtype"]),
                                        keep=self.spec.get("keep_full_steps", 0))
        return self._write_adapter(step, self._gather_adapter())

    def _gather_adapter(self) -> dict[str, torch.Tensor]:
        """Every LoRA weight in full, float32 on the CPU (``full_tensor`` is a collective: every rank calls it)."""
        state = {}
        for name, p in self.model.named_parameters():
            if "lora_" in name:
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                state[name] = full.detach().to("cpu", torch.float32).contiguous()
        return state

    def _write_adapter(self, step: int, state: dict[str, torch.Tensor]) -> Path:
        """Rank 0 writes ``state`` as a peft adapter to ``broadcast/step_N``: into a temporary directory, the
        ``COMPLETE`` marker last, then renamed; the other ranks write nothing."""
        final = self.output_dir / "broadcast" / f"step_{step}"
        if self.rank == 0:
            tmp = final.with_name(f".step_{step}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                self.model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
                (tmp / ADAPTER_COMPLETE).write_text(str(step))
            except OSError:  # a full disk: no half-written adapter left to fill it further
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        return final

    # -- the adapter from memory (trainer.weight_transfer = "memory") --------------------------------------
    def adapter_payload(self, step: int) -> dict:
        """Rank 0: step ``step``'s adapter for the engines (``InferenceEngine.load_adapter_tensors``), through Ray's
        object store: one flat buffer (``shared/adapter_payload.py``), the tensors named as in
        ``adapter_model.safetensors``."""
        from peft.utils import get_peft_model_state_dict

        from shared.adapter_payload import lora_scale, pack

        if self.unsaved is None or self.unsaved[0] != step:
            held = "none" if self.unsaved is None else f"step {self.unsaved[0]}"
            raise RuntimeError(f"adapter_payload: step {step} asked, rank {self.rank} holds {held}")
        tensors = get_peft_model_state_dict(self.model, state_dict=self.unsaved[1])
        return pack(step, lora_scale(self.model.peft_config["default"].to_dict()), tensors)

    def persist(self, step: int) -> float:
        """Rank 0: write step ``step``'s adapter, which the engines already serve from memory, to
        ``broadcast/step_N`` (for export, the continual gate and the report); seconds taken.  The orchestrator
        asks after the weight update, so this runs while the next batch is sampled."""
        t0 = time.perf_counter()
        if self.unsaved is not None and self.unsaved[0] == step:
            self._write_adapter(step, self.unsaved[1])
            self.unsaved = None
        return time.perf_counter() - t0

    # -- full fine-tuning (trainer/full.py) and its NCCL weight transfer (shared/weight_sync.py) ----------
    @contextlib.contextmanager
    def _reference(self):
        """The model that gives the reference log-probs: full FT's frozen copy, or this one with LoRA off."""
        if self.reference is not None:
            yield self.reference
        else:
            with self.model.disable_adapter():
                yield self.model

    def _publish(self, step: int) -> Path:
        """After a step: ``broadcast/step_N`` on disk.  With the NCCL transfer the engines get the weights from
        :meth:`send_weights` instead, and only the last step's are written (for ``rl export``); from memory
        (``"memory"``) rank 0 keeps them for :meth:`adapter_payload` and writes them in :meth:`persist`."""
        self.last_step = step
        if self.spec.get("weight_transfer") == "nccl" and step < self.spec.get("total_steps", 0):
            return self.output_dir / "broadcast" / f"step_{step}"
        if self.spec.get("weight_transfer") == "memory":  # sent by adapter_payload, written by persist
            state = self._gather_adapter()
            self.unsaved = (step, state) if self.rank == 0 else None
            return self.output_dir / "broadcast" / f"step_{step}"
        return self.save_adapter(step)

    def weight_endpoint(self) -> tuple[str, int]:
        """Rank 0: this node's address and a free port for the weight-update group's rendezvous."""
        from shared.weight_sync import free_port, node_address

        return node_address(), free_port()

    def weight_metadata(self) -> list[tuple[str, str, list[int]]]:
        from trainer import full

        return full.metadata(self.model, getattr(torch, self.spec["dtype"]))

    def join_weight_group(self, address: str, port: int, world_size: int) -> None:
        """Rank 0 opens the weight-update group as its rank 0 (the engines join concurrently); others do nothing."""
        if self.rank == 0:
            from shared.weight_sync import trainer_join

            self.weight_group = trainer_join(address, port, world_size)

    def send_weights(self, step: int) -> float:
        """Every rank gathers each full parameter (a collective); rank 0 broadcasts it to the engines."""
        from shared.weight_sync import broadcast_all
        from trainer import full

        t0 = time.perf_counter()
        tensors = full.full_tensors(self.model, getattr(torch, self.spec["dtype"]))
        if self.rank == 0:
            broadcast_all(self.weight_group, tensors, self.weight_metadata())
        else:
            for _ in tensors:
                pass
        return time.perf_counter() - t0
