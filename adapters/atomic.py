"""Atomic file and directory writes: write beside the target, fsync, rename, fsync the parent.

A crash (or SIGKILL) half-way leaves the previous file or directory intact and at worst a stray
``.tmp-*`` entry, never a truncated file under the real name. New files and directories get the
usual permissions under the process umask (0644 / 0755 under umask 022): colleagues can read them.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX: the directory entry lives in the directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename itself is still atomic
    finally:
        os.close(fd)


def _file_mode() -> int:
    """What a new file gets under the process umask (0644 under 022): some writers (safetensors) create
    their files 0600 whatever the umask, so every file is set to this before it is moved into place."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _temporary_name(path: Path) -> Path:
    return path.parent / f".tmp-{path.name}-{secrets.token_hex(4)}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # mode from the umask, unlike mkstemp
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it becomes ``path`` as a whole.

    Files written into it appear under ``path`` together or not at all (an export's config and
    weights). An existing ``path`` is swapped out in one step where the OS allows it (Linux), else
    moved aside just before the rename; the previous content is removed only once the new one is in
    place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    os.mkdir(tmp, 0o777)  # mode from the umask
    try:
        yield tmp
        mode = _file_mode()
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
                os.chmod(child, mode)
        _fsync_dir(tmp)
        if not path.exists():
            os.rename(tmp, path)
        elif _exchange(tmp, path):
            pass  # tmp now holds the previous content, removed below
        else:
            aside = _temporary_name(path)
            os.rename(path, aside)
            os.rename(tmp, path)
            shutil.rmtree(aside, ignore_errors=True)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
