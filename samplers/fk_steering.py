"""FK steering preset (Singhal et al. 2025, "A General Framework for Inference-time Scaling and Steering of
Diffusion Models") on the AIS/SMC sampler.

FK steering runs k particles of the plain sampler and, at a few resampling steps, resamples them with
potentials G_t built from a reward r evaluated on the decoded x̂0 (§3 and the reference code's FKD class):

* max:  G_t = exp(λ · max_{s ≤ t} r(x̂0_s))  — the best reward seen along the particle's path;
* sum:  G_t = exp(λ · Σ_{s ≤ t} r(x̂0_s))    — (the code's "add");
* diff: G_t = exp(λ · (r(x̂0_t) − r(x̂0_{t−1})))  — difference potential (telescopes; the SMC sampler's
  "incremental" weighting);

with the product over resampling steps corrected at the last step for max / sum (terminal weight
exp(λ r(x0)) / Π_t G_t of the particle's ancestry), so the final weights target p(x) · exp(λ r(x0)).
Published recipe (SD / SDXL, 100 steps): k = 4, resample every 20 steps in [20, 80], potential max (or
diff), λ = 2 – 10 with ImageReward, multinomial resampling at every scheduled step.

Step indices count model evaluations from the start (0 = the first, noisiest level), so level i of the
sampler is the state that step i's x̂0 was predicted from; the final level (the clean sample) is always
scored. The SMC sampler does the work (``resample_at`` / ``final_correction`` options); this module maps
the recipe onto them.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Sequence

from ..experts.base import DiscriminativeExpert
from .resampling import RESAMPLING_SCHEMES
from .smc import sample_poe_smc

# FK steering potential -> the SMC sampler's weighting
POTENTIALS = {"max": "max", "diff": "incremental", "sum": "sum"}
FK_SELECTIONS = ("argmax", "sample", "all")


@dataclass(frozen=True)
class FKSteering:
    """The FK steering recipe; defaults are the published one (interval / window in sampler steps)."""

    particles: int = 4
    interval: int = 20
    start: int = 20
    end: int = 80
    potential: str = "max"
    lmbda: float = 10.0
    final_correction: bool = True
    resampling: str = "multinomial"
    selection: str = "argmax"

    def __post_init__(self):
        if not isinstance(self.particles, int) or self.particles < 1:
            raise ValueError(f"particles must be an integer >= 1, got {self.particles!r}")
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1 step, got {self.interval}")
        if self.start < 0 or self.end < self.start:
            raise ValueError(f"resampling window [{self.start}, {self.end}] must satisfy 0 <= start <= end")
        if self.potential not in POTENTIALS:
            raise ValueError(f"potential must be one of {tuple(POTENTIALS)}, got {self.potential!r}")
        if not self.lmbda > 0:
            raise ValueError(f"lambda must be positive, got {self.lmbda!r}")
        if self.resampling not in RESAMPLING_SCHEMES:
            raise ValueError(f"resampling must be one of {RESAMPLING_SCHEMES}, got {self.resampling!r}")
        if self.selection not in FK_SELECTIONS:
            raise ValueError(f"selection must be one of {FK_SELECTIONS}, got {self.selection!r}")


def resampling_steps(n_steps: int, interval: int = 20, start: int = 20, end: int = 80) -> list[int]:
    """Steps start, start + interval, … ≤ end at which FK steering resamples (the reference code's
    ``np.arange(start, end + 1, interval)``), dropping those at or beyond the last step of an ``n_steps``
    schedule (the final level is always scored, with the terminal correction)."""
    return [i for i in range(int(start), int(end) + 1, int(interval)) if i < n_steps]


def scaled_judges(judges: Sequence[DiscriminativeExpert], lmbda: float) -> list[DiscriminativeExpert]:
    """The judges with their weights multiplied by λ: the potential is exp(λ Σ γ_j r_j)."""
    return [dataclasses.replace(j, weight=j.weight * float(lmbda)) for j in judges]


def fk_steering_options(config: FKSteering = FKSteering()) -> dict:
    """``sample_poe_smc`` keyword options of the recipe (judges excluded: see :func:`scaled_judges`)."""
    return dict(
        particles=config.particles, weighting=POTENTIALS[config.potential],
        resample_at=functools.partial(resampling_steps, interval=config.interval, start=config.start, end=config.end),
        final_correction=config.final_correction, resampling=config.resampling, selection=config.selection,
        # the base sampler, unchanged: ancestral (DDPM-like) moves, no MCMC, the reward at full λ at every step
        eta=1.0, mcmc_steps=0, tempering="constant", twist=False, step="ancestral",
    )


def sample_fk_steering(model, x, sigmas, extra_args=None, callback=None, disable=None, *, judges=(), decode=None,
                       config: FKSteering = FKSteering(), **options):
    """FK steering with ``judges`` as the reward (k-diffusion signature; ``options`` go to sample_poe_smc)."""
    if not judges:
        raise ValueError("FK steering needs a reward: connect at least one judge")
    return sample_poe_smc(model, x, sigmas, extra_args, callback, disable, judges=scaled_judges(judges, config.lmbda),
                          decode=decode, **{**fk_steering_options(config), **options})
