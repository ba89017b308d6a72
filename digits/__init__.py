"""comfy_poe.digits — the embedded default models: real 8x8 digits (scikit-learn ``load_digits``), a
class-conditional EDM diffusion UNet, a noise-aware guidance classifier, a held-out evaluator and a fast MLP
denoiser, all trained on CPU in minutes and shipped in ``digits/weights/`` (safetensors).

Engine code: plain torch (+ diffusers' UNet2DModel), no ComfyUI imports. Latents here ARE the digits:
(N, 1, 8, 8) float tensors in [-1, 1], variance-exploding noise x = x0 + σ·ε ("eps" parameterisation).

Split discipline (see :mod:`.data`): every model trains on the train split (1,437); the test split (360) is
only ever used for held-out numbers and as the real-digit reference; the evaluator only judges.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from ..experts import LATENT, DiscriminativeExpert
from .data import N_CLASSES, load_split, model_to_unit, real_digits, train_validation_split
from .models import (
    NULL_CLASS, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, DigitsDenoiser, DigitsEvaluator, EDMUNet, MLPDenoiserNet,
    NoiseAwareClassifier, edm_coefficients,
)
from .sampling import frechet_distance, karras_sigmas, sample_heun
from .store import WEIGHTS_DIR, load_classifier, load_denoiser, load_evaluator, load_metadata

__all__ = [
    "N_CLASSES", "NULL_CLASS", "SIGMA_DATA", "SIGMA_MAX", "SIGMA_MIN", "WEIGHTS_DIR",
    "DigitsDenoiser", "DigitsEvaluator", "EDMUNet", "MLPDenoiserNet", "NoiseAwareClassifier",
    "classifier_judge", "classifier_log_prob", "edm_coefficients", "frechet_distance", "karras_sigmas", "load_classifier",
    "load_denoiser", "load_evaluator", "load_metadata", "load_split", "model_to_unit", "real_digits",
    "sample_heun", "sample_reference", "train_validation_split",
]


def _is_int(c) -> bool:
    if torch.is_tensor(c):
        return c.ndim == 0 and not c.is_floating_point() and c.dtype != torch.bool
    return isinstance(c, numbers.Integral) and not isinstance(c, bool)


def _class_list(classes, what: str = "classes") -> list[int]:
    """An int or a collection of ints 0..9 -> sorted unique list (clear errors otherwise)."""
    try:
        items = [classes] if _is_int(classes) else list(classes)
    except TypeError:
        items = [classes]
    if not all(_is_int(c) for c in items):
        raise TypeError(f"{what} must be an int 0..9 or a collection of them, got {classes!r}")
    values = sorted({int(c) for c in items})
    if not values or any(c < 0 or c >= N_CLASSES for c in values):
        raise ValueError(f"{what} must be a non-empty set of digits 0..9, got {classes!r}")
    return values


def classifier_log_prob(classes, classifier: Optional[NoiseAwareClassifier] = None):
    """The noise-aware potential (x_σ, σ) -> log Σ_{c∈classes} p(c | x_σ), shape (N,), differentiable in x.

    For guidance / twisting on the noisy state (the classifier was trained on σ ∈ [0.002, 80]; σ below
    σ_min, e.g. the 0 a noisy judge receives at the final level, is treated as σ_min).
    """
    wanted = _class_list(classes)
    model = classifier if classifier is not None else load_classifier()

    def log_prob(x: torch.Tensor, sigma) -> torch.Tensor:
        device = next(model.parameters()).device
        # a noisy judge gets σ = 0 at the final level (the clean sample): the classifier's σ_min is clean enough
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device).clamp_min(SIGMA_MIN)
        log_p = model.log_probs(x.to(device=device, dtype=torch.float32), sigma)
        return torch.logsumexp(log_p[:, wanted], dim=1).to(x.device)

    return log_prob


def classifier_judge(classes, weight: float = 1.0, classifier: Optional[NoiseAwareClassifier] = None,
                     sigma: float = SIGMA_MIN, name: Optional[str] = None) -> DiscriminativeExpert:
    """A differentiable latent-space judge r(x0) = log Σ_{c∈classes} p(c | x0), using the guidance classifier
    on clean predictions (told σ = ``sigma``, default σ_min = 0.002, i.e. clean-image use).

    For judging results use the separate evaluator (:func:`load_evaluator`), never this reward model.
    """
    wanted = _class_list(classes)
    potential = classifier_log_prob(wanted, classifier)

    def fn(x0: torch.Tensor) -> torch.Tensor:
        if x0.ndim != 4 or tuple(x0.shape[1:]) != (1, 8, 8):
            raise ValueError(f"digits classifier judge expects latents shaped (N, 1, 8, 8), got {tuple(x0.shape)}")
        return potential(x0, torch.full((x0.shape[0],), float(sigma)))

    return DiscriminativeExpert(
        fn=fn, weight=weight, space=LATENT, differentiable=True,
        name=name or f"digits_classifier{{{','.join(map(str, wanted))}}}",
        info={"classes": wanted, "sigma": float(sigma), "model": "digits noise-aware guidance classifier"},
    )


@torch.no_grad()
def sample_reference(classes, n: int, seed: int, steps: int = 30, cfg: float = 1.0,
                     denoiser: Optional[DigitsDenoiser] = None, device="cpu") -> torch.Tensor:
    """Baseline samples (n, 1, 8, 8) in [-1, 1]: deterministic Heun on Karras sigmas (ρ=7, σ 80 → 0.002).

    classes: an int 0..9, None (unconditional), a set of classes (attribute expert p(x | y ∈ S), needs the
    classifier) or an int64 tensor of n per-sample labels. cfg: classifier-free guidance scale
    (D_u + cfg·(D_c − D_u); 1 = plain conditional). Same seed → identical samples.
    """
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    model = denoiser if denoiser is not None else load_denoiser(device=device)
    g = torch.Generator().manual_seed(int(seed))
    sigmas = karras_sigmas(steps)
    x = (torch.randn((int(n), 1, 8, 8), generator=g) * sigmas[0]).to(device)
    if isinstance(classes, (set, frozenset, list, tuple, range)):
        classes = frozenset(_class_list(classes))

    def denoise(x, sigma):
        if cfg == 1.0 or classes is None:
            return model.denoise(x, sigma, [classes])[0]
        cond, uncond = model.denoise(x, sigma, [classes, None])
        return uncond + cfg * (cond - uncond)

    return sample_heun(denoise, x, sigmas)
