"""Diffusion alignment with GFlowNets — DAG-DB and DAG-KL (Zhang et al. 2024, arXiv 2406.00633) — and the DDPO
baseline (Black et al. 2023), as pure loss functions plus the flow network F_φ.

Notation (reference code apple/ml-diffusion-alignment-gflownet ``scripts/train_gfn.py``): a transition
x_t → x_{t−1} of a stored DDPM chain has log p_F (current policy, CFG-guided, mean over latent dims),
log p_B (fixed noising kernel, mean over dims) and the behaviour policy's log p_old.  With the
*forward-looking* flow

    log F(x_t) = F_φ(x_t, t, c) + β·r(x̂0(x_t)),        and at the end  log F(x_0) = β·r(x_0),

- DAG-DB (detailed balance):  ℓ = (log F(x_t) + log p_F − log p_B − log F(x_{t−1}))²;
- DAG-KL:  ℓ = (log F(x_t) + sg(log p_F) − log p_B − log F(x_{t−1}))² + klpf · max(−A·ρ, −A·clip(ρ, 1 ± ε)),
  δ = sg(log F(x_{t−1}) + log p_B − log p_F − log F(x_t)),  A = leave-one-out normalised δ clipped to ±5,
  ρ = exp(log p_F − log p_old);
- both add unetreg · mean((ε̂_CFG − ε̂_sampled)²), a proximal pull towards the sampling policy;
- DDPO: max(−A·ρ, −A·clip(ρ, 1 ± ε)) with A the final reward standardised over the batch (per prompt), ±5.

β is annealed linearly: β_epoch = β_max · min(1, epoch / (0.5 · epochs)).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

ADV_EPS = 1e-8  # the reference's denominator guard in advantage normalisation


# ------------------------------------------------------------------------------------------ schedules
def reward_temperature(epoch: int, epochs: int, beta_max: float = 100.0, anneal: str = "linear") -> float:
    """β of epoch ``epoch`` (0-based): β_max·min(1, epoch / (0.5·epochs)) for ``linear``, β_max for ``none``."""
    if anneal == "none":
        return float(beta_max)
    if anneal != "linear":
        raise ValueError(f"anneal must be 'linear' or 'none', got {anneal!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    return float(beta_max) * min(1.0, epoch / (0.5 * epochs))


# ------------------------------------------------------------------------------------------ advantages
def leave_one_out_advantages(values: torch.Tensor, clip: float = 5.0) -> torch.Tensor:
    """Leave-one-out normalisation (reference DAG-KL): b_i = mean_{j≠i} v_j,
    var_i = mean_{j≠i} (v_j − b_j)², A_i = (v_i − b_i)/(√var_i + 1e-8), clipped to ±clip.  Needs ≥ 2 values."""
    values = values.detach()
    n = values.shape[0]
    if n < 2:
        raise ValueError("leave-one-out advantages need at least 2 samples per minibatch (DAG-KL: batch_size >= 2)")
    baseline = (values.sum() - values) / (n - 1)
    centred_sq = (values - baseline) ** 2
    variance = (centred_sq.sum() - centred_sq) / (n - 1)
    advantages = (values - baseline) / (variance.sqrt() + ADV_EPS)
    return advantages.clamp(-clip, clip)


def standardised_advantages(rewards: torch.Tensor, clip: float = 5.0) -> torch.Tensor:
    """DDPO: (r − mean) / (std + 1e-8) over the batch (population std), clipped to ±clip."""
    rewards = rewards.detach().double()
    adv = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + ADV_EPS)
    return adv.clamp(-clip, clip).float()


# ------------------------------------------------------------------------------------------ losses
def clipped_surrogate(advantages: torch.Tensor, log_pf: torch.Tensor, log_p_old: torch.Tensor,
                      clip_range: float = 1e-4) -> torch.Tensor:
    """PPO's clipped objective as a per-sample loss: max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = exp(log p_F − log p_old)."""
    ratio = torch.exp(log_pf - log_p_old.detach())
    advantages = advantages.detach().to(ratio)
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range))


def db_residual(log_flow: torch.Tensor, log_pf: torch.Tensor, log_pb: torch.Tensor,
                log_flow_next: torch.Tensor) -> torch.Tensor:
    """log F(x_t) + log p_F(x_{t−1}|x_t) − log p_B(x_t|x_{t−1}) − log F(x_{t−1}) (zero under detailed balance)."""
    return log_flow + log_pf - log_pb - log_flow_next


def dag_db_loss(log_flow: torch.Tensor, log_pf: torch.Tensor, log_pb: torch.Tensor,
                log_flow_next: torch.Tensor) -> torch.Tensor:
    """Per-transition DAG-DB loss: the squared detailed-balance residual (gradient to F_φ and the policy)."""
    return db_residual(log_flow, log_pf, log_pb.detach(), log_flow_next) ** 2


