"""The embedded digits models: a class-conditional EDM diffusion UNet, a noise-aware guidance classifier,
a held-out evaluator CNN and a fast MLP denoiser — plain torch (+ diffusers' UNet2DModel), CPU-sized.

State convention (k-diffusion / ComfyUI "eps" models): variance-exploding x = x0 + σ·ε with x0 in [-1, 1],
shape (N, 1, 8, 8). Denoisers return the clean prediction D(x, σ).

EDM preconditioning (Karras et al. 2022, "Elucidating the Design Space...", Table 1 / Eq. 7):
    D(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ))
    c_skip = σ_d² / (σ² + σ_d²),  c_out = σ·σ_d / sqrt(σ² + σ_d²),  c_in = 1 / sqrt(σ² + σ_d²),
    c_noise = ln(σ) / 4  (fed to the UNet's positional time embedding as 1000·c_noise = 250·ln σ).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Set as AbstractSet
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import N_CLASSES

SIGMA_DATA = 0.752  # std of the digits scaled to [-1, 1] (reference digits_benchmark.md)
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
NULL_CLASS = N_CLASSES  # label 10 = "no class" (classifier-free guidance / unconditional expert)

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=16,
    num_class_embeds=N_CLASSES + 1,
    time_embedding_type="positional",  # "fourier" breaks EDM preconditioning in this UNet (reference)
)


# -- pure helpers ------------------------------------------------------------------------------------
def _per_sample_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """σ as a float32 (N,) tensor on x's device (accepts a scalar, a 0-d or an (N,) tensor)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    sigma = sigma.reshape(-1)
    if sigma.shape[0] != x.shape[0]:
        raise ValueError(f"sigma must be a scalar or have one value per sample ({x.shape[0]}), got {tuple(sigma.shape)}")
    if not torch.all(sigma > 0):
        raise ValueError("sigma must be > 0 (σ = 0 is the data itself: return x instead of calling the denoiser)")
    return sigma


