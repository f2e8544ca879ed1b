"""Checkpoints: ``<output_dir>/checkpoints/step_N/``, valid only when complete.

A checkpoint is assembled in ``checkpoints/.step_N.tmp/``: each trainer rank writes its shard of the
trainable weights (the LoRA adapter, or every weight with ``trainer.finetune = "full"``) and the AdamW state (``torch.distributed.checkpoint``, one file per rank, under
``trainer/``) plus its scheduler and RNG state (``trainer/rank_R.pt``); the orchestrator writes its own
state (``orchestrator.msgpack``: the step, the prompt stream's position and RNG, the buffer of rollouts
sampled ahead, the evaluation history, counters); then a ``COMPLETE`` marker, and the directory is
renamed into place.  A crash at any point leaves either no ``step_N`` or a complete one;
:func:`latest` only ever returns complete ones, and leftover ``.tmp`` directories are removed.

Committing also signs the checkpoint (``MANIFEST.json``: every file's SHA-256 under an HMAC key kept outside
the output directory, ``ckpt_sign.py``), and ``--resume`` verifies it before it reads anything in it
(:func:`require_latest`): a changed, unsigned or foreign checkpoint is refused in one line unless
``ckpt.trust_unsigned`` is set.

``--resume`` takes the newest complete checkpoint, cuts ``metrics.jsonl`` back to the rows of the steps
it covers (:func:`truncate_metrics`: rows of later steps, written before a crash, would otherwise
appear twice) and continues with the next step.
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import msgspec

from orchestrator import ckpt_sign
from shared.config import Config, ConfigError
from shared.fsutil import _fsync_dir, atomic_write_bytes, atomic_write_text
from shared.metrics import read_metrics

COMPLETE = "COMPLETE"
ORCHESTRATOR_FILE = "orchestrator.msgpack"

# Keys that may differ between the run that wrote a checkpoint and the run resuming from it; any other
# difference is refused (same seed, data, model and loss, or the resumed steps would be a different run).
RESUMABLE_CHANGES = ("max_steps", "output_dir", "ray_address", "dry_run", "resume", "wandb", "ckpt",
                     "orchestrator.max_async_level", "orchestrator.drain_timeout",
                     "inference.gpu_ids", "teacher.gpu_ids", "trainer.gpu_ids",
                     "trainer.weight_transfer")  # the same weights reach the engines either way


def root(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def _step_of(path: Path) -> int | None:
    tail = path.name.removeprefix("step_")
    return int(tail) if path.name.startswith("step_") and tail.isdigit() else None


def complete(out: str | Path) -> list[tuple[int, Path]]:
    """Every complete checkpoint, oldest first."""
    found = []
    base = root(out)
    if base.is_dir():
        for d in base.iterdir():
            step = _step_of(d)
            if step is not None and d.is_dir() and (d / COMPLETE).is_file():
                found.append((step, d))
    return sorted(found)


def latest(out: str | Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint ``(step, directory)``, or None."""
    found = complete(out)
    return found[-1] if found else None


def require_latest(out: str | Path, trust_unsigned: bool = False) -> tuple[int, Path]:
    """:func:`latest`, verified against its signed manifest (:func:`ckpt_sign.verify`; skipped with
    ``trust_unsigned``), or a one-line ConfigError naming the directory searched or what failed."""
    found = latest(out)
    if found is None:
        raise ConfigError(f"resume: no complete checkpoint in {root(out)} (set ckpt.interval to write them)")
    ckpt_sign.verify(found[1], trust_unsigned)
    return found


