"""DDPM rollouts (DDIM with η = 1) with per-step Gaussian log-probabilities, on engine denoisers.

The engine's models are k-diffusion denoisers in variance-exploding (VE) coordinates, x = x0 + σ·ε, with
``model.denoise(x, sigma, conds) -> [x̂0 per conditioning]`` (EPS and V-prediction models; flow models are
not DDPM chains and are refused).  The DDPM / DDIM chain and its densities live in variance-preserving
(VP) coordinates, where the reference (DDPO, Black et al. 2023; DAG-GFlowNet, Zhang et al. 2024, code
``ddim_step_with_logprob``) computes them:

    ᾱ(σ) = 1 / (1 + σ²),       z = √ᾱ · x            (ComfyUI's ``calculate_input`` scaling)

so a discrete-time ᾱ schedule (SD's 1000 ᾱ_t, ComfyUI's ``model_sampling.sigmas``) and k-diffusion sigma
lists are the same thing.  A step t → s (σ_s < σ_t) with ε̂ the (CFG-guided) noise prediction is DDIM
Eq. 12/16 (Song et al. 2021) with η = 1:

    x̂0 = (z_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t
    std² = η² · (1−ᾱ_s)/(1−ᾱ_t) · (1 − ᾱ_t/ᾱ_s)
    z_s ~ N(√ᾱ_s·x̂0 + √(1−ᾱ_s−std²)·ε̂,  std²·I)                                   (forward policy p_F)

and the fixed backward (noising) kernel of the GFlowNet is p_B(z_t | z_s) = N(√(ᾱ_t/ᾱ_s)·z_s, (1−ᾱ_t/ᾱ_s)·I).
Both log-densities are **averaged over latent dimensions** (not summed), as in the reference.

The chain starts from z_0 = ε ~ N(0, I) (pure noise, ComfyUI's "max denoise" start) and ends at the last
σ_N > 0 of the schedule (a trailing 0 is dropped: the final Gaussian step to σ = 0 would have zero variance;
DDIM's last step likewise ends at ᾱ_0 < 1 for SD).  The final sample x_N = z_N / √ᾱ_N (model coordinates)
is what the reward sees.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..experts.base import canonical_parameterization, is_flow

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


# ------------------------------------------------------------------------------------------ pure helpers
def alpha_bar(sigma: torch.Tensor) -> torch.Tensor:
    """ᾱ = 1 / (1 + σ²) (VE noise level → VP signal fraction)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return 1.0 / (1.0 + sigma.double() ** 2)


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim)) if v.ndim else v


def to_vp(x: torch.Tensor, sigma) -> torch.Tensor:
    """z = x / √(1 + σ²)."""
    return x / torch.sqrt(1.0 + _view(sigma, x) ** 2)


def from_vp(z: torch.Tensor, sigma) -> torch.Tensor:
    """x = z · √(1 + σ²)."""
    return z * torch.sqrt(1.0 + _view(sigma, z) ** 2)


def gaussian_log_prob_mean(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std²·I) averaged over all but the batch dimension (reference ``logp_mean=True``)."""
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    log_prob = -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def _coef(v, like: torch.Tensor) -> torch.Tensor:
    """A float64 per-sample (N,) or scalar coefficient, broadcast against ``like`` in its dtype."""
    return _view(torch.as_tensor(v, dtype=torch.float64), torch.empty((), dtype=torch.float64).expand(like.shape)
                 ).to(device=like.device, dtype=like.dtype)


def ddpm_step_moments(z_t: torch.Tensor, eps: torch.Tensor, abar_t, abar_s,
                      eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of p_F(z_s | z_t) — DDIM Eq. 12 with σ_t(η) of Eq. 16; η = 1 is DDPM.
    ``abar_t``/``abar_s``: per-sample (N,) tensors or scalars (coefficients computed in float64: near σ = 0
    the ratio ᾱ_t/ᾱ_s is within 1e-5 of 1)."""
    a_t = torch.as_tensor(abar_t, dtype=torch.float64)
    a_s = torch.as_tensor(abar_s, dtype=torch.float64)
    variance = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
    std = eta * torch.sqrt(variance)
    x0 = (z_t - _coef(torch.sqrt(1 - a_t), z_t) * eps) / _coef(torch.sqrt(a_t), z_t)
    direction = _coef(torch.sqrt((1 - a_s - std**2).clamp_min(0.0)), z_t) * eps
    return _coef(torch.sqrt(a_s), z_t) * x0 + direction, _coef(std, z_t)


