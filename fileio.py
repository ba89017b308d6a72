"""Atomic file writing shared by the whole pack (stdlib only; safetensors imported on use).

Every file the pack writes goes through a temporary file in the target folder, fsync, then
os.replace: readers never see a half-written file, and a failure (or an interrupt) leaves nothing behind.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], mode: int = 0o644) -> Path:
    """Call ``write(tmp_path)`` to produce the file, then move it onto ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600; written files should be readable like any other
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> Path:
    """A safetensors file (tensors moved to CPU, made contiguous), written atomically."""
    from safetensors.torch import save as st_save

    blob = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    return atomic_write_bytes(path, blob)


class OutputPathError(ValueError):
    """An output path that cannot be written; the message says what to change."""


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists (``.`` for a relative path with none)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def _check_writable_parent(path: Path, what: str) -> None:
    existing = _nearest_existing(path.parent if path.name else path)
    if not existing.is_dir():
        raise OutputPathError(f"{what} {path}: {existing} is a file, not a folder; choose a path that is not "
                              "under a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {path}: folder {existing} is not writable; choose another location")


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Refuse, before any work, a file path that cannot be written: a directory, a path under a file, an
    unwritable folder (missing folders are fine: they are created on writing)."""
    path = Path(path)
    if not str(path).strip() or path.name in ("", ".", ".."):
        raise OutputPathError(f"{what} {str(path)!r}: give a file name")
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a directory; give a file name (e.g. {path / 'merged.safetensors'})")
    _check_writable_parent(path, what)
    return path


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Refuse, before any work, a folder path that cannot be used: an existing file, a path under a file,
    an unwritable location (a missing folder is fine: it is created)."""
    path = Path(path)
    if not str(path).strip():
        raise OutputPathError(f"{what}: give a folder")
    if os.path.lexists(path) and not path.is_dir():
        raise OutputPathError(f"{what} {path} is an existing file, not a folder; choose another name")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputPathError(f"{what} {path} is not writable; choose another folder")
        return path
    _check_writable_parent(path, what)
    return path
