"""A small reference sampler (Heun on Karras sigmas) and the Fréchet distance — for sanity checks only.

The PoE / SMC sampler of comfy_poe.samplers replaces this for comparisons; this one is the plain baseline:
deterministic Heun (Karras et al. 2022, Algorithm 1 with S_churn = 0) on the probability-flow ODE
dx/dσ = (x - D(x, σ)) / σ, Karras noise levels with ρ = 7 from σ_max = 80 to σ_min = 0.002 (Eq. 5).
"""
from __future__ import annotations

from typing import Callable

import torch

from .models import SIGMA_MAX, SIGMA_MIN


def karras_sigmas(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = 7.0) -> torch.Tensor:
    """σ_i = (σ_max^{1/ρ} + i/(n-1)·(σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ, i = 0..n-1, then a final 0 (Karras Eq. 5)."""
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    steps = int(steps)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


@torch.no_grad()
def sample_heun(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Deterministic Heun (2nd order) from x at sigmas[0] down to sigmas[-1] (Karras Algorithm 1, S_churn=0).

    denoise(x, sigma (N,)) -> x0 prediction. The last step to σ = 0 is an Euler step
    (2·steps - 1 model calls for steps noise levels).
    """
    n = x.shape[0]
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = (x - denoise(x, x.new_full((n,), s))) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d_next = (x_next - denoise(x_next, x.new_full((n,), s_next))) / s_next
            x_next = x + (s_next - s) * 0.5 * (d + d_next)
        x = x_next
    return x


def _symmetric_sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, FID):

        ‖μ_a − μ_b‖² + tr Σ_a + tr Σ_b − 2 tr (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2}

    computed in float64 with symmetric eigendecompositions (Σ_a^{1/2} Σ_b Σ_a^{1/2} is symmetric PSD, so its
    square-root trace is Σ sqrt(eigenvalues)) — no scipy needed. Rows are samples.
    """
    a = torch.as_tensor(feats_a).detach().to(torch.float64).cpu()
    b = torch.as_tensor(feats_b).detach().to(torch.float64).cpu()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with the same D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("each feature set needs at least 2 rows to estimate a covariance")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _symmetric_sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    tr_cross = torch.linalg.eigvalsh(0.5 * (middle + middle.T)).clamp_min(0).sqrt().sum()
    value = (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_cross
    return float(value.clamp_min(0))