def backward_log_prob(z_t: torch.Tensor, z_s: torch.Tensor, abar_t, abar_s) -> torch.Tensor:
    """log p_B(z_t | z_s) = log N(z_t; √(ᾱ_t/ᾱ_s)·z_s, (1 − ᾱ_t/ᾱ_s)·I), mean over dimensions (no gradient)."""
    ratio = torch.as_tensor(abar_t, dtype=torch.float64) / torch.as_tensor(abar_s, dtype=torch.float64)
    mean = _coef(torch.sqrt(ratio), z_s) * z_s
    return gaussian_log_prob_mean(z_t.detach(), mean.detach(), _coef(torch.sqrt(1 - ratio), z_t))


def chain_sigmas(sigmas) -> torch.Tensor:
    """The rollout's noise levels σ_0 > … > σ_N > 0 (float64; trailing zeros dropped) with clear errors."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
    while sigmas.numel() and float(sigmas[-1]) == 0.0:
        sigmas = sigmas[:-1]
    if sigmas.numel() < 2:
        raise ValueError("sigmas: a rollout needs at least 2 positive noise levels (one DDPM step)")
    if not bool((sigmas[:-1] > sigmas[1:]).all()) or float(sigmas[-1]) <= 0:
        raise ValueError("sigmas must be strictly decreasing and positive (a final 0 is allowed and dropped)")
    return sigmas


# ------------------------------------------------------------------------------------------ the policy
@dataclass
class Policy:
    """A diffusion model as a stochastic policy over DDPM chains.

    model:       engine model with ``.denoise(x, sigma, conds) -> list[x̂0]`` (VE coordinates, LoRA applied);
    sigmas:      sampling schedule (k-diffusion order, decreasing; a trailing 0 is dropped);
    latent_shape:(C, H, W) of one latent;
    cfg:         classifier-free guidance scale of the behaviour policy (1 = no guidance);
    negative:    the unconditional / negative conditioning used by CFG (e.g. an empty prompt);
    eta:         DDIM η (1 = DDPM, the setting of DDPO and DAG; 0 would make the chain deterministic).
    """

    model: Any
    sigmas: Any
    latent_shape: tuple
    cfg: float = 1.0
    negative: Any = None
    eta: float = 1.0
    parameterization: str = "eps"
    device: Any = "cpu"
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        self.parameterization = canonical_parameterization(
            getattr(self.model, "parameterization", self.parameterization))
        if is_flow(self.parameterization):
            raise ValueError("reward rollouts need a DDPM chain (EPS or V-prediction model); flow (CONST) models "
                             "are not supported by DDPO / DAG training")
        if not hasattr(self.model, "denoise"):
            raise TypeError("policy model must have .denoise(x, sigma, conds) (an engine model)")
        self.sigmas = chain_sigmas(self.sigmas)
        if not (self.eta > 0 and math.isfinite(self.eta)):
            raise ValueError(f"eta must be > 0 (η = 1 is DDPM); got {self.eta}")
        if not math.isfinite(self.cfg):
            raise ValueError(f"cfg must be finite, got {self.cfg}")
        self.latent_shape = tuple(int(s) for s in self.latent_shape)

    @property
    def n_steps(self) -> int:
        return self.sigmas.numel() - 1

    @property
    def guided(self) -> bool:
        return self.cfg != 1.0

    def denoised(self, x: torch.Tensor, sigma: torch.Tensor, cond, guided: bool = True) -> torch.Tensor:
        """x̂0 = D(x, σ | cond), with CFG D_u + w·(D_c − D_u) when ``guided`` (one batched model call)."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        if guided and self.guided:
            d_cond, d_uncond = self.model.denoise(x, sigma, [cond, self.negative])
            return d_uncond + self.cfg * (d_cond - d_uncond)
        return self.model.denoise(x, sigma, [cond])[0]

    def noise_prediction(self, z: torch.Tensor, sigma: torch.Tensor, cond, guided: bool = True):
        """(ε̂, x̂0) at the VP state z and VE level σ (per sample): ε̂ = (x − x̂0)/σ with x = z·√(1+σ²)."""
        x = from_vp(z, sigma)
        d = self.denoised(x, sigma, cond, guided)
        return (x - d) / _view(sigma, x), d


