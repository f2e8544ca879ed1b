"""Learning-rate schedules against hand-computed values."""

import math

import pytest

from shared.config import ConfigError, load
from trainer.schedule import lr_multiplier


@pytest.mark.parametrize(
    ("step", "kind", "total", "warmup", "min_ratio", "expected"),
    [
        (0, "constant", 10, 0, 0.0, 1.0),
        (0, "constant", 10, 4, 0.0, 0.25),  # (0 + 1) / 4
        (3, "constant", 10, 4, 0.0, 1.0),
        (0, "cosine", 10, 0, 0.0, 1.0),  # cos(0) = 1 → 1
        (5, "cosine", 10, 0, 0.0, 0.5),  # halfway: (1 + cos(pi/2)) / 2 = 0.5
        (10, "cosine", 10, 0, 0.0, 0.0),  # (1 + cos(pi)) / 2 = 0
        (10, "cosine", 10, 0, 0.1, 0.1),  # floor
        (5, "cosine", 10, 0, 0.1, 0.55),  # 0.1 + 0.9 * 0.5
        (20, "cosine", 10, 0, 0.1, 0.1),  # past the end: stays at the floor
        (1, "cosine", 10, 4, 0.0, 0.5 * 0.5 * (1 + math.cos(math.pi * 0.1))),  # warm-up 2/4 times cosine
    ],
)
def test_lr_multiplier(step, kind, total, warmup, min_ratio, expected):
    assert lr_multiplier(step, kind, total, warmup, min_ratio) == pytest.approx(expected)


def test_schedule_config_keys():
    cfg = load(["--trainer.lr_schedule", "cosine", "--trainer.warmup_steps", "10", "--trainer.min_lr_ratio", "0.05"])
    assert (cfg.trainer.lr_schedule, cfg.trainer.warmup_steps, cfg.trainer.min_lr_ratio) == ("cosine", 10, 0.05)
    with pytest.raises(ConfigError, match="trainer.lr_schedule"):
        load(["--trainer.lr_schedule", "linear"])
    with pytest.raises(ConfigError, match="trainer.min_lr_ratio"):
        load(["--trainer.min_lr_ratio", "1.5"])
