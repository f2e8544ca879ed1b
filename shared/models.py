"""Model names → local directories: built-in aliases are built or converted once and cached.

Also the checks that a directory really is a usable model (config, safetensors weights, tokenizer)
and that teacher and student share one vocabulary; every failure is a one-line :class:`ConfigError`
naming the config key (``model.name`` / ``teacher.name``) and the path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.config import ConfigError

TINY_ALIASES = {"tiny-reverse-teacher": 0, "tiny-reverse-student": 1}
LONG_ALIASES = {"tiny-long-teacher": 0, "tiny-long-student": 1}  # the running-sum pair (shared/builders/tiny_long.py)
PAIRS_ALIAS = "tiny-reverse-teacher-pairs"  # the tiny teacher with a letter-pair vocabulary (builders/tiny_cross_vocab.py)
# The tiny task's yes/no verifiers (a judge for verdict = "loglik"), by the labeler their training data used
# and the judge prompt's layout (shared/builders/tiny_verifier.py: "ref" also sees the reference answer).
VERIFIER_ALIASES = {
    "tiny-reverse-verifier": {"labeler": "exact"}, "tiny-reverse-verifier-length": {"labeler": "length"},
    "tiny-reverse-verifier-ref": {"labeler": "exact", "layout": "reference"},
}
ALIASES = [*TINY_ALIASES, *LONG_ALIASES, PAIRS_ALIAS, *VERIFIER_ALIASES, "smollm2-135m-instruct",
           "smollm2-135m-instruct-every<k>"]
# Any one of these makes a directory loadable by AutoTokenizer (fast, sentencepiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def resolve(name: str, key: str) -> Path:
    """A model directory for ``name`` (alias or path); ``key`` names the config key in errors."""
    if name in TINY_ALIASES:
        from shared.builders.tiny_pair import build_pair

        return build_pair()[TINY_ALIASES[name]]
    if name in LONG_ALIASES:
        from shared.builders import tiny_long

        return tiny_long.build_pair()[LONG_ALIASES[name]]
    if name == PAIRS_ALIAS:
        from shared.builders.tiny_cross_vocab import build_teacher

        return build_teacher()
    if name in VERIFIER_ALIASES:
        from shared.builders.tiny_verifier import build_verifier

        return build_verifier(**VERIFIER_ALIASES[name])
    if name.startswith("smollm2-"):
        from shared.builders import smollm2

        path = smollm2.resolve_alias(name)
        if path is None:
            raise ConfigError(f"{key}: unknown alias {name!r} (known: {', '.join(smollm2.ALIAS_NAMES)})")
        return path
    path = Path(name).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}: model path {name!r} does not exist (nor is it an alias: {', '.join(ALIASES)})")
    if not path.is_dir():
        raise ConfigError(f"{key}: {name!r} is a file, not a model directory")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}: {name!r} is not a model directory (no config.json)")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {path / 'config.json'} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ConfigError(f"{key}: {path / 'config.json'} is not a transformers model config (no model_type)")
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        extra = f"; found {', '.join(found[:3])}, which are not loaded (pickle)" if found else ""
        raise ConfigError(f"{key}: {name!r} has no *.safetensors weights (only safetensors are loaded{extra})")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"{key}: {name!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    return path


def is_built(name: str) -> bool:
    """Whether :func:`resolve` of ``name`` is cheap: a path (checked by ``resolve``), or an alias already
    built or converted in the cache (``resolve`` would otherwise build it, minutes of work)."""
    if name in TINY_ALIASES:
        from shared.builders import tiny_pair

        return tiny_pair.is_built(tiny_pair.default_root() / tiny_pair.pair_dir_names()[TINY_ALIASES[name]])
    if name in LONG_ALIASES:
        from shared.builders import tiny_long

        return tiny_long.is_built()
    if name == PAIRS_ALIAS:
        from shared.builders import tiny_cross_vocab

        return tiny_cross_vocab.is_built()
    if name in VERIFIER_ALIASES:
        from shared.builders import tiny_pair, tiny_verifier

        return tiny_pair.is_built(tiny_pair.default_root() / tiny_verifier.dir_name(**VERIFIER_ALIASES[name]))
    if name.startswith("smollm2-"):
        from shared.builders import smollm2

        return smollm2.is_cached(name)
    return True


def load_tokenizer(model_dir: Path, key: str) -> Any:
    """The directory's tokenizer; a failure to load it is a ConfigError naming ``key``."""
    from transformers import AutoTokenizer

    from shared.runtime import first_line

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises anything from OSError to KeyError on a broken folder
        raise ConfigError(f"{key}: cannot load the tokenizer in {model_dir} ({first_line(e, 200)})") from None


def check_same_vocab(student_dir: Path, teacher_dir: Path, student_tok: Any = None, teacher_tok: Any = None) -> None:
    """On-policy scoring feeds the student's token ids to the teacher: the vocabularies must match.
    Pass already loaded tokenizers to skip loading them again."""
    student_tok = student_tok or load_tokenizer(student_dir, "model.name")
    teacher_tok = teacher_tok or load_tokenizer(teacher_dir, "teacher.name")
    s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s == t:
        return
    differ = sum(1 for tok in s.keys() | t.keys() if s.get(tok) != t.get(tok))
    raise ConfigError(
        f"teacher.name: the teacher's tokenizer ({teacher_dir}, {len(t)} tokens) differs from the student's "
        f"({student_dir}, {len(s)} tokens; {differ} tokens differ); on-policy scoring reuses the student's "
        "token ids, so the vocabularies must match exactly. Use a teacher of the same family, or go "
        "off-policy: sample completions from the teacher and fine-tune the student on them (SFT)"
    )


# Input and output width of each LoRA target, from a transformers config (Llama/Qwen/Mistral naming).
def _module_dims(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    h = int(cfg.get("hidden_size", 0))
    heads = int(cfg.get("num_attention_heads", 1) or 1)
    hd = int(cfg.get("head_dim") or (h // heads))
    kv = int(cfg.get("num_key_value_heads") or heads)
    inter = int(cfg.get("intermediate_size", 4 * h))
    return {
        "q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
        "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
    }


def weights_bytes(model_dir: Path) -> int:
    """Bytes of a model directory's safetensors files (what a full fine-tuning step writes again)."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def adapter_bytes(model_dir: Path, rank: int, targets: list[str]) -> int:
    """Size of one saved LoRA adapter (float32 A and B for every target module of every layer)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        cfg = cfg.get("text_config", cfg)  # multimodal configs nest the language model's
        dims = _module_dims(cfg)
        layers = int(cfg.get("num_hidden_layers", 1))
        h = int(cfg.get("hidden_size", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0
    per_layer = sum(rank * sum(dims.get(t, (h, h))) for t in targets)
    return 4 * layers * per_layer
