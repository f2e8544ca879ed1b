"""Model names → local directories: built-in aliases are built or converted once and cached."""

from __future__ import annotations

import json
from pathlib import Path

from shared.config import ConfigError

TINY_ALIASES = {"tiny-reverse-teacher": 0, "tiny-reverse-student": 1}
ALIASES = [*TINY_ALIASES, "smollm2-135m-instruct", "smollm2-135m-instruct-every<k>"]


def resolve(name: str, key: str) -> Path:
    """A model directory for ``name`` (alias or path); ``key`` names the config key in errors."""
    if name in TINY_ALIASES:
        from shared.tiny_pair import build_pair

        return build_pair()[TINY_ALIASES[name]]
    if name.startswith("smollm2-"):
        from shared import smollm2

        path = smollm2.resolve_alias(name)
        if path is None:
            raise ConfigError(f"{key}: unknown alias {name!r} (known: {', '.join(smollm2.ALIAS_NAMES)})")
        return path
    path = Path(name).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}: model path {name!r} does not exist (nor is it an alias: {', '.join(ALIASES)})")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}: {name!r} is not a model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"{key}: {name!r} has no *.safetensors weights (only safetensors are loaded)")
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {path / 'config.json'} is not valid JSON ({e})") from None
    return path


def check_same_vocab(student_dir: Path, teacher_dir: Path) -> None:
    """On-policy scoring feeds the student's token ids to the teacher: the vocabularies must match."""
    from transformers import AutoTokenizer

    s = AutoTokenizer.from_pretrained(str(student_dir))
    t = AutoTokenizer.from_pretrained(str(teacher_dir))
    if s.get_vocab() != t.get_vocab():
        raise ConfigError(
            f"teacher.name: the teacher's tokenizer ({teacher_dir}) differs from the student's ({student_dir}); "
            "on-policy scoring reuses the student's token ids, so the vocabularies must match exactly "
            "(use a teacher of the same family, or distil off-policy from teacher-written answers)"
        )
