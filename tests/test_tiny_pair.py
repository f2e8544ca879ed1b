"""Tests of the tiny teacher/student pair (built once, ~2 minutes on 2 CPU cores, then cached)."""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.builders import tiny_pair as tiny_pair_module
from shared.builders.tiny_pair import (
    ALPHABET,
    BOS_ID,
    BUILD_MARKER,
    EOS_ID,
    MAX_LEN,
    MIN_LEN,
    PAD_ID,
    answer_for,
    LOCK_FILE,
    build_pair,
    evaluate,
    heldout_strings,
    make_string,
    pair_dir_names,
    prompt_for,
    read_build_info,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def pair() -> tuple[Path, Path]:
    return build_pair()


def test_task_helpers() -> None:
    rng = random.Random(0)
    for _ in range(200):
        s = make_string(rng)
        assert MIN_LEN <= len(s) <= MAX_LEN and set(s) <= set(ALPHABET)
    assert prompt_for("abcd") == "abcd="
    assert answer_for("abcd") == "dcba"
    held = heldout_strings(50)
    assert len(set(held)) == 50 and heldout_strings(20) == held[:20]
    assert heldout_strings(50, seed=1) != held


def test_tokenizer_round_trip_and_bos(pair: tuple[Path, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(pair[0])
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) % 64 == 0
    prompt = prompt_for("abcdh")
    ids = tok(prompt).input_ids
    assert ids[0] == BOS_ID and len(ids) == len(prompt) + 1
    assert tok.convert_ids_to_tokens(ids[1:]) == list(prompt)
    assert tok(prompt, add_special_tokens=False).input_ids == ids[1:]
    completion = tok(answer_for("abcdh"), add_special_tokens=False).input_ids + [EOS_ID, PAD_ID]
    assert tok.decode(ids + completion, skip_special_tokens=True) == "abcdh=hdcba"
    text = "the quick, brown fox = ?\n(jumps) 'over'"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_tokenizers_identical(pair: tuple[Path, Path]) -> None:
    teacher, student = pair
    for name in TOKENIZER_FILES:
        assert (teacher / name).read_bytes() == (student / name).read_bytes(), name


def test_configs(pair: tuple[Path, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(pair[0])
    for model_dir in pair:
        config = json.loads((model_dir / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (PAD_ID, BOS_ID, EOS_ID)
        assert config["max_position_embeddings"] == 64 and config["tie_word_embeddings"] is False
        assert config["head_dim"] in (32, 64) and config["vocab_size"] == len(tok)
        assert (model_dir / "model.safetensors").is_file()


def test_recorded_accuracies(pair: tuple[Path, Path]) -> None:
    teacher, student = (read_build_info(d) for d in pair)
    assert teacher["role"] == "teacher" and student["role"] == "student"
    assert teacher["heldout_accuracy"] >= 0.95
    assert 0.05 <= student["heldout_accuracy"] <= 0.5
    assert teacher["heldout_accuracy"] - student["heldout_accuracy"] >= 0.4
    assert student["heldout_format_rate"] >= 0.8
    assert student["n_params"] < teacher["n_params"]


def test_saved_weights_reproduce_recorded_accuracy(pair: tuple[Path, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(pair[0])
    strings = heldout_strings(read_build_info(pair[0])["heldout_n"])
    for model_dir in pair:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        recorded = read_build_info(model_dir)["heldout_accuracy"]
        assert evaluate(model, tok, strings).accuracy == pytest.approx(recorded, abs=0.02)


def test_cache_hit_is_instant(pair: tuple[Path, Path]) -> None:
    start = time.perf_counter()
    assert build_pair() == pair
    assert time.perf_counter() - start < 0.5


def test_build_is_locked_atomic_and_forced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The caching logic, with a fake (fast) build in place of training."""
    calls: list[int] = []

    def fake_build(teacher_tmp: Path, student_tmp: Path, seed: int) -> None:
        calls.append(seed)
        time.sleep(0.2)
        if len(calls) == 3:
            raise RuntimeError("build failed")
        for d in (teacher_tmp, student_tmp):
            (d / BUILD_MARKER).write_text("{}")

    monkeypatch.setattr(tiny_pair_module, "_build_into", fake_build)
    with ThreadPoolExecutor(2) as pool:  # flock excludes separate opens of the lock file, threads too
        first, second = pool.map(lambda _: build_pair(tmp_path), range(2))
    assert first == second == tuple(tmp_path / name for name in pair_dir_names(0)) and calls == [0]
    assert build_pair(tmp_path, force=True) == first and calls == [0, 0]
    with pytest.raises(RuntimeError, match="build failed"):
        build_pair(tmp_path, force=True)
    # A failed rebuild leaves the previous pair in place and no temporary directories behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LOCK_FILE, *pair_dir_names(0)])
    assert all((d / BUILD_MARKER).is_file() for d in first)