def begin(out: str | Path, step: int) -> Path:
    """A fresh, empty temporary directory for the checkpoint of ``step``."""
    tmp = root(out) / f".step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(out: str | Path, step: int, tmp: Path, keep: int) -> Path:
    """Mark ``tmp`` complete, sign it (``MANIFEST.json``, over every file including ``COMPLETE``) and rename it
    to ``checkpoints/step_N``; then keep the newest ``keep``."""
    atomic_write_text(tmp / COMPLETE, f"{step}\n")
    ckpt_sign.sign(tmp, step)
    _fsync_dir(tmp)
    final = root(out) / f"step_{step}"
    if final.exists():  # a step rewritten after a resume: swap, so a complete step_N exists throughout
        old = final.with_name(f".step_{step}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    prune(out, keep)
    return final


def prune(out: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and leftovers of interrupted writes."""
    base = root(out)
    for _, d in complete(out)[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
    for d in base.glob(".step_*.old"):
        shutil.rmtree(d, ignore_errors=True)


def remove_partial(out: str | Path) -> None:
    """Remove temporary directories of checkpoints that were never completed (a killed run's)."""
    for d in root(out).glob(".step_*.tmp"):
        shutil.rmtree(d, ignore_errors=True)


def truncate_metrics(path: str | Path, step: int) -> int:
    """Rewrite ``metrics.jsonl`` without the rows of steps after ``step`` (and without torn lines);
    returns the number of lines removed.  The rewrite is atomic; rows are written back as the logger wrote
    them (``json.dumps``)."""
    p = Path(path)
    if not p.exists():
        return 0
    lines = sum(1 for line in p.read_text(encoding="utf-8", errors="replace").split("\n") if line.strip())
    kept = [r for r in read_metrics(p) if not (isinstance(r.get("step"), int) and r["step"] > step)]
    atomic_write_text(p, "".join(json.dumps(r) + "\n" for r in kept))
    return lines - len(kept)


def check_compatible(saved: dict[str, Any], cfg: Config) -> None:
    """A ConfigError naming the first key (other than :data:`RESUMABLE_CHANGES`) whose value differs."""
    now = msgspec.to_builtins(cfg)

    def walk(a: Any, b: Any, path: str) -> None:
        if any(path == k or path.startswith(k + ".") for k in RESUMABLE_CHANGES):
            return
        if path.startswith("teachers.") and path.endswith(".gpu_ids"):  # a named teacher's GPU ids, as teacher.gpu_ids
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        elif a != b:
            raise ConfigError(f"resume: {path} is {json.dumps(b)} but the checkpoint was written with "
                              f"{json.dumps(a)}; resume with the same config (only max_steps, ckpt.*, wandb.*, "
                              "orchestrator.max_async_level and GPU ids may change)")

    walk(saved, now, "")
    if len(saved.get("trainer", {}).get("gpu_ids", [])) != len(cfg.trainer.gpu_ids):
        raise ConfigError("resume: trainer.gpu_ids: the checkpoint has one shard per trainer rank; keep their number")


# -- the orchestrator's state ----------------------------------------------------------------------
# The attributes that make up a resumable object's state, by class name (the first match along its MRO);
# everything else is rebuilt from the config.  Nested objects, random.Random, sets and deques are handled.
STATE_ATTRS: dict[str, tuple[str, ...]] = {
    "Environment": ("position", "rng", "data_digest"),  # prompts handed out, the generator's RNG, the data file
    "ReplayMix": ("position", "turn", "main", "cores"),
    "TeacherQuestions": ("buffer", "seen", "requests", "empty_replies", "position"),
    "CoreSuite": ("start", "last_pass_step", "regressions"),
    "JudgeReward": ("unparseable_total",),
    "ComparatorReward": ("tracker",),
    "TransferTracker": ("start_accuracy", "samples", "samples_since_start", "cumulative_reward", "steps",
                        "_recent"),
    "RewardSource": (),
}


def _attrs(obj: Any) -> tuple[str, ...] | None:
    for cls in type(obj).__mro__:
        if cls.__name__ in STATE_ATTRS:
            return STATE_ATTRS[cls.__name__]
    return None


def state_of(obj: Any) -> Any:
    """A msgpack-able snapshot of ``obj`` (see :data:`STATE_ATTRS`)."""
    if isinstance(obj, random.Random):
        version, internal, gauss = obj.getstate()
        return {"__random__": [version, list(internal), gauss]}
    if isinstance(obj, set):
        return {"__set__": sorted(obj)}
    if isinstance(obj, collections.deque):
        return {"__deque__": [state_of(x) for x in obj], "maxlen": obj.maxlen}
    if isinstance(obj, (list, tuple)):
        return [state_of(x) for x in obj]
    if isinstance(obj, dict):
        return {k: state_of(v) for k, v in obj.items()}
    attrs = _attrs(obj)
    if attrs is not None:
        return {"__obj__": type(obj).__name__, **{a: state_of(getattr(obj, a)) for a in attrs}}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint: cannot snapshot a {type(obj).__name__}")


def restore(obj: Any, state: Any) -> Any:
    """Load a :func:`state_of` snapshot: objects and RNGs in place; returns the value to assign."""
    if isinstance(state, dict) and "__random__" in state:
        version, internal, gauss = state["__random__"]
        obj = obj if isinstance(obj, random.Random) else random.Random()
        obj.setstate((version, tuple(internal), gauss))
        return obj
    if isinstance(state, dict) and "__set__" in state:
        return set(state["__set__"])
    if isinstance(state, dict) and "__deque__" in state:
        return collections.deque((restore(None, x) for x in state["__deque__"]), maxlen=state["maxlen"])
    if isinstance(state, dict) and "__obj__" in state:
        if obj is None or type(obj).__name__ != state["__obj__"]:
            raise ConfigError(f"resume: the checkpoint holds a {state['__obj__']} where this run has a "
                              f"{type(obj).__name__}")
        for attr, value in state.items():
            if attr != "__obj__":
                setattr(obj, attr, restore(getattr(obj, attr), value))
        return obj
    if isinstance(state, list):
        if isinstance(obj, list) and len(obj) == len(state) and all(_attrs(x) is not None for x in obj):
            return [restore(o, s) for o, s in zip(obj, state)]  # e.g. ReplayMix.cores, in place
        return [restore(None, s) for s in state]
    if isinstance(state, dict):
        return {k: restore(None, v) for k, v in state.items()}
    return state


def write_state(tmp: Path, state: dict[str, Any]) -> None:
    """The orchestrator's part (msgpack keeps every float exact, NaN and -inf included)."""
    atomic_write_bytes(tmp / ORCHESTRATOR_FILE, msgspec.msgpack.encode(state))


def read_state(directory: Path) -> dict[str, Any]:
    return msgspec.msgpack.decode((directory / ORCHESTRATOR_FILE).read_bytes())
