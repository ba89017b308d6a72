"""The scikit-learn ``load_digits`` data set as a small, offline, real-image instrument.

1,797 real 8x8 grey-scale digits ship with scikit-learn (no download). Pixels (integers 0..16) are scaled
to [-1, 1] and returned as (N, 1, 8, 8) float32 tensors with int64 labels 0..9.

Split (reference digits_benchmark.md): one stratified split, 1,437 train / 360 test, ``random_state=0``.
- Every model of this package (diffusion UNet, noise-aware guidance classifier, held-out evaluator,
  MLP denoiser) is trained on the TRAIN split only. Where a model needs a validation set (early stopping),
  it is carved out of the train split (:func:`train_validation_split`), never taken from the test split.
- The TEST split is never used for training, early stopping or model selection of anything; it is only
  used to report held-out accuracies and as the "real digits" reference for Fréchet distances.
- The evaluator is a separate model (own architecture, own seed, clean images only) that is never used
  inside a sampler, a reward or a trainer: it only judges results, so a sampler cannot over-fit to it.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Optional

import torch

N_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)
SPLIT_SEED = 0
N_TEST = 360
SPLITS = ("train", "test", "all")


def pixels_to_model(pixels: torch.Tensor) -> torch.Tensor:
    """scikit-learn digit intensities 0..16 -> model range [-1, 1]."""
    return pixels / 8.0 - 1.0


def model_to_unit(x: torch.Tensor) -> torch.Tensor:
    """Model range [-1, 1] -> [0, 1] (for display / ComfyUI IMAGE tensors)."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


@lru_cache(maxsize=1)
def _load_all() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (images, labels, is_test) — the stratified split is computed once."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = pixels_to_model(torch.tensor(bunch.data, dtype=torch.float32)).reshape(-1, *IMAGE_SHAPE)
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    index = torch.arange(len(labels)).numpy()
    _, test_index = train_test_split(
        index, test_size=N_TEST, stratify=bunch.target, random_state=SPLIT_SEED
    )
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    is_test[torch.as_tensor(test_index)] = True
    return images, labels, is_test


def _class_set(classes: Optional[Iterable[int]], what: str = "classes") -> Optional[list[int]]:
    if classes is None:
        return None
    if isinstance(classes, int):
        classes = [classes]
    out = sorted({int(c) for c in classes})
    if not out or any(c < 0 or c >= N_CLASSES for c in out):
        raise ValueError(f"{what} must be a non-empty set of digits 0..9, got {classes!r}")
    return out


def load_split(split: str = "train", classes: Optional[Iterable[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, 8, 8) float32 in [-1, 1], labels (N,) int64) of ``split`` in its canonical order.

    split: "train" (1,437), "test" (360) or "all" (1,797); classes: optional subset of digits to keep.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images, labels, is_test = _load_all()
    keep = torch.ones_like(is_test) if split == "all" else (is_test if split == "test" else ~is_test)
    wanted = _class_set(classes)
    if wanted is not None:
        keep = keep & torch.isin(labels, torch.tensor(wanted))
    return images[keep].clone(), labels[keep].clone()


def train_validation_split(n_validation: int = 144, seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Carve a seeded validation set out of the TRAIN split (for early stopping; the test split stays held out)."""
    images, labels = load_split("train")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    val, fit = order[:n_validation], order[n_validation:]
    return (images[fit], labels[fit]), (images[val], labels[val])


def real_digits(split: str = "test", classes: Optional[Iterable[int]] = None, return_labels: bool = False):
    """Real digits of a split (optionally only some classes), (N, 1, 8, 8) in [-1, 1]; labels too if asked."""
    images, labels = load_split(split, classes)
    return (images, labels) if return_labels else images
