"""Atomic writes: a crash or a full disk never leaves a half-written file behind.

Every file is written to a temporary sibling (``.NAME.tmp-PID``), flushed to disk and then
``os.replace``-d over the target, so a reader sees either the previous file or the complete new one.
A failure removes the temporary and raises :class:`WriteError`, whose message is one line.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

MB = 1_000_000


class WriteError(OSError):
    """A write that failed; ``str()`` is one line naming the file. The previous file is unchanged."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror} (nothing was replaced)"


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # best effort: not every filesystem lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write_chunks(path, (data,))


def atomic_write_chunks(path: str | Path, chunks: Iterable[bytes]) -> Path:
    """:func:`atomic_write_bytes` of the concatenated ``chunks``, written as they come (a large file
    never needs to be in memory at once)."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            for data in chunks:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise WriteError(e.errno, e.strerror or str(e), str(path)) from None
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Fill the yielded temporary directory; it is renamed to ``path`` when the block succeeds and
    removed when it fails (an ``OSError`` becomes a :class:`WriteError` naming ``path``).
    ``path`` must not exist yet."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(path.parent)


def free_bytes(path: str | Path) -> int:
    """Free space (for this user) on the filesystem that holds ``path`` or its nearest existing parent."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def tree_bytes(path: str | Path) -> int:
    """Total size of the regular files under ``path`` (or of ``path`` itself)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
