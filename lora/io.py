"""Safe LoRA file I/O: validated safetensors reading, atomic writing, save names confined to a folder.

Nothing here trusts the file: the safetensors header is checked by hand first (length, JSON, tensor byte
ranges against the real file size) so a truncated or corrupted download fails with a message naming the
file and what is wrong, instead of a deserialiser error.  Pickle formats (.ckpt/.pt/.bin) are refused:
loading them can run arbitrary code.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load

from ..fileio import atomic_save_safetensors

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
MAX_HEADER_BYTES = 100 * 1024 * 1024
RECIPE_KEY = "comfy_poe.lora_merge"  # metadata key marking files this package wrote


class LoraFileError(ValueError):
    """A LoRA file that cannot be read or written; the message names the file."""


@dataclass
class LoraFileData:
    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    sha256: str
    size: int


def parse_safetensors_header(data: bytes, label: str) -> tuple[dict, dict[str, str]]:
    """(tensor entries, metadata) of a safetensors byte string; LoraFileError if it is not a complete one."""
    if len(data) < 8:
        raise LoraFileError(f"{label}: only {len(data)} bytes — truncated or not a safetensors file")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(len(data) - 8, MAX_HEADER_BYTES) or data[8:9] != b"{":
        # Only now look for pickle/zip magic: a valid header length can itself start with 0x80.
        if data[:2] == b"PK" or (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
            raise LoraFileError(f"{label}: this is a pickle/zip (PyTorch .ckpt/.pt) file, not safetensors; "
                                "pickle files can run code when loaded and are refused — convert it to .safetensors")
    if header_len > min(len(data) - 8, MAX_HEADER_BYTES):
        raise LoraFileError(f"{label}: header claims {header_len} bytes but the file has {len(data)} — "
                            "the file is truncated or not a safetensors file")
    try:
        header = json.loads(data[8: 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraFileError(f"{label}: corrupted safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise LoraFileError(f"{label}: corrupted safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    payload = len(data) - 8 - header_len
    end = 0
    for name, entry in header.items():
        try:
            start, stop = entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise LoraFileError(f"{label}: corrupted header entry for tensor {name!r}") from None
        end = max(end, stop)
        if not 0 <= start <= stop:
            raise LoraFileError(f"{label}: corrupted byte range for tensor {name!r}")
    if end > payload:
        raise LoraFileError(f"{label}: tensor data needs {end} bytes but only {payload} are present — "
                            "the file is truncated (incomplete download or copy?)")
    return header, {str(k): str(v) for k, v in metadata.items()}


def load_lora_file(path: str | os.PathLike) -> LoraFileData:
    """Read and validate a .safetensors LoRA; returns tensors, metadata and the file's sha256."""
    path = Path(path)
    label = f"LoRA file '{path.name}'"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFileError(f"{label}: {path.suffix} files are pickles that can run code when loaded; "
                            "refused — use a .safetensors LoRA")
    if not path.is_file():
        raise LoraFileError(f"{label}: not found at {path}")
    data = path.read_bytes()
    _, metadata = parse_safetensors_header(data, label)
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types
        raise LoraFileError(f"{label}: cannot be decoded ({e})") from None
    return LoraFileData(path, tensors, metadata, hashlib.sha256(data).hexdigest(), len(data))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Metadata of a safetensors file (header only; the tensors are not read)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoraFileError(f"'{path.name}': truncated or not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise LoraFileError(f"'{path.name}': not a safetensors file")
        header = f.read(n)
    try:
        meta = json.loads(header.decode("utf-8")).get("__metadata__") or {}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise LoraFileError(f"'{path.name}': corrupted safetensors header") from None
    return {str(k): str(v) for k, v in meta.items()}


# ------------------------------------------------------------------------------------------ save names
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._\- ()\[\]+]")


def resolve_save_path(root: str | os.PathLike, name: str, suffix: str = ".safetensors") -> Path:
    """Path for save name ``name`` (may contain sub-folders ``a/b/c``) inside ``root``.

    Absolute paths, drive letters and ``..`` components are refused (not silently rewritten: a user who
    typed one meant somewhere else); other unsafe characters become ``_``.  The resolved path — symlinks
    included — must stay inside ``root``.
    """
    if not isinstance(name, str) or not name.strip():
        raise LoraFileError("save name is empty")
    if "\x00" in name:
        raise LoraFileError("save name contains a NUL character")
    norm = name.strip().replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) or norm.startswith("~"):
        raise LoraFileError(f"save name {name!r} is an absolute path; give a name relative to the LoRA folder")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if any(p.strip() == ".." for p in parts):
        raise LoraFileError(f"save name {name!r} refused: '..' would leave the LoRA folder")
    parts = [_UNSAFE_CHARS.sub("_", p).strip(" .") for p in parts]
    if not parts or not all(parts):
        raise LoraFileError(f"save name {name!r} has no usable file name")
    if not parts[-1].lower().endswith(suffix):
        parts[-1] += suffix
    root_real = os.path.realpath(root)
    path = Path(root_real, *parts)
    if os.path.commonpath([root_real, os.path.realpath(path)]) != root_real:
        raise LoraFileError(f"save name {name!r} refused: it resolves outside {root_real} (symlink?)")
    return path


def check_overwrite(path: Path, overwrite: bool, key: str = RECIPE_KEY, writer: str = "merge") -> None:
    """Refuse to replace a file this package did not write (its metadata lacks ``key``), unless ``overwrite``."""
    if not path.exists() or overwrite:
        return
    try:
        ours = key in read_metadata(path)
    except (LoraFileError, OSError):
        ours = False
    if not ours:
        raise LoraFileError(f"{path.name} already exists and was not written by a comfy-poe {writer}; "
                            "choose another save name or allow overwriting")


def atomic_write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                             metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically (see :mod:`comfy_poe.fileio`)."""
    return atomic_save_safetensors(path, tensors, metadata)
