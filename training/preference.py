"""Preference pairs: a folder format with validation, joint augmentation, and pairs made by a judge.

Folder format (one sub-folder per pair, any folder name):

    <root>/<pair_id>/prompt.txt      the prompt (UTF-8, non-empty; may be shared by many pairs)
    <root>/<pair_id>/chosen.png      the preferred image   (.png / .jpg / .jpeg / .webp)
    <root>/<pair_id>/rejected.png    the other image

Images are loaded as RGB, ComfyUI IMAGE layout (H, W, 3) in [0, 1]; the rejected image is resized to the
chosen one's size (as the MaPO reference does), then every pair to a common ``size``.  Augmentation is
*joint*: a pair gets the same random crop and the same horizontal flip (MaPO / Diffusion-DPO data pipeline).

Pairs from a judge: several images per prompt are scored by any reward / judge; the best becomes
``chosen`` and the worst ``rejected`` (groups whose scores tie are skipped).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..fileio import atomic_write_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PROMPT_FILE = "prompt.txt"


@dataclass
class PreferencePairs:
    """N pairs: ``prompts`` (N strings), ``chosen`` / ``rejected`` IMAGE tensors (N, H, W, C) in [0, 1]."""

    prompts: list[str]
    chosen: torch.Tensor
    rejected: torch.Tensor
    names: Optional[list[str]] = None

    def __post_init__(self):
        n = len(self.prompts)
        if n == 0:
            raise ValueError("preference pairs: the set is empty")
        for name, t in (("chosen", self.chosen), ("rejected", self.rejected)):
            if not torch.is_tensor(t) or t.ndim != 4 or t.shape[0] != n:
                raise ValueError(f"preference pairs: {name} must be an IMAGE batch (N={n}, H, W, C), "
                                 f"got {tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
        if self.chosen.shape != self.rejected.shape:
            raise ValueError(f"preference pairs: chosen {tuple(self.chosen.shape)} and rejected "
                             f"{tuple(self.rejected.shape)} must have the same shape")
        if self.names is None:
            self.names = [f"pair_{i:05d}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, index: Sequence[int]) -> "PreferencePairs":
        index = [int(i) for i in index]
        return PreferencePairs([self.prompts[i] for i in index], self.chosen[index], self.rejected[index],
                               [self.names[i] for i in index])


# ------------------------------------------------------------------------------------------ folder
def _find_image(folder: Path, stem: str) -> Optional[Path]:
    found = [folder / f"{stem}{suffix}" for suffix in IMAGE_SUFFIXES if (folder / f"{stem}{suffix}").is_file()]
    if len(found) > 1:
        raise ValueError(f"preference folder: pair {folder.name!r} has several '{stem}' images "
                         f"({', '.join(p.name for p in found)}); keep one")
    return found[0] if found else None


def _load_rgb(path: Path, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if size is not None and image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.BILINEAR)
            data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            w, h = image.size
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"preference folder: cannot read image {path} ({e})") from None
    return data.reshape(h, w, 3).float() / 255.0


def load_preference_folder(root: str | os.PathLike, size: Optional[int | tuple[int, int]] = None,
                           max_pairs: int = 0) -> PreferencePairs:
    """Read ``<root>/<pair_id>/{prompt.txt, chosen.*, rejected.*}`` (sorted by folder name).

    ``size``: resize every pair to (H, W) (an int means square); default: the first pair's chosen size (all
    pairs must then match after the rejected → chosen resize, else an error tells you to set ``size``).
    Every problem is reported with the pair's folder name; nothing is partially loaded.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"preference folder {str(root)!r} does not exist or is not a folder")
    pair_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not pair_dirs:
        raise ValueError(f"preference folder {str(root)!r} has no pair sub-folders; expected "
                         "<root>/<pair_id>/prompt.txt + chosen.png + rejected.png")
    if max_pairs and max_pairs > 0:
        pair_dirs = pair_dirs[: int(max_pairs)]
    target = (int(size), int(size)) if isinstance(size, int) else (tuple(int(s) for s in size) if size else None)
    problems, entries = [], []
    for folder in pair_dirs:
        missing = []
        prompt_path = folder / PROMPT_FILE
        if not prompt_path.is_file():
            missing.append(PROMPT_FILE)
        try:
            chosen = _find_image(folder, "chosen")
            rejected = _find_image(folder, "rejected")
        except ValueError as e:
            problems.append(str(e))
            continue
        if chosen is None:
            missing.append("chosen.png/.jpg")
        if rejected is None:
            missing.append("rejected.png/.jpg")
        if missing:
            problems.append(f"pair {folder.name!r} lacks {', '.join(missing)}")
            continue
        try:
            prompt = prompt_path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            problems.append(f"pair {folder.name!r}: {PROMPT_FILE} is not UTF-8 text")
            continue
        if not prompt:
            problems.append(f"pair {folder.name!r}: {PROMPT_FILE} is empty")
            continue
        entries.append((folder.name, prompt, chosen, rejected))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; … and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(f"preference folder {str(root)!r}: {len(problems)} invalid pair(s): {shown}")
    prompts, chosen_list, rejected_list, names = [], [], [], []
    for name, prompt, chosen_path, rejected_path in entries:
        chosen = _load_rgb(chosen_path, target)
        rejected = _load_rgb(rejected_path, tuple(chosen.shape[:2]))
        if target is None:
            target = tuple(chosen.shape[:2])
        elif tuple(chosen.shape[:2]) != target:
            raise ValueError(f"preference folder: pair {name!r} is {chosen.shape[1]}×{chosen.shape[0]} but the first "
                             f"pair is {target[1]}×{target[0]}; set a common size to resize every pair")
        prompts.append(prompt)
        chosen_list.append(chosen)
        rejected_list.append(rejected)
        names.append(name)
    return PreferencePairs(prompts, torch.stack(chosen_list), torch.stack(rejected_list), names)


