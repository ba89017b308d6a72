"""Importance weights and resampling for SMC (Douc & Cappé 2005, "Comparison of resampling schemes").

All functions take log-weights of shape (L, B): L particles for each of B independent batch items,
and a ``torch.Generator`` so every draw is reproducible.
"""
from __future__ import annotations

import math

import torch

RESAMPLING_SCHEMES = ("systematic", "stratified", "multinomial", "residual")


def normalized_log_weights(log_w: torch.Tensor) -> torch.Tensor:
    """log w - logsumexp(log w) along particles; refuses NaN and all -inf columns."""
    log_w = log_w.to(torch.float64)
    if torch.isnan(log_w).any():
        raise ValueError("particle log-weights contain NaN (a potential or a model prediction was NaN)")
    if (log_w == math.inf).any():
        raise ValueError("particle log-weights contain +inf")
    total = torch.logsumexp(log_w, dim=0, keepdim=True)
    if torch.isinf(total).any():
        bad = torch.nonzero(torch.isinf(total[0])).flatten().tolist()
        raise ValueError(
            f"every particle of batch item(s) {bad} has weight zero (all log-weights are -inf): "
            "the discriminative experts reject every sample; lower their weight or widen the constraint"
        )
    return log_w - total


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """ESS = (Σ w)² / Σ w² per batch item, in [1, L]."""
    lw = normalized_log_weights(log_w)
    return torch.exp(-torch.logsumexp(2 * lw, dim=0))


def log_mean_weight(log_w: torch.Tensor) -> torch.Tensor:
    """log (1/L Σ w): the increment of the log normalising-constant estimate log Ẑ."""
    return torch.logsumexp(log_w.to(torch.float64), dim=0) - math.log(log_w.shape[0])


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Indices i with cdf[i-1] <= u < cdf[i]; probs (L, B), u (M, B) sorted along dim 0."""
    cdf = torch.cumsum(probs, dim=0)
    cdf[-1] = 1.0  # guard against round-off leaving u > cdf[-1]
    idx = torch.searchsorted(cdf.T.contiguous(), u.T.contiguous(), right=True).T
    return idx.clamp_max(probs.shape[0] - 1)


def resample_indices(
    log_w: torch.Tensor, scheme: str = "systematic", generator: torch.Generator | None = None, n: int | None = None
) -> torch.Tensor:
    """Ancestor indices (n, B) drawn so that E[#copies of i] = n · w_i (all schemes are unbiased).

    systematic: one uniform, n evenly spaced points; stratified: one uniform per stratum;
    multinomial: n i.i.d. draws; residual: floor(n w_i) deterministic copies plus a multinomial
    draw of the remainder.
    """
    if scheme not in RESAMPLING_SCHEMES:
        raise ValueError(f"unknown resampling scheme {scheme!r}; choose one of {RESAMPLING_SCHEMES}")
    probs = normalized_log_weights(log_w).exp()
    n_particles, batch = probs.shape
    n = n_particles if n is None else int(n)
    if n < 1:
        raise ValueError("resampling needs at least one output particle")
    grid = torch.arange(n, dtype=torch.float64)[:, None]
    if scheme == "systematic":
        u = (grid + torch.rand(1, batch, dtype=torch.float64, generator=generator)) / n
    elif scheme == "stratified":
        u = (grid + torch.rand(n, batch, dtype=torch.float64, generator=generator)) / n
    elif scheme == "multinomial":
        u = torch.sort(torch.rand(n, batch, dtype=torch.float64, generator=generator), dim=0).values
    else:
        return _residual(probs, n, generator)
    return _inverse_cdf(probs, u)


def _residual(probs: torch.Tensor, n: int, generator) -> torch.Tensor:
    counts = torch.floor(n * probs).to(torch.int64)  # (L, B)
    out = []
    for b in range(probs.shape[1]):
        det = torch.repeat_interleave(torch.arange(probs.shape[0]), counts[:, b])
        rest = n - det.numel()
        if rest > 0:
            residual = n * probs[:, b] - counts[:, b]
            extra = torch.multinomial(residual / residual.sum(), rest, replacement=True, generator=generator)
            det = torch.cat([det, extra])
        out.append(torch.sort(det).values)
    return torch.stack(out, dim=1)
