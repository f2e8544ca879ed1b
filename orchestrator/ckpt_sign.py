"""Signed checkpoint manifests: ``--resume`` loads only a checkpoint this machine's key signed.

Why: resuming unpickles files of the checkpoint (``torch.distributed.checkpoint``'s ``.metadata``), and
unpickling runs whatever code the file names; a checkpoint someone else wrote or changed must not get
that far.  So :func:`sign` (called when a checkpoint is committed) writes ``MANIFEST.json``: the SHA-256
of every other file under the checkpoint directory, and ``HMAC-SHA256(key, canonical JSON of step + files)``.
:func:`verify` (before anything in the checkpoint is read) recomputes both and refuses, in one line:

- a checkpoint without a manifest (unsigned: written before signing existed, or copied without it),
- a manifest signed with another key (``key_id`` differs: written on another machine or by another user),
- a manifest whose HMAC does not match (the manifest itself was edited),
- a file whose SHA-256 differs, a file missing, or a file the manifest does not list.

The key: 32 random bytes (hex) in ``$OPD_CHECKPOINT_KEY`` or else ``$XDG_CACHE_HOME/opd/checkpoint.key``
(``~/.cache/opd/checkpoint.key``), outside every output directory, created on first use with mode 0600;
a key that others can read is refused (anyone who can read it can sign).  ``ckpt.trust_unsigned = true``
skips the check for a checkpoint the user trusts on purpose.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from shared.config import ConfigError
from shared.fsutil import atomic_write_text

MANIFEST = "MANIFEST.json"
KEY_ENV = "OPD_CHECKPOINT_KEY"
TRUST_HINT = "set ckpt.trust_unsigned = true to load it anyway, only if you trust where it came from"


class UntrustedCheckpoint(ConfigError):
    """A checkpoint that failed verification; one line naming the checkpoint and what failed."""


def key_path() -> Path:
    """``$OPD_CHECKPOINT_KEY``, else ``$XDG_CACHE_HOME/opd/checkpoint.key`` (default ``~/.cache``)."""
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "opd" / "checkpoint.key"


def load_key(create: bool = True) -> bytes:
    """The signing key, created (mode 0600, without replacing one another process made) when missing."""
    path = key_path()
    try:
        if not path.exists() and create:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # atomic, and never over a key that appeared meanwhile
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise ConfigError(f"{KEY_ENV}: no checkpoint key at {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{KEY_ENV}: the checkpoint key {path} cannot be created or read "
                          f"({getattr(e, 'strerror', None) or e})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{KEY_ENV}: the checkpoint key {path} is readable by others (mode {mode:o}); chmod 600 it")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{KEY_ENV}: the checkpoint key {path} is not hex") from None
    if len(key) < 16:
        raise ConfigError(f"{KEY_ENV}: the checkpoint key {path} is shorter than 16 bytes")
    return key


def key_id(key: bytes) -> str:
    """A public name for a key (it reveals nothing of the key): which key signed a manifest."""
    return hashlib.sha256(b"opd checkpoint key id\0" + key).hexdigest()[:16]


def file_digests(directory: Path) -> dict[str, str]:
    """``{relative path: sha256 hex}`` of every file under ``directory`` except the manifest."""
    out = {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and rel != MANIFEST:
            h = hashlib.sha256()
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[rel] = h.hexdigest()
    return out


def _mac(key: bytes, step: int, files: dict[str, str]) -> str:
    body = json.dumps({"step": step, "files": files}, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def sign(directory: Path, step: int, key: bytes | None = None) -> Path:
    """Write ``directory/MANIFEST.json`` over every other file in it (call it last, before the rename)."""
    key = load_key() if key is None else key
    files = file_digests(directory)
    manifest = {"version": 1, "step": step, "key_id": key_id(key), "files": files, "hmac": _mac(key, step, files)}
    return atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def problem(directory: Path, key: bytes) -> str | None:
    """What is wrong with ``directory``'s manifest under ``key``, or None when it verifies."""
    path = directory / MANIFEST
    if not path.is_file():
        return f"unsigned (no {MANIFEST})"
    try:
        m: Any = json.loads(path.read_text(encoding="utf-8"))
        step, files, mac, kid = m["step"], m["files"], m["hmac"], m["key_id"]
        assert isinstance(files, dict) and isinstance(mac, str) and isinstance(kid, str)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return f"{MANIFEST} is unreadable or incomplete"
    if kid != key_id(key):
        return f"signed with another key (key id {kid}, this machine's is {key_id(key)} at {key_path()})"
    if not hmac.compare_digest(mac, _mac(key, step, files)):
        return f"{MANIFEST} was changed after it was signed (its HMAC does not match)"
    if directory.name.startswith("step_") and directory.name != f"step_{step}":
        return f"it was signed as step_{step}"
    found = file_digests(directory)
    for rel in sorted(set(files) | set(found)):
        if rel not in found:
            return f"{rel} is missing"
        if rel not in files:
            return f"{rel} is not in the signed manifest"
        if not hmac.compare_digest(files[rel], found[rel]):
            return f"{rel} was changed (its SHA-256 differs from the signed manifest)"
    return None


def verify(directory: Path, trust_unsigned: bool = False) -> None:
    """Refuse (:class:`UntrustedCheckpoint`, one line) a checkpoint that does not verify, unless trusted."""
    if trust_unsigned:
        return
    what = problem(directory, load_key(create=True))
    if what is not None:
        raise UntrustedCheckpoint(f"resume: checkpoint {directory} is refused: {what}; {TRUST_HINT}")
