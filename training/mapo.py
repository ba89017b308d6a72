"""Preference losses on denoising errors: MaPO (Hong et al. 2024, arXiv 2406.06424), Diffusion-DPO
(Wallace et al. 2023) and SFT on the chosen images.

For a pair (chosen y_w, rejected y_l) with the same prompt, ONE noise ε and ONE timestep t are drawn per
pair and used for both images; L_w, L_l are the per-sample denoising MSEs (mean over C, H, W) against the
model's target (ε, or v for V-prediction models) — reference code mapo-t2i/mapo ``train.py``:

- MaPO:  g(L) = s·L / (exp(s·L) − 1)  (s = ``snr_value`` 0.5; computed with expm1),
         loss = mean(L_w) − β · mean(log σ(T · (g(L_w) − g(L_l)))),  T = 1000 (training timesteps), β = 0.1;
- Diffusion-DPO (frozen reference model):
         loss = −mean(log σ(−½·β_dpo·((L_w − L_w^ref) − (L_l − L_l^ref)))),  β_dpo ≈ 5000 (SD1.5);
- SFT:   loss = mean(L_w).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

METHODS = ("mapo", "dpo", "sft")


def bounded_link(losses: torch.Tensor, snr_value: float = 0.5) -> torch.Tensor:
    """g(L) = s·L / (exp(s·L) − 1) with expm1 (g(0) = 1, the limit; g is decreasing in L)."""
    x = snr_value * losses
    small = x.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1.0 - x / 2, safe / torch.expm1(safe))


def mapo_loss(losses_w: torch.Tensor, losses_l: torch.Tensor, beta: float = 0.1, num_train_timesteps: int = 1000,
              snr_value: float = 0.5) -> tuple[torch.Tensor, dict]:
    """MaPO (reference ``train.py``): mean(L_w) − β·mean(log σ(T·(g(L_w) − g(L_l))))."""
    log_odds = bounded_link(losses_w, snr_value) - bounded_link(losses_l, snr_value)
    ratio = F.logsigmoid(log_odds * num_train_timesteps)
    loss = losses_w.mean() - (beta * ratio).mean()
    with torch.no_grad():
        metrics = {"margin_term": float(-ratio.mean()), "win_score": float(bounded_link(losses_w, snr_value).mean()),
                   "lose_score": float(bounded_link(losses_l, snr_value).mean())}
    return loss, metrics


def dpo_loss(losses_w: torch.Tensor, losses_l: torch.Tensor, ref_losses_w: torch.Tensor, ref_losses_l: torch.Tensor,
             beta_dpo: float = 5000.0) -> tuple[torch.Tensor, dict]:
    """Diffusion-DPO: −mean(log σ(−½·β_dpo·((L_w − L_w^ref) − (L_l − L_l^ref)))) (reference terms detached)."""
    model_diff = losses_w - losses_l
    ref_diff = (ref_losses_w - ref_losses_l).detach()
    inside = -0.5 * beta_dpo * (model_diff - ref_diff)
    loss = -F.logsigmoid(inside).mean()
    return loss, {"implicit_acc": float((inside > 0).float().mean())}


def sft_loss(losses_w: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Supervised fine-tuning on the chosen images only: mean(L_w)."""
    return losses_w.mean(), {}


def check_method(method: str) -> str:
    key = str(method).strip().lower().replace("-", "").replace("_", "").replace("diffusion", "")
    if key not in METHODS:
        raise ValueError(f"preference method must be one of MaPO, DPO, SFT; got {method!r}")
    return key


def denoising_losses(denoised: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                     parameterization: str = "eps") -> torch.Tensor:
    """Per-sample MSE (mean over C, H, W) of the model's native target, from its x̂0 prediction at
    x_t = x0 + σ·ε (VE coordinates, k-diffusion denoiser output ``denoised``):
    EPS: ε̂ = (x_t − x̂0)/σ vs ε;  V: v = α·ε − s·x0 with α = 1/√(1+σ²), s = σ/√(1+σ²) (VP velocity);
    CONST (rectified flow, SD3 / Flux): the flow-matching velocity v̂ = (x_f − x̂0)/t vs ε − x0 at the same state in
    flow coordinates, x_f = x_t/(1+σ), t = σ/(1+σ) (rectified flow, Esser et al. 2024)."""
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0)
    x_t = x0 + s * noise
    eps_hat = (x_t - denoised) / s
    if parameterization == "eps":
        pred, target = eps_hat, noise
    elif parameterization == "v_prediction":
        alpha, s_vp = 1 / torch.sqrt(1 + s**2), s / torch.sqrt(1 + s**2)
        pred, target = alpha * eps_hat - s_vp * denoised, alpha * noise - s_vp * x0
    elif parameterization == "const":
        t = s / (1 + s)
        pred, target = (x_t / (1 + s) - denoised) / t, noise - x0
    else:
        raise ValueError(f"preference training supports EPS, V-prediction and flow (const) models, got "
                         f"{parameterization!r}")
    err = (pred.float() - target.float()) ** 2
    return err.mean(dim=tuple(range(1, err.ndim)))


def ddpm_training_sigmas(n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """The discrete training noise levels of an SD-style ε model (scaled-linear β schedule, ComfyUI's
    ``model_sampling.sigmas``): σ_t = √((1 − ᾱ_t)/ᾱ_t), t = 0..n−1 (increasing)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, int(n), dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    return ((1 - abar) / abar).sqrt()
