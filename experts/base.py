"""Shared expert vocabulary: parameterisations, score <-> denoised conversions, discriminative experts.

Conventions (k-diffusion / ComfyUI): a denoiser D(x, sigma) returns the clean-sample prediction x0 in
the model's own coordinates.
- EPS, V_PREDICTION, X0 models live in variance-exploding (VE) coordinates: x = x0 + sigma * eps.
- CONST (rectified flow) models use x = (1 - sigma) * x0 + sigma * eps with sigma in [0, 1].
A CONST state maps exactly onto VE coordinates with y = x / (1 - sigma), sigma_ve = sigma / (1 - sigma)
and the same x0 (reference poe_smc.md, "Flow (CONST) models map into VE coordinates exactly").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

EPS = "eps"
V_PREDICTION = "v_prediction"
X0 = "x0"
CONST = "const"
PARAMETERIZATIONS = (EPS, V_PREDICTION, X0, CONST)


def canonical_parameterization(name: str) -> str:
    """Normalise a parameterisation name; EPS, V_PREDICTION and X0 share VE coordinates."""
    key = str(name).lower().replace("-", "_")
    aliases = {"v": V_PREDICTION, "flow": CONST, "rectified_flow": CONST, "epsilon": EPS}
    key = aliases.get(key, key)
    if key not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {name!r}; expected one of {PARAMETERIZATIONS}")
    return key


def is_flow(parameterization: str) -> bool:
    return canonical_parameterization(parameterization) == CONST


def _expand(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample sigma (N,) or scalar against a batch shaped (N, ...)."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(sigma.shape + (1,) * (like.ndim - sigma.ndim))


def score_from_denoised(denoised: torch.Tensor, x: torch.Tensor, sigma, parameterization: str) -> torch.Tensor:
    """Score of the noised marginal, grad_x log p_sigma(x), from a denoised prediction.

    EPS / V / X0:  s = (D - x) / sigma^2
    CONST (flow):  s = ((1 - sigma) * D - x) / sigma^2
    """
    s = _expand(sigma, x)
    if is_flow(parameterization):
        return ((1 - s) * denoised - x) / s**2
    return (denoised - x) / s**2


def denoised_from_score(score: torch.Tensor, x: torch.Tensor, sigma, parameterization: str) -> torch.Tensor:
    """Inverse of :func:`score_from_denoised`."""
    s = _expand(sigma, x)
    if is_flow(parameterization):
        return (x + s**2 * score) / (1 - s)
    return x + s**2 * score


def to_ve(x: torch.Tensor, sigma, parameterization: str):
    """Map a state and its noise level into VE coordinates (identity for EPS-like models)."""
    if not is_flow(parameterization):
        return x, torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return x / (1 - _expand(s, x)), s / (1 - s)


def from_ve(y: torch.Tensor, sigma_ve, parameterization: str):
    """Inverse of :func:`to_ve`."""
    if not is_flow(parameterization):
        return y, torch.as_tensor(sigma_ve, dtype=y.dtype, device=y.device)
    s_ve = torch.as_tensor(sigma_ve, dtype=y.dtype, device=y.device)
    s = s_ve / (1 + s_ve)
    return y * (1 - _expand(s, y)), s


def sigma_to_ve(sigma: float, parameterization: str) -> float:
    """Noise level in VE coordinates; a flow sigma of 1 (pure noise) maps to +inf."""
    sigma = float(sigma)
    if not is_flow(parameterization):
        return sigma
    return math.inf if sigma >= 1.0 else sigma / (1.0 - sigma)


LATENT = "latent"
PIXEL = "pixel"


@dataclass
class DiscriminativeExpert:
    """A batched log-potential r(x0) used as a multiplicative expert exp(weight * r).

    ``fn`` maps a batch of clean predictions (latents, or pixels when ``space == "pixel"``; pixels are
    ComfyUI IMAGE layout (N, H, W, C) in [0, 1]) to a tensor of shape (N,) of finite log-potentials,
    e.g. log p(yes | image, question) for a VLM judge or a classifier's log-probability.
    ``differentiable`` says whether autograd through ``fn`` gives a usable gradient (gradient twisting,
    training losses); black-box rewards set it False.
    ``noisy=True`` marks a noise-aware potential (e.g. a classifier trained on noised inputs): it is
    called as ``fn(x_t, sigma)`` on the current noisy latents (model coordinates) and per-sample sigma
    (N,) instead of on x0 — the exact twisting function log p(y | x_t) of twisted SMC (Wu et al. 2023);
    at the final level it receives the clean sample and sigma 0.
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    weight: float = 1.0
    space: str = LATENT
    differentiable: bool = False
    name: str = "judge"
    info: dict = field(default_factory=dict)
    noisy: bool = False

    def __post_init__(self):
        if self.noisy and self.space != LATENT:
            raise ValueError(f"judge {self.name!r}: a noise-aware (noisy) judge must work on latents")
        if self.space not in (LATENT, PIXEL):
            raise ValueError(f"judge {self.name!r}: space must be 'latent' or 'pixel', got {self.space!r}")
        if not math.isfinite(float(self.weight)):
            raise ValueError(f"judge {self.name!r}: weight must be finite, got {self.weight!r}")


def evaluate_potentials(
    judges: list[DiscriminativeExpert],
    x0: torch.Tensor,
    decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    x_t: Optional[torch.Tensor] = None,
    sigma: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sum_j weight_j * r_j(x0) for a batch, decoding once for all pixel-space judges.

    Noise-aware judges get ``(x_t, sigma)`` instead (x_t defaults to x0 with sigma 0).

    Raises a clear error for a missing decoder, a wrongly shaped result or a NaN potential
    (-inf is allowed: it means 'impossible' and is handled by the weights).
    """
    n = x0.shape[0]
    total = torch.zeros(n, dtype=torch.float64, device=x0.device)
    pixels = None
    for judge in judges:
        if judge.space == PIXEL:
            if decode is None:
                raise ValueError(
                    f"judge {judge.name!r} scores decoded pixels but no decoder (VAE) was given"
                )
            if pixels is None:
                pixels = decode(x0)
            value = judge.fn(pixels)
        elif judge.noisy:
            xt = x0 if x_t is None else x_t
            sig = torch.zeros(n, dtype=xt.dtype, device=xt.device) if sigma is None else sigma
            value = judge.fn(xt, sig)
        else:
            value = judge.fn(x0)
        value = torch.as_tensor(value)
        if value.shape != (n,):
            raise ValueError(
                f"judge {judge.name!r} returned shape {tuple(value.shape)}; expected ({n},), one score per sample"
            )
        if torch.isnan(value).any():
            raise ValueError(f"judge {judge.name!r} returned NaN log-potentials")
        if (value == math.inf).any():
            raise ValueError(f"judge {judge.name!r} returned +inf log-potentials")
        total = total + judge.weight * value.to(device=x0.device, dtype=torch.float64)
    return total
