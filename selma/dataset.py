"""SELMA skill datasets: images the model generates for its own skill prompts, optionally judge-filtered.

Li et al. 2024 (§3.2): the text-to-image model that is being improved draws one image per skill prompt;
those image–caption pairs are the LoRA's training set. Here a judge (any pixel-space
``DiscriminativeExpert``, e.g. the VLM judge) may score each image, and only images scoring ≥ a
threshold are kept.

Folder layout (reusable, extendable, resumable)::

    <root>/dataset.json        format tag + the settings of every build run
    <root>/manifest.jsonl      one JSON record per generated image, in order
    <root>/images/000000.png   the image            (accepted records only)
    <root>/images/000000.txt   its caption (prompt) (same stem: the usual image + caption layout)

A record is ``{"index", "prompt", "sample", "seed", "image", "caption", "accepted", "score"}``; rejected
images have ``"image": null``. Files are written atomically (temporary file + ``os.replace``) before
their manifest line is appended (one write + fsync), so a crash never leaves a record without its files.
A torn last line is dropped on the next open. Resuming skips every (prompt, sample) already in the
manifest; each image's seed depends only on (seed, prompt, sample), so an interrupted and resumed run
produces the same images as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..fileio import atomic_write_bytes
from ..experts import PIXEL, evaluate_potentials

FORMAT = "comfy_poe.selma.dataset/1"
INFO_FILE = "dataset.json"
MANIFEST_FILE = "manifest.jsonl"
IMAGE_DIR = "images"

GenerateImages = Callable[[list, list], torch.Tensor]


class DatasetError(ValueError):
    """A dataset folder that cannot be used (foreign content, damaged manifest, bad generator output)."""


@dataclass
class DatasetRecord:
    index: int
    prompt: str
    sample: int
    seed: int
    image: Optional[str]
    caption: Optional[str]
    accepted: bool
    score: Optional[float] = None

    @property
    def key(self) -> tuple[str, int]:
        return self.prompt, self.sample


def item_seed(seed: int, prompt: str, sample: int) -> int:
    """Noise seed of one image: a hash of (seed, prompt, sample), independent of order and batching."""
    digest = hashlib.sha256(f"{int(seed)}\x00{sample}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)


def image_to_png_bytes(image: torch.Tensor) -> bytes:
    """One ComfyUI IMAGE (H, W, C) in [0, 1] as PNG bytes (8-bit, rounded)."""
    import io

    from PIL import Image

    array = (image.detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise DatasetError(f"expected an image shaped (H, W, 1|3|4), got {tuple(image.shape)}")
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
    return buf.getvalue()


def load_png(path) -> torch.Tensor:
    """(H, W, 3) float tensor in [0, 1]."""
    from PIL import Image

    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)


class SkillDataset:
    """A dataset folder (see module docstring). Opening an existing folder reads and checks its manifest."""

    def __init__(self, root, *, create: bool = True):
        self.root = Path(root)
        self.info_path = self.root / INFO_FILE
        self.manifest_path = self.root / MANIFEST_FILE
        self.image_dir = self.root / IMAGE_DIR
        if self.info_path.is_file():
            self.info = self._read_info()
        elif self.root.is_dir() and any(self.root.iterdir()):
            raise DatasetError(f"dataset folder {str(self.root)!r} exists and is not a SELMA dataset (no {INFO_FILE}); "
                               "choose another dataset name")
        elif not create:
            raise DatasetError(f"dataset folder {str(self.root)!r} does not exist (or has no {INFO_FILE})")
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            self.info = {"format": FORMAT, "runs": []}
            self._write_info()
        self.image_dir.mkdir(exist_ok=True)
        self.records: list[DatasetRecord] = self._read_manifest()

    # -- reading
    def _read_info(self) -> dict:
        try:
            info = json.loads(self.info_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DatasetError(f"{self.info_path} cannot be read ({exc})") from exc
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise DatasetError(f"{self.info_path} is not a {FORMAT} dataset description")
        return info

    def _read_manifest(self) -> list[DatasetRecord]:
        if not self.manifest_path.is_file():
            return []
        raw = self.manifest_path.read_bytes()
        *complete, tail = raw.split(b"\n")
        records = []
        for number, line in enumerate(complete, 1):
            if not line.strip():
                continue
            try:
                records.append(DatasetRecord(**json.loads(line)))
            except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
                raise DatasetError(f"{self.manifest_path}:{number} is damaged ({exc}); fix or remove that line") \
                    from exc
        if tail:  # a last line without its newline was cut off mid-append: drop it, atomically
            _atomic_write_bytes(self.manifest_path, raw[:len(raw) - len(tail)])
        return records

    @property
    def done(self) -> set[tuple[str, int]]:
        return {r.key for r in self.records}

    @property
    def accepted(self) -> list[DatasetRecord]:
        return [r for r in self.records if r.accepted]

    def next_index(self) -> int:
        return max((r.index for r in self.records), default=-1) + 1

    def image_path(self, record: DatasetRecord) -> Path:
        if record.image is None:
            raise DatasetError(f"record {record.index} ({record.prompt!r}) was rejected and has no image")
        return self.root / record.image

    def load_image(self, record: DatasetRecord) -> torch.Tensor:
        return load_png(self.image_path(record))

    def pairs(self) -> list[tuple[Path, str]]:
        """(image path, caption) of every accepted record: the training set."""
        return [(self.image_path(r), r.prompt) for r in self.accepted]

    # -- writing
    def _write_info(self) -> None:
        _atomic_write_bytes(self.info_path, (json.dumps(self.info, indent=1, ensure_ascii=False) + "\n").encode())

    def add_run(self, settings: dict) -> None:
        self.info.setdefault("runs", []).append({"time": time.strftime("%Y-%m-%d %H:%M:%S"), **settings})
        self._write_info()

    def append(self, prompt: str, sample: int, seed: int, image: Optional[torch.Tensor], accepted: bool,
               score: Optional[float] = None) -> DatasetRecord:
        """Store one generated image (its files first, then the manifest line)."""
        index = self.next_index()
        stem = f"{index:06d}"
        image_rel = caption_rel = None
        if accepted:
            if image is None:
                raise DatasetError("an accepted record needs its image")
            image_rel, caption_rel = f"{IMAGE_DIR}/{stem}.png", f"{IMAGE_DIR}/{stem}.txt"
            _atomic_write_bytes(self.root / image_rel, image_to_png_bytes(image))
            _atomic_write_bytes(self.root / caption_rel, (prompt + "\n").encode("utf-8"))
        record = DatasetRecord(index=index, prompt=prompt, sample=sample, seed=seed, image=image_rel,
                               caption=caption_rel, accepted=accepted,
                               score=None if score is None else float(score))
        line = (json.dumps(asdict(record), ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.manifest_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records.append(record)
        return record


@dataclass
class BuildReport:
    root: Path
    requested: int = 0
    skipped: int = 0
    generated: int = 0
    accepted: int = 0
    new_records: list = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.root}: {self.generated} images generated this run ({self.accepted} kept), "
                f"{self.skipped} of {self.requested} already done")


def check_judges(judges) -> list:
    judges = list(judges or [])
    for judge in judges:
        if getattr(judge, "space", None) != PIXEL:
            raise ValueError(f"judge {getattr(judge, 'name', judge)!r} does not score images (pixel space); "
                             "Skill Dataset filters decoded images")
    return judges


def score_images(judges, images: torch.Tensor) -> torch.Tensor:
    """Σ weight · log-potential of every pixel judge, (N,) float64 on CPU."""
    with torch.no_grad():
        return evaluate_potentials(judges, images, decode=lambda x: x).detach().cpu()


def build_dataset(root, prompts: Sequence[str], generate_images: GenerateImages, *, seed: int = 0,
                  images_per_prompt: int = 1, judges=(), threshold: Optional[float] = None, batch_size: int = 4,
                  settings: Optional[dict] = None,
                  progress: Optional[Callable[[int, int], None]] = None) -> BuildReport:
    """Generate the missing (prompt, sample) images into the dataset at ``root`` (created if needed).

    ``generate_images(prompts, seeds)`` returns an IMAGE batch (N, H, W, C) in [0, 1], one per prompt/seed.
    With ``judges`` every image is scored (score stored); with a ``threshold`` too, images scoring below it
    are recorded as rejected and not saved.
    """
    prompts = [" ".join(str(p).split()) for p in prompts]
    prompts = list(dict.fromkeys(p for p in prompts if p))
    if not prompts:
        raise ValueError("prompts: no prompts given (write one per line, or give a prompts file)")
    if images_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"images_per_prompt and batch_size must be ≥ 1, got {images_per_prompt}, {batch_size}")
    judges = check_judges(judges)
    if threshold is not None and not judges:
        raise ValueError("threshold is set but no judges are connected; connect POE_JUDGES or clear the threshold")
    dataset = SkillDataset(root)
    done = dataset.done
    todo = [(p, k, item_seed(seed, p, k)) for p in prompts for k in range(images_per_prompt) if (p, k) not in done]
    report = BuildReport(root=dataset.root, requested=len(prompts) * images_per_prompt)
    report.skipped = report.requested - len(todo)
    dataset.add_run({"seed": seed, "images_per_prompt": images_per_prompt, "threshold": threshold,
                     "judges": [getattr(j, "name", "judge") for j in judges], "prompts": len(prompts),
                     "pending": len(todo), **(settings or {})})
    if progress is not None:
        progress(0, len(todo))
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        images = generate_images([p for p, _, _ in chunk], [s for _, _, s in chunk])
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] != len(chunk):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise DatasetError(f"the image generator returned {shape} for {len(chunk)} prompts; "
                               "expected an IMAGE batch (N, H, W, C)")
        scores = score_images(judges, images) if judges else None
        for i, (prompt, sample, item) in enumerate(chunk):
            score = None if scores is None else float(scores[i])
            keep = threshold is None or score >= threshold
            record = dataset.append(prompt, sample, item, images[i] if keep else None, keep, score)
            report.new_records.append(record)
            report.generated += 1
            report.accepted += int(keep)
        if progress is not None:
            progress(report.generated, len(todo))
    return report
