"""Sample-quality statistics against exact or real reference samples."""
from __future__ import annotations

import torch


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_projections: int = 256, seed: int = 0,
                       weights_a: torch.Tensor | None = None) -> float:
    """Sliced Wasserstein-2 distance between point sets a (N, D) and b (M, D).

    sqrt(mean over random unit directions θ of W2²(θ·a, θ·b)); in 1-D W2 is the L2 distance of the
    quantile functions, evaluated at b's M mid-point quantile levels. ``weights_a`` (N,) makes a a
    weighted set (e.g. SMC particles with their final importance weights, which avoids the noise a
    final resampling adds). Fixed directions (seed) make the statistic deterministic.
    """
    a = a.reshape(a.shape[0], -1).to(torch.float64)
    b = b.reshape(b.shape[0], -1).to(torch.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"sliced Wasserstein needs sets of one dimension, got {a.shape[1]} and {b.shape[1]}")
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], n_projections, generator=gen, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pb = torch.sort(b @ theta, dim=0).values
    if weights_a is None and a.shape[0] == b.shape[0]:
        pa = torch.sort(a @ theta, dim=0).values
        return float(((pa - pb) ** 2).mean().sqrt())
    w = torch.full((a.shape[0],), 1.0 / a.shape[0], dtype=torch.float64) if weights_a is None else weights_a.to(torch.float64)
    w = w / w.sum()
    proj = a @ theta
    order = torch.argsort(proj, dim=0)
    sorted_proj = torch.gather(proj, 0, order)
    cdf = torch.cumsum(w[order], dim=0)  # (N, P)
    levels = (torch.arange(b.shape[0], dtype=torch.float64) + 0.5) / b.shape[0]
    idx = torch.searchsorted(cdf.T.contiguous(), levels.expand(n_projections, -1).contiguous()).T.clamp_max(a.shape[0] - 1)
    pa = torch.gather(sorted_proj, 0, idx)
    return float(((pa - pb) ** 2).mean().sqrt())


def noise_floor(mixture, n: int, pairs: int = 4, seed: int = 1, n_projections: int = 256) -> float:
    """Mean sliced-W2 between independent exact sample sets of size n: what a perfect sampler scores."""
    gen = torch.Generator().manual_seed(seed)
    return sum(sliced_wasserstein(mixture.sample(n, gen), mixture.sample(n, gen), n_projections) for _ in range(pairs)) / pairs


def mode_clusters(mixture) -> torch.Tensor:
    """Mode label per component: components whose means are closer than the sum of their RMS
    standard deviations are one mode (a product of mixtures often has near-coincident components,
    and a hard assignment between them would measure noise, not mode masses)."""
    k = mixture.n_components
    std = (torch.diagonal(mixture.covs, dim1=-2, dim2=-1).mean(-1)).sqrt()
    dist = torch.cdist(mixture.means, mixture.means)
    close = dist < std[:, None] + std[None, :]
    label = torch.arange(k)
    changed = True
    while changed:  # connected components by label propagation
        new = torch.where(close, label[None, :].expand(k, k), torch.full((k, k), k)).min(1).values
        changed = bool((new != label).any())
        label = new
    return torch.unique(label, return_inverse=True)[1]


def mode_weights(samples: torch.Tensor, mixture) -> torch.Tensor:
    """Fraction of samples per mode (see :func:`mode_clusters`), assigned through the most
    responsible component of ``mixture``."""
    clusters = mode_clusters(mixture)
    resp = mixture.responsibilities(samples.to(torch.float64))
    counts = torch.bincount(clusters[resp.argmax(1)], minlength=int(clusters.max()) + 1)
    return counts.double() / samples.shape[0]


def mode_weight_error(samples: torch.Tensor, mixture) -> float:
    """Total-variation distance between the empirical mode masses and those of exact samples
    assigned the same way (so a perfect sampler scores ≈ 0)."""
    gen = torch.Generator().manual_seed(12345)
    ref = mixture.sample(200_000, generator=gen)
    return 0.5 * float((mode_weights(samples, mixture) - mode_weights(ref, mixture)).abs().sum())