def edm_coefficients(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out, c_in, c_noise) of EDM preconditioning (Karras et al. 2022, Table 1), each shaped like σ."""
    total = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / total
    c_out = sigma * sigma_data / total.sqrt()
    c_in = 1.0 / total.sqrt()
    c_noise = sigma.log() / 4.0
    return c_skip, c_out, c_in, c_noise


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """λ(σ) = (σ² + σ_d²) / (σ·σ_d)² (Karras et al. 2022, Table 1), making the effective F-target unit-weighted."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def _view(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1, 1)


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 1000.0) -> torch.Tensor:
    """Transformer-style sin/cos features of a scalar per sample (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]  # same scale as the UNet input 1000·c_noise = 250·ln σ
    return torch.cat([args.cos(), args.sin()], dim=1)


# -- (a) diffusion model ------------------------------------------------------------------------------
def build_unet(config: Optional[dict] = None):
    """A fresh diffusers UNet2DModel for 8x8 digits (1.16M parameters with the default config)."""
    from diffusers import UNet2DModel

    return UNet2DModel(**dict(UNET_CONFIG, **(config or {})))


class EDMUNet(nn.Module):
    """D(x, σ, label) = c_skip·x + c_out·F(c_in·x, 250·ln σ, label) around a class-conditional UNet2DModel.

    ``labels`` are int64 0..9, or 10 (NULL_CLASS) for the unconditional model.
    """

    def __init__(self, unet=None, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.unet = unet if unet is not None else build_unet()
        self.sigma_data = float(sigma_data)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sigma = _per_sample_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        dtype = next(self.unet.parameters()).dtype
        raw = self.unet(
            (_view(c_in) * x.float()).to(dtype), (1000.0 * c_noise).to(dtype), class_labels=labels.to(x.device)
        ).sample
        return (_view(c_skip) * x.float() + _view(c_out) * raw.float()).to(x.dtype)


class DigitsDenoiser:
    """Engine denoiser (``parameterization = "eps"``, ``denoise(x, sigma, conds)``) for the digits UNet.

    A conditioning is one of
    - an int 0..9: the class-conditional model p(x | y = c);
    - None: the unconditional model p(x) (the null class, label 10);
    - a set / frozenset / list / tuple of classes S: the attribute expert p(x | y ∈ S). Its denoiser is
      the exact posterior-mean mixture
          D_S(x, σ) = E[x0 | x_σ, y ∈ S] = Σ_{c∈S} p(c | x_σ, S) · D(x, σ | c),
          p(c | x_σ, S) = p(c | x_σ) / Σ_{c'∈S} p(c' | x_σ),
      with p(c | x_σ) from the attached noise-aware guidance classifier (the class prior is uniform enough,
      ~10% each, that renormalising the classifier's posterior over S is the posterior given y ∈ S).
      A one-element set is just the class; the set of all ten classes is the unconditional model of the
      same family (the mixture, not the null class — see docs/demo.md, "Why tempering=capped", for why that matters).
      Needs ``classifier`` (else a clear error).
    - an int64 tensor of shape (N,): per-sample labels 0..10 (10 = null class).

    All conditionings of one call (and every class of every set) go through ONE batched UNet forward, each
    distinct class once (optionally split into chunks of ``max_batch`` rows). ``n_evals`` counts UNet rows
    evaluated.
    """

    parameterization = "eps"

    def __init__(self, network: EDMUNet, classifier: Optional["NoiseAwareClassifier"] = None, max_batch: Optional[int] = None):
        self.network = network
        self.classifier = classifier
        self.max_batch = max_batch
        self.n_evals = 0

    # -- conditioning parsing --
    @staticmethod
    def _check_class(c, what) -> int:
        if isinstance(c, bool) or not isinstance(c, numbers.Integral) and not (torch.is_tensor(c) and c.ndim == 0):
            raise TypeError(f"digits conditioning {what}: classes must be ints 0..9, got {c!r}")
        c = int(c)
        if not 0 <= c < N_CLASSES:
            raise ValueError(f"digits conditioning {what}: class must be in 0..9, got {c}")
        return c

    def _parse(self, cond, n: int, index: int):
        """-> ("labels", (N,) tensor) for a single model, or ("set", [classes]) for an attribute expert."""
        what = f"#{index}"
        if cond is None:
            return "labels", torch.full((n,), NULL_CLASS, dtype=torch.int64)
        if torch.is_tensor(cond) and cond.ndim == 1:
            labels = cond.to(torch.int64).cpu()
            if labels.shape[0] != n or (labels < 0).any() or (labels > NULL_CLASS).any():
                raise ValueError(f"digits conditioning {what}: a label tensor must have {n} entries in 0..10")
            return "labels", labels
        if isinstance(cond, (AbstractSet, list, tuple, range)):
            classes = sorted({self._check_class(c, what) for c in cond})
            if not classes:
                raise ValueError(f"digits conditioning {what}: the class set is empty")
            if len(classes) == 1:
                return "labels", torch.full((n,), classes[0], dtype=torch.int64)
            if self.classifier is None:
                raise ValueError(
                    f"digits conditioning {what}: the attribute expert y ∈ {classes} needs the noise-aware classifier "
                    "to weigh its classes; build the denoiser with load_denoiser(with_classifier=True) "
                    "or pass classifier=load_classifier()"
                )
            return "set", classes
        return "labels", torch.full((n,), self._check_class(cond, what), dtype=torch.int64)

    def _forward_rows(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.n_evals += x.shape[0]
        if self.max_batch is None or x.shape[0] <= self.max_batch:
            return self.network(x, sigma, labels)
        parts = [
            self.network(x[i : i + self.max_batch], sigma[i : i + self.max_batch], labels[i : i + self.max_batch])
            for i in range(0, x.shape[0], self.max_batch)
        ]
        return torch.cat(parts)

    def denoise(self, x: torch.Tensor, sigma, conds: Sequence) -> list:
        """One x0 prediction per conditioning, each shaped like x (see the class docstring)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"digits denoiser expects x of shape (N, 1, 8, 8), got {tuple(x.shape)}")
        if isinstance(conds, (str, bytes)) or not isinstance(conds, Sequence):
            raise TypeError("conds must be a list of conditionings (int class, None, a set of classes or a label tensor)")
        n = x.shape[0]
        sigma = _per_sample_sigma(sigma, x)
        parsed = [self._parse(c, n, i) for i, c in enumerate(conds)]
        # One UNet row block per distinct class: attribute experts and single classes that share a class
        # (e.g. even, ≥5 and the all-classes mixture in one product) reuse its block instead of recomputing it.
        row_labels, blocks, block_of_class = [], [], {}

        def block(labels: torch.Tensor, key=None) -> int:
            if key is not None and key in block_of_class:
                return block_of_class[key]
            row_labels.append(labels)
            if key is not None:
                block_of_class[key] = len(row_labels) - 1
            return len(row_labels) - 1

        for kind, value in parsed:
            if kind == "labels":
                constant = int(value[0]) if n and bool((value == value[0]).all()) else None
                blocks.append([block(value, constant)])
            else:
                blocks.append([block(torch.full((n,), c, dtype=torch.int64), c) for c in value])
        k = len(row_labels)
        if k == 0:
            return []
        out = self._forward_rows(
            x.repeat(k, 1, 1, 1), sigma.repeat(k), torch.cat(row_labels).to(x.device)
        ).reshape(k, *x.shape)
        log_p = None
        results = []
        for (kind, value), idx in zip(parsed, blocks):
            if kind == "labels":
                results.append(out[idx[0]])
                continue
            if log_p is None:  # one classifier call shared by every attribute expert of the call
                log_p = self.classifier.log_probs(x, sigma)
            weights = torch.softmax(log_p[:, value], dim=1).to(out.dtype)  # p(c | x_σ, S), (N, |S|)
            stacked = out[idx]  # (|S|, N, 1, 8, 8)
            results.append(torch.einsum("ns,snchw->nchw", weights, stacked))
        return results

    def __call__(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """Convenience: D(x, σ | cond) for a single conditioning."""
        return self.denoise(x, sigma, [cond])[0]

    def to(self, device=None, dtype=None):
        self.network.to(device=device, dtype=dtype)
        if self.classifier is not None:
            self.classifier.to(device=device)
        return self


# -- (b) noise-aware guidance classifier ----------------------------------------------------------
class NoiseAwareClassifier(nn.Module):
    """p(y | x_σ): a small CNN told the noise level (~134k parameters).

    Input c_in(σ)·x (unit-variance like the UNet's), σ enters as c_noise = ln(σ)/4 through sinusoidal
    features and an MLP that gives every conv block a per-channel scale and shift (FiLM).
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 64, 64), emb_dim: int = 64, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.sigma_data = float(sigma_data)
        self.channels = tuple(int(c) for c in channels)
        c1, c2, c3, c4 = self.channels
        self.convs = nn.ModuleList([
            nn.Conv2d(1, c1, 3, padding=1),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1),  # 8x8 -> 4x4
            nn.Conv2d(c3, c4, 3, padding=1),
        ])
        self.norms = nn.ModuleList([nn.GroupNorm(8, c) for c in self.channels])
        self.emb_dim = emb_dim
        self.embed = nn.Sequential(nn.Linear(32, emb_dim), nn.SiLU(), nn.Linear(emb_dim, 2 * sum(self.channels)))
        self.head = nn.Linear(c4 * 16, N_CLASSES)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Logits (N, 10) for noisy digits x = x0 + σ·ε."""
        sigma = _per_sample_sigma(sigma, x)
        _, _, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        film = self.embed(sinusoidal_embedding(c_noise, 32)).split([c for c in self.channels for _ in (0, 1)], dim=1)
        h = _view(c_in) * x.float()
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            scale, shift = film[2 * i], film[2 * i + 1]
            h = norm(conv(h)) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
            h = F.silu(h)
        return self.head(h.flatten(1))

    def log_probs(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """log p(y | x_σ), (N, 10)."""
        return torch.log_softmax(self.forward(x, sigma), dim=1)


# -- (c) held-out evaluator -------------------------------------------------------------------------
class DigitsEvaluator(nn.Module):
    """Clean-image CNN (~59k parameters) used ONLY to judge results (accuracy, Fréchet distance features).

    Different architecture and seed from the guidance classifier, never used as a reward or inside a
    sampler, so samplers cannot over-fit to their own judge.
    """

    def __init__(self, dropout: float = 0.3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 48, 3, padding=1)
        self.conv3 = nn.Conv2d(48, 64, 3, padding=1)
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(32), nn.BatchNorm2d(48), nn.BatchNorm2d(64)
        self.fc = nn.Linear(64 * 4, 64)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(64, N_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (N, 64), the embedding for Fréchet distances."""
        h = F.relu(self.bn1(self.conv1(x.float())))
        h = F.max_pool2d(F.relu(self.bn2(self.conv2(h))), 2)  # 4x4
        h = F.max_pool2d(F.relu(self.bn3(self.conv3(h))), 2)  # 2x2
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """log p(y | x) for clean digits in [-1, 1], (N, 10)."""
        return torch.log_softmax(self.forward(x), dim=1)


# -- (d) fast MLP denoiser ------------------------------------------------------------------------
class MLPDenoiserNet(nn.Module):
    """F(c_in·x, c_noise, label) as a 4-layer 512-wide MLP with dropout (the fast many-particle inner loop)."""

    def __init__(self, width: int = 512, depth: int = 4, dropout: float = 0.2, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.sigma_data = float(sigma_data)
        self.width, self.depth, self.dropout_p = width, depth, dropout
        self.label_embed = nn.Embedding(N_CLASSES + 1, 64)
        self.noise_embed = nn.Linear(32, 64)
        layers, d_in = [], 64 + 64 + 64
        for _ in range(depth - 1):
            layers += [nn.Linear(d_in, width), nn.SiLU(), nn.Dropout(dropout)]
            d_in = width
        layers.append(nn.Linear(d_in, 64))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sigma = _per_sample_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        h = torch.cat([
            (_view(c_in) * x.float()).flatten(1),
            self.noise_embed(sinusoidal_embedding(c_noise, 32)),
            self.label_embed(labels.to(x.device)),
        ], dim=1)
        raw = self.mlp(h).reshape(x.shape)
        return (_view(c_skip) * x.float() + _view(c_out) * raw).to(x.dtype)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
