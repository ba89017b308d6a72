"""Rewards for the alignment trainers: any discriminative expert, plus model-free image rewards.

A *reward function* maps a batch of final latents (model coordinates, (N, C, H, W)) to a (N,) float tensor
r(x) — black-box, no gradient needed (DDPO / GFlowNet only use its value).  ``reward_function`` turns
:class:`~comfy_poe.experts.DiscriminativeExpert` judges (VLM judge, CLIP score, classifier, palette, …)
into one: r(x) = Σ_j w_j r_j(x) (decoding once for all pixel judges), exactly what the PoE sampler uses as
log-potentials.

Model-free rewards (no weights needed), as pixel-space experts on ComfyUI IMAGE batches (N, H, W, C) in [0, 1]:
- JPEG compressibility / incompressibility (DDPO, Black et al. 2023; the DAG-GFlowNet code's
  ``jpeg_(in)compressibility``): ∓ size in kB of the image saved as JPEG at quality 95 (PIL), after
  rounding to uint8 as the reference does;
- brightness: mean BT.601 luma (the cheap reward of the tests and benchmarks).
"""
from __future__ import annotations

import io
from typing import Callable, Optional, Sequence

import torch

from ..experts.base import PIXEL, DiscriminativeExpert, evaluate_potentials
from ..experts.image_judges import luma

RewardFn = Callable[[torch.Tensor], torch.Tensor]


def _check_pixels(images: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{name}: expected an IMAGE batch (N, H, W, C) with C in 1/3/4, got {shape}")
    return images


def jpeg_sizes_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB (1000 bytes) of each image saved as JPEG at ``quality`` (uint8 after round + clamp)."""
    from PIL import Image

    images = _check_pixels(images, "jpeg reward")
    pixels = (images.detach().float()[..., :3] * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        image.save(buffer, format="JPEG", quality=int(quality))
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


def jpeg_judge(mode: str = "compressibility", weight: float = 1.0, quality: int = 95) -> DiscriminativeExpert:
    """JPEG (in)compressibility reward: −kB (compressibility, favours flat simple images) or +kB
    (incompressibility, favours detail / texture).  Black-box (not differentiable)."""
    if mode not in ("compressibility", "incompressibility"):
        raise ValueError(f"jpeg reward mode must be 'compressibility' or 'incompressibility', got {mode!r}")
    sign = -1.0 if mode == "compressibility" else 1.0

    def fn(images: torch.Tensor) -> torch.Tensor:
        return sign * jpeg_sizes_kb(images, quality)

    return DiscriminativeExpert(fn, weight=weight, space=PIXEL, differentiable=False, name=f"jpeg_{mode}",
                                info={"quality": quality})


def brightness_judge(weight: float = 1.0) -> DiscriminativeExpert:
    """Mean BT.601 luma in [0, 1] (differentiable)."""

    def fn(images: torch.Tensor) -> torch.Tensor:
        images = _check_pixels(images, "brightness reward")
        if images.shape[-1] == 1:
            return images[..., 0].flatten(1).mean(1)
        return luma(images).flatten(1).mean(1)

    return DiscriminativeExpert(fn, weight=weight, space=PIXEL, differentiable=True, name="brightness")


def reward_function(judges: Sequence[DiscriminativeExpert], decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                    clamp_pixels: bool = True) -> RewardFn:
    """r(x) = Σ_j w_j r_j(x) for final latents x (no gradient).  Pixel judges see ``decode(x)`` clamped to
    [0, 1] (what a VAE Decode node shows); noise-aware judges get σ = 0."""
    judges = list(judges or [])
    if not judges:
        raise ValueError("reward: connect at least one judge / reward expert")
    for judge in judges:
        if not isinstance(judge, DiscriminativeExpert):
            raise TypeError(f"reward: expected DiscriminativeExpert objects, got {type(judge).__name__}")
        if judge.space == PIXEL and decode is None:
            raise ValueError(f"reward {judge.name!r} scores decoded pixels but no decoder (VAE) was given")
    pixel_decode = None
    if decode is not None:
        pixel_decode = (lambda z: decode(z).clamp(0.0, 1.0)) if clamp_pixels else decode  # noqa: E731

    @torch.no_grad()
    def reward(x: torch.Tensor) -> torch.Tensor:
        value = evaluate_potentials(judges, x, decode=pixel_decode).float()
        if not torch.isfinite(value).all():
            raise ValueError("reward: a judge returned a non-finite value (−inf rewards cannot be trained on)")
        return value

    return reward
