"""Noise schedules for engine use outside ComfyUI (inside ComfyUI the scheduler nodes provide sigmas)."""
from __future__ import annotations

import torch


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 (eq. 5) schedule of n levels from sigma_max to sigma_min, then a final 0."""
    if n < 1:
        raise ValueError("the schedule needs at least one step")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sig, sig.new_zeros(1)])


def flow_sigmas(n: int, shift: float = 1.0) -> torch.Tensor:
    """Rectified-flow schedule: n levels from 1 down to 1/n (time-shifted as in SD3), then 0."""
    t = torch.linspace(1, 0, n + 1, dtype=torch.float64)[:-1]
    sig = shift * t / (1 + (shift - 1) * t)
    return torch.cat([sig, sig.new_zeros(1)])