def save_preference_folder(pairs: PreferencePairs, root: str | os.PathLike) -> Path:
    """Write pairs in the folder format (each file atomically: temp file + os.replace)."""
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(pairs.names):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)).strip(".") or f"pair_{i:05d}"
        folder = root / safe
        folder.mkdir(exist_ok=True)
        files = {PROMPT_FILE: pairs.prompts[i].encode("utf-8")}
        for stem, images in (("chosen", pairs.chosen), ("rejected", pairs.rejected)):
            array = (images[i, ..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG")
            files[f"{stem}.png"] = buffer.getvalue()
        for fname, data in files.items():
            atomic_write_bytes(folder / fname, data)
    return root


# ------------------------------------------------------------------------------------------ augmentation
def joint_augment(chosen: torch.Tensor, rejected: torch.Tensor, size: Optional[tuple[int, int]] = None,
                  generator: Optional[torch.Generator] = None, flip: bool = True,
                  random_crop: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Same crop and same horizontal flip for both images of each pair (B, H, W, C): a random (or centre)
    crop to ``size`` (default: no crop) and a flip with probability ½, drawn from ``generator``."""
    b, h, w, _ = chosen.shape
    th, tw = size if size is not None else (h, w)
    if th > h or tw > w:
        raise ValueError(f"augmentation crop {th}×{tw} is larger than the images ({h}×{w})")
    out_c, out_r = [], []
    for i in range(b):
        if random_crop:
            top = int(torch.randint(0, h - th + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - tw + 1, (1,), generator=generator))
        else:
            top, left = (h - th) // 2, (w - tw) // 2
        do_flip = flip and bool(torch.rand((), generator=generator) < 0.5)
        pair = [chosen[i, top:top + th, left:left + tw], rejected[i, top:top + th, left:left + tw]]
        if do_flip:
            pair = [p.flip(1) for p in pair]
        out_c.append(pair[0])
        out_r.append(pair[1])
    return torch.stack(out_c), torch.stack(out_r)


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of an IMAGE batch (N, H, W, C)."""
    if tuple(images.shape[1:3]) == tuple(size):
        return images
    return F.interpolate(images.movedim(-1, 1), size=size, mode="bilinear", align_corners=False).movedim(1, -1)


# ------------------------------------------------------------------------------------------ from a judge
def pairs_from_scores(images: torch.Tensor, scores: torch.Tensor, prompts: Sequence[str],
                      min_gap: float = 0.0, groups: Optional[Sequence] = None) -> PreferencePairs:
    """Group images by prompt (or by ``groups`` ids, e.g. several groups per prompt); per group keep
    (best, worst) by ``scores`` when best − worst > ``min_gap``."""
    if images.shape[0] != len(prompts) or scores.reshape(-1).shape[0] != len(prompts):
        raise ValueError(f"pairs from judge: {images.shape[0]} images, {scores.numel()} scores and {len(prompts)} "
                         "prompts must match")
    scores = scores.reshape(-1).float().cpu()
    keys = list(prompts) if groups is None else list(groups)
    if len(keys) != len(prompts):
        raise ValueError("pairs from judge: groups must have one id per image")
    members: dict = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    out_p, best, worst, names = [], [], [], []
    for idx in members.values():
        prompt = prompts[idx[0]]
        if len(idx) < 2:
            continue
        s = scores[idx]
        hi, lo = idx[int(s.argmax())], idx[int(s.argmin())]
        if float(scores[hi] - scores[lo]) <= min_gap:
            continue
        out_p.append(prompt)
        best.append(hi)
        worst.append(lo)
        names.append(f"pair_{len(names):05d}")
    if not out_p:
        raise ValueError("pairs from judge: no prompt had two or more images with different scores "
                         "(generate more images per prompt)")
    return PreferencePairs(out_p, images[best], images[worst], names)