def dag_kl_loss(log_flow: torch.Tensor, log_pf: torch.Tensor, log_pb: torch.Tensor, log_flow_next: torch.Tensor,
                log_p_old: torch.Tensor, klpf: float = 1.0, clip_range: float = 1e-4,
                adv_clip: float = 5.0, advantage_fn=None) -> tuple[torch.Tensor, dict]:
    """Per-transition DAG-KL loss: DB on F_φ only (log p_F detached) + klpf × the clipped REINFORCE term with
    leave-one-out advantages of δ = sg(log F(x_{t−1}) + log p_B − log p_F − log F(x_t)).
    ``advantage_fn(δ, clip)`` replaces the leave-one-out over this batch (data parallel: over all ranks' rows)."""
    log_pb = log_pb.detach()
    flow_loss = db_residual(log_flow, log_pf.detach(), log_pb, log_flow_next) ** 2
    delta = (log_flow_next + log_pb - log_pf - log_flow).detach()
    advantages = (advantage_fn or leave_one_out_advantages)(delta, adv_clip)
    policy_loss = clipped_surrogate(advantages, log_pf, log_p_old, clip_range)
    return flow_loss + klpf * policy_loss, {"flow_loss": flow_loss.detach(), "policy_loss": policy_loss.detach()}


def ddpo_loss(advantages: torch.Tensor, log_pf: torch.Tensor, log_p_old: torch.Tensor,
              clip_range: float = 1e-4) -> torch.Tensor:
    """Per-transition DDPO loss (the same advantage at every timestep of a chain)."""
    return clipped_surrogate(advantages, log_pf, log_p_old, clip_range)


def proximal_term(eps_now: torch.Tensor, eps_sampled: torch.Tensor) -> torch.Tensor:
    """mean over latent dims of (ε̂_CFG − ε̂_sampled)² (the reference's ``unetreg``), per sample."""
    diff = (eps_now - eps_sampled.detach()) ** 2
    return diff.mean(dim=tuple(range(1, diff.ndim)))


# ------------------------------------------------------------------------------------------ flow network
def timestep_features(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of log σ (N,) -> (N, dim) (the flow's time input; σ is the chain's noise level)."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    args = 250.0 * torch.log(sigma.float().clamp_min(1e-6))[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class FlowBlock(nn.Module):
    """conv 3×3 (stride 2) → GroupNorm → time/prompt FiLM → SiLU."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(min(8, c_out), c_out)
        self.film = nn.Linear(emb_dim, 2 * c_out)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        return nn.functional.silu(self.norm(self.conv(h)) * (1 + scale) + shift)


class FlowNetwork(nn.Module):
    """Log-flow F_φ(z_t, σ_t, c) → scalar: a small strided conv encoder with time (log σ) and conditioning
    embeddings, average pooling and a linear head (the reference uses a 4-block UNet encoder with text
    cross-attention; here the conditioning is one learned embedding per prompt of the training set, plus an
    optional pooled text vector).  The head starts at zero, so F_φ = 0 before training."""

    def __init__(self, in_channels: int, channels: tuple[int, ...] = (32, 64, 128), n_prompts: int = 1,
                 cond_dim: int = 0, emb_dim: int = 128):
        super().__init__()
        if n_prompts < 1:
            raise ValueError("flow network: n_prompts must be >= 1")
        self.emb_dim, self.cond_dim = int(emb_dim), int(cond_dim)
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.prompt_embedding = nn.Embedding(int(n_prompts), emb_dim)
        self.cond_proj = nn.Linear(cond_dim, emb_dim) if cond_dim > 0 else None
        blocks, c = [], in_channels
        for c_out in channels:
            blocks.append(FlowBlock(c, c_out, emb_dim))
            c = c_out
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(c, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, z: torch.Tensor, sigma: torch.Tensor, prompt_index: torch.Tensor,
                cond_vector: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = z.shape[0]
        sigma = torch.as_tensor(sigma, device=z.device).reshape(-1).expand(n)
        emb = self.time_mlp(timestep_features(sigma, self.emb_dim))
        emb = emb + self.prompt_embedding(torch.as_tensor(prompt_index, device=z.device).reshape(-1).expand(n))
        if self.cond_proj is not None and cond_vector is not None:
            emb = emb + self.cond_proj(cond_vector.to(emb).reshape(n, -1))
        h = z.float()
        for block in self.blocks:
            h = block(h, emb)
        return self.head(h.mean(dim=(2, 3))).squeeze(1)
