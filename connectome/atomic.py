"""Atomic outputs, shared by every package of the project.

A reader sees the old output or the new one, never a mix, and a failure (an
exception, a full disk, Ctrl-C) leaves no temporary file behind:

* :func:`atomic_file` -- a single file written to a temporary sibling and
  renamed over the target when complete;
* :func:`atomic_dir` -- a directory built as a temporary sibling and swapped in
  whole (the previous version is moved aside first and removed afterwards;
  :func:`recover_dir` finishes a swap that a crash interrupted between its two
  renames).

File-system errors become one-line :class:`OutputError` messages that name the
path and the cause ("disk full", "permission denied", "a file is in the way").
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Iterator, Union

from .errors import DMNError

PathLike = Union[str, os.PathLike]


class OutputError(DMNError, OSError):
    """An output could not be written (disk full, permission, a path in the way)."""


def describe_os_error(exc: OSError, what: str) -> str:
    """One line for an OSError while writing ``what``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        cause = "disk full"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        cause = "permission denied" if exc.errno != errno.EROFS else "read-only file system"
    elif exc.errno in (errno.ENOTDIR, errno.EEXIST) or isinstance(exc, (NotADirectoryError, FileExistsError)):
        cause = "a file is in the way" if exc.errno != errno.EEXIST or not Path(what).is_dir() else "exists"
    elif exc.errno == errno.EISDIR:
        cause = "a directory is in the way"
    elif exc.errno == errno.ENAMETOOLONG:
        cause = "name too long"
    else:
        cause = exc.strerror or type(exc).__name__
    return f"cannot write {what}: {cause}"


def ensure_parent(path: PathLike) -> Path:
    """Create ``path``'s parent directory; a regular file on the way is a one-line error."""
    path = Path(path)
    parent = path.parent
    for p in [parent, *parent.parents]:
        if p.exists() and not p.is_dir():
            raise OutputError(f"cannot write {path}: {p} is a file, not a directory")
        if p.exists():
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(describe_os_error(exc, str(path))) from None
    return path


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink()
    except OSError:
        pass


def temp_sibling(path: Path, tag: str) -> Path:
    """A unique hidden name next to ``path`` (same file system, so renames are atomic)."""
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_file(path: PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path``
    when the block completes, remove it when the block fails."""
    path = ensure_parent(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: a directory is in the way")
    tmp = temp_sibling(path, "tmp")
    try:
        with open(tmp, mode, **open_kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        if isinstance(exc, DMNError):
            raise
        raise OutputError(describe_os_error(exc, str(path))) from None
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_file(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return Path(path)


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_file(path, "wb") as fh:
        fh.write(data)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling directory of ``path``; when the block
    completes it replaces ``path`` whole (whatever ``path`` held before is
    gone, not merged); when the block fails it is removed and ``path`` is untouched."""
    path = ensure_parent(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"cannot write {path}: a file is in the way")
    tmp = temp_sibling(path, "tmp")
    try:
        tmp.mkdir()
    except OSError as exc:
        raise OutputError(describe_os_error(exc, str(path))) from None
    old = None
    try:
        yield tmp
        if path.exists():
            old = temp_sibling(path, "old")
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException as exc:
        _remove(tmp)
        if old is not None and old.exists() and not path.exists():
            os.replace(old, path)
            old = None
        if isinstance(exc, OSError) and not isinstance(exc, DMNError):
            raise OutputError(describe_os_error(exc, str(path))) from None
        raise
    finally:
        if old is not None:
            _remove(old)


def recover_dir(path: PathLike) -> bool:
    """Finish an :func:`atomic_dir` swap interrupted between its two renames
    (``path`` missing, its previous version moved aside): move it back.
    Returns whether something was recovered."""
    path = Path(path)
    if path.exists() or not path.parent.is_dir():
        return False
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not olds:
        return False
    os.replace(olds[-1], path)
    for stale in olds[:-1]:
        _remove(stale)
    return True


def leftovers(path: PathLike) -> list:
    """Temporary siblings of ``path`` left by a process that was killed (tests, cleanup)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.tmp-*")) + sorted(path.parent.glob(f".{path.name}.old-*"))


__all__ = ["OutputError", "atomic_file", "atomic_dir", "write_text", "write_bytes", "recover_dir", "ensure_parent",
           "describe_os_error", "temp_sibling", "leftovers"]