# ------------------------------------------------------------------------------------------ rollouts
@dataclass
class Trajectories:
    """B sampled chains.  ``states`` are VP latents z_0..z_N; ``log_probs[b, i]`` = log p_F(z_{i+1} | z_i)
    of the behaviour policy (mean over dims); ``eps[b, i]`` the guided noise prediction used at step i
    (the proximal term's anchor); ``rewards`` r(x_N) of the final samples ``final`` (model coordinates)."""

    states: torch.Tensor      # (B, N+1, C, H, W)
    sigmas: torch.Tensor      # (N+1,) float64
    log_probs: torch.Tensor   # (B, N)
    eps: torch.Tensor         # (B, N, C, H, W)
    final: torch.Tensor       # (B, C, H, W)
    rewards: torch.Tensor     # (B,)
    cond: Any = None

    @property
    def n_steps(self) -> int:
        return self.sigmas.numel() - 1


@torch.no_grad()
def rollout(policy: Policy, cond, batch: int, generator: torch.Generator,
            reward_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, callback=None,
            rows: Optional[slice] = None) -> Trajectories:
    """Sample ``batch`` DDPM chains for conditioning ``cond`` (all noise from ``generator``, on the CPU so
    results do not depend on the device), storing every state, log-probability and ε̂, then the reward.

    ``rows``: sample only these chains of the batch (a data-parallel rank's share); the noise of the whole
    batch is still drawn, so the chains are exactly those rows of the full batch."""
    full = (int(batch),) + policy.latent_shape
    rows = rows if rows is not None else slice(None)
    shape = (len(range(full[0])[rows]),) + policy.latent_shape
    sig = policy.sigmas
    abar = alpha_bar(sig)
    z = torch.randn(full, generator=generator)[rows].to(device=policy.device, dtype=policy.dtype)
    states, log_probs, eps_list = [z], [], []
    for i in range(policy.n_steps):
        sigma_t = torch.full((shape[0],), float(sig[i]), device=z.device, dtype=z.dtype)
        eps, _ = policy.noise_prediction(z, sigma_t, cond, guided=True)
        mean, std = ddpm_step_moments(z, eps, abar[i], abar[i + 1], policy.eta)
        noise = torch.randn(full, generator=generator)[rows].to(z)
        z_next = mean + std * noise
        log_probs.append(gaussian_log_prob_mean(z_next, mean, std))
        eps_list.append(eps)
        states.append(z_next)
        z = z_next
        if callback is not None:
            callback(i, policy.n_steps)
    final = from_vp(z, float(sig[-1]))
    rewards = reward_fn(final).float().reshape(-1) if reward_fn is not None else torch.zeros(shape[0])
    if rewards.shape[0] != shape[0]:
        raise ValueError(f"reward returned {rewards.shape[0]} values for {shape[0]} samples")
    return Trajectories(torch.stack(states, 1), sig, torch.stack(log_probs, 1), torch.stack(eps_list, 1),
                        final, rewards.to(z.device), cond)


def transition_log_probs(policy: Policy, z_t: torch.Tensor, z_s: torch.Tensor, sigma_t: torch.Tensor,
                         sigma_s: torch.Tensor, cond) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p_F(z_s | z_t) under the *current* policy (with gradient), log p_B(z_t | z_s), ε̂_CFG) for a batch
    of stored transitions with per-sample levels σ_t > σ_s (N,)."""
    abar_t, abar_s = alpha_bar(sigma_t), alpha_bar(sigma_s)
    eps, _ = policy.noise_prediction(z_t, sigma_t, cond, guided=True)
    mean, std = ddpm_step_moments(z_t, eps, abar_t, abar_s, policy.eta)
    log_pf = gaussian_log_prob_mean(z_s, mean, std)
    log_pb = backward_log_prob(z_t, z_s, abar_t, abar_s)
    return log_pf, log_pb, eps
