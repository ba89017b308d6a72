"""Block-local (localised) resampling: the block particle filter of Rebeschini & van Handel (2015).

"Can local particle filters beat the curse of dimensionality?" (Ann. Appl. Probab. 25(5)): partition the
state's elements into blocks, give each block the log-weight of its own elements, and resample each block
independently — a new particle is stitched from blocks of different ancestors. Where the target and the
proposal factorise over blocks this is exactly an independent particle filter per block, whose weights
degenerate with the block size instead of the latent size; where they do not (correlations across block
borders, structure shared by the whole latent), stitching is biased. Local particle filters in data
assimilation: Poterjoy (2016), Farchi & Bocquet (2018, review).

Latent blocks (:func:`block_index`): b×b tiles of the last two (spatial) axes, every leading axis
(channels, frames) in the same block; a 1-D state is cut into runs of b² elements. Log-weights are
(L, B, K): L particles of B batch items, K blocks. All functions are pure torch.
"""
from __future__ import annotations

import math

import torch

from .resampling import effective_sample_size, log_mean_weight, resample_indices


def block_index(shape: tuple, block_size: int) -> tuple[torch.Tensor, int]:
    """Block id (d,) of every element of one item of ``shape`` (flattened C order) and the block count K.

    ``shape`` excludes the batch axis. b×b tiles over the last two axes (edge tiles may be smaller),
    every leading axis shares the tile; a 1-D shape is cut into runs of b² elements.
    """
    b = int(block_size)
    if b < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) == 1:
        ids = torch.arange(shape[0]) // (b * b)
        return ids, int(ids.max()) + 1 if ids.numel() else 0
    h, w = shape[-2], shape[-1]
    rows = torch.arange(h) // b
    cols = torch.arange(w) // b
    n_cols = (w + b - 1) // b
    tile = rows[:, None] * n_cols + cols[None, :]  # (h, w)
    lead = 1
    for s in shape[:-2]:
        lead *= s
    ids = tile.reshape(1, -1).expand(lead, -1).reshape(-1)
    return ids, ((h + b - 1) // b) * n_cols


BLOCK_ELEMENTS = 64  # elements per block of the automatic tile size (measured best at d = 16,384 and 262,144)


def auto_block_size(shape: tuple, elements: int = BLOCK_ELEMENTS) -> int:
    """Tile side b whose block (b×b pixels × every leading axis) holds at most ``elements`` elements, at least 1:
    4 on a 4-channel SD latent (64 elements), 2 on a 16-channel Flux latent (64), 8 for a 1-D state (runs of 64)."""
    shape = tuple(int(s) for s in shape)
    lead = 1
    for s in shape[:-2]:
        lead *= s
    return max(1, int(math.isqrt(max(elements // lead, 1))))


def block_sums(per_element: torch.Tensor, index: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """(N, d) per-element values → (N, K) sums over each block's elements."""
    flat = per_element.reshape(per_element.shape[0], -1)
    out = torch.zeros(flat.shape[0], n_blocks, dtype=flat.dtype, device=flat.device)
    return out.index_add_(1, index.to(flat.device), flat)


def block_ess(log_w: torch.Tensor) -> torch.Tensor:
    """(L, B, K) block log-weights → (B, K) effective sample size of every block."""
    L, B, K = log_w.shape
    return effective_sample_size(log_w.reshape(L, B * K)).reshape(B, K)


def block_resample(log_w: torch.Tensor, need: torch.Tensor, scheme: str, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestors (L, B, K) — each block of each item draws its own — and the log Ẑ increment (B,).

    Blocks where ``need`` (B, K) is False keep their own lineage (ancestor l for particle l). The
    log Ẑ increment is Σ over resampled blocks of log mean w_k: the normalising constant of a target that
    factorises over blocks is the product of the blocks' constants.
    """
    L, B, K = log_w.shape
    flat = log_w.reshape(L, B * K)
    anc = resample_indices(flat, scheme, generator).reshape(L, B, K)
    own = torch.arange(L)[:, None, None].expand(L, B, K)
    anc = torch.where(need[None], anc, own)
    log_z = torch.where(need, log_mean_weight(flat).reshape(B, K), torch.zeros(B, K, dtype=torch.float64)).sum(1)
    return anc, log_z


def stitch(t: torch.Tensor, anc: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Particles stitched from their blocks' ancestors: element j of particle (l, b) is taken from particle
    (anc[l, b, index[j]], b). ``t`` is particle-major (L·B, ...) (index l·B + b, the sampler's layout)."""
    L, B, _ = anc.shape
    flat = t.reshape(L, B, -1)
    idx = anc.to(flat.device)[:, :, index.to(flat.device)]  # (L, B, d)
    return torch.gather(flat, 0, idx).reshape(t.shape)


def diversity_kept(ess: torch.Tensor, particles: int) -> torch.Tensor:
    """Share of the population's diversity a resampling keeps: n effective independent draws keep 1 − 1/n of
    the variance, so (1 − 1/ESS) / (1 − 1/L), in [0, 1]."""
    return ((1.0 - 1.0 / ess) / (1.0 - 1.0 / particles)).clamp(0.0, 1.0)


def block_participation(elem: torch.Tensor, particles: int, index: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """How many elements of each block carry the spread of its FK weights across particles: the participation
    ratio (Σ_j v_j)² / Σ_j v_j² over the block's elements of v_j = Var_particles(elem_j). ``elem`` is the
    per-element FK numerator, particle-major (L·B, d); returns (B, K)."""
    v = elem.reshape(particles, -1, elem[0].numel()).to(torch.float64).var(0)  # (B, d)
    s1 = block_sums(v, index, n_blocks)
    s2 = block_sums(v * v, index, n_blocks)
    return (s1 * s1 / s2.clamp_min(1e-300)).cpu()
