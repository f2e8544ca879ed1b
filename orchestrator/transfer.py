"""Metrics of the answer-comparator workflow: accuracy, cumulative reward, knowledge-transfer rate,
and the student/teacher parameter ratio (read from safetensors headers, no weights loaded).

Knowledge-transfer rate: ``(accuracy now − accuracy at the start) / (student samples seen / 1000)``,
i.e. accuracy points gained per 1k student samples.  "At the start" is ``start_accuracy`` when given
(e.g. a baseline evaluation before training), else the first step's accuracy; "now" is the accuracy over
the last ``window`` steps' samples; samples are counted from after the start measurement (so the rate
is 0 until a second step when the first step is the start).
"""

from __future__ import annotations

import json
import math
import struct
from collections import deque
from collections.abc import Sequence
from pathlib import Path

_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the header size


def safetensors_parameter_count(path: str | Path) -> int:
    """Elements of all tensors in one ``.safetensors`` file, from its JSON header only.

    Layout: 8 bytes little-endian u64 ``N``, then ``N`` bytes of JSON
    ``{name: {"dtype", "shape", "data_offsets"}, "__metadata__"?: {...}}``.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", head)
        if size > _MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file (header of {size} bytes)")
        raw = f.read(size)
    if len(raw) != size:
        raise ValueError(f"{path}: truncated safetensors header ({len(raw)} of {size} bytes)")
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{path}: safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"{path}: tensor {name!r} has no valid shape in the header")
        total += math.prod(shape)
    return total


def count_parameters(model_dir: str | Path) -> int:
    """Parameters of the model in ``model_dir``: the sum over its ``*.safetensors`` files (all shards).

    Tied weights are stored once by transformers, so this equals
    ``sum(p.numel() for p in model.parameters())`` of the loaded model.
    """
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir}: no *.safetensors files")
    return sum(safetensors_parameter_count(f) for f in files)


def parameter_ratio(student_dir: str | Path, teacher_dir: str | Path) -> float:
    """Student parameters / teacher parameters (base models, without any adapter)."""
    return count_parameters(student_dir) / count_parameters(teacher_dir)


class TransferTracker:
    """Per-step metrics of the comparator loop; :meth:`update` returns the row to log.

    Keys: ``comparator/accuracy`` (this step), ``comparator/accuracy_window`` (last ``window`` steps),
    ``comparator/cumulative_reward``, ``comparator/samples`` (all student samples so far),
    ``comparator/transfer_rate_per_1k`` and, when known, ``comparator/param_ratio``.
    """

    def __init__(self, start_accuracy: float | None = None, param_ratio: float | None = None, window: int = 1):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.start_accuracy = start_accuracy
        self.param_ratio = param_ratio
        self.samples = 0  # all student samples seen
        self.samples_since_start = 0  # samples after the start measurement
        self.cumulative_reward = 0.0
        self.steps = 0
        self._recent: deque[tuple[int, int]] = deque(maxlen=window)  # (correct, total) per step

    @property
    def accuracy(self) -> float | None:
        """Accuracy over the last ``window`` steps (None before the first step with samples)."""
        total = sum(n for _, n in self._recent)
        return sum(c for c, _ in self._recent) / total if total else None

    @property
    def transfer_rate(self) -> float:
        """Accuracy gained per 1000 student samples since the start (0.0 until there is a gain to measure)."""
        now = self.accuracy
        if now is None or self.start_accuracy is None or self.samples_since_start == 0:
            return 0.0
        return (now - self.start_accuracy) * 1000.0 / self.samples_since_start

    def update(self, correct: Sequence[bool], rewards: Sequence[float]) -> dict[str, float]:
        """Record one step: one ``correct`` flag per student sample, and the rewards given this step."""
        n, c = len(correct), sum(bool(x) for x in correct)
        self.steps += 1
        self.samples += n
        self.cumulative_reward += float(sum(rewards))
        if n:
            if self.start_accuracy is None:
                self.start_accuracy = c / n  # the first step is the start; its samples do not count
            else:
                self.samples_since_start += n
            self._recent.append((c, n))
        row = {
            "comparator/accuracy": c / n if n else float("nan"),
            "comparator/accuracy_window": self.accuracy if self.accuracy is not None else float("nan"),
            "comparator/cumulative_reward": self.cumulative_reward,
            "comparator/samples": float(self.samples),
            "comparator/transfer_rate_per_1k": self.transfer_rate,
        }
        if self.param_ratio is not None:
            row["comparator/param_ratio"] = self.param_ratio
        return row
