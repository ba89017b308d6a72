"""Annealed importance sampling / sequential Monte Carlo for products of experts.

Target (Zhang et al. 2025, "Product of Experts for Visual Generation", eq. for p(x)):
    p(x) ∝ Π_i p_i(x)^{λ_i} · Π_j exp(γ_j r_j(x))
with intermediate targets π_t(x) ∝ Π_i p_{i,σ_t}(x)^{λ_i} · exp(β_t Σ_j γ_j r_j(x̂0(x))).

The sampler works in VE coordinates (y = x0 + σ ε) for every model; flow (CONST) states map exactly
with y = x / (1-σ), σ_ve = σ / (1-σ) (reference poe_smc.md). One level t of the loop:
  1. move from σ_{t+1} to σ_t with a step of the reverse SDE (eta = 1; eta = 0 is the paper's deterministic
     Euler step): by default second order, DPM-Solver++(2M)-SDE (``step="dpmpp_2m_sde"``, one model call per
     level, :func:`dpmpp_2m_coefficient`), or the first-order ancestral step (``step="ancestral"``),
     optionally twisted by ∇ potential;
  2. weights: the Feynman-Kac corrector increment for the product (Skreta et al. 2025),
         d log w = ½ (‖Σ_k W_k s_k‖² − Σ_k W_k ‖s_k‖²) d(σ²),
     over the raw components s_k (conditional and shared unconditional scores with effective weights
     W_k, CFG included), plus the discriminative potential (difference / paper / max / sum);
  3. resample when ESS / L < threshold (systematic, stratified, multinomial, residual);
  4. K MCMC steps at σ_t: ULA (paper) or MALA with the trapezoid score-integral energy estimate
         log π(y') − log π(y) ≈ ½ (S(y) + S(y'))·(y' − y).
The paper's Algorithm 1 is reproduced with ``fk_correction="off", weighting="paper", eta=0,
mcmc="ula", proposal="summed"`` (:data:`PRESETS` ``["paper"]``). At latent size the default moves with the
experts' consensus at noise σ/√Λ (``proposal="lambda"``, :func:`fk_lambda_numerator`), resamples per batch
item and has a collapse guard; ``PRESETS["fk_summed"]`` keeps the FK-corrector paper's summed-score sampler.

Per-expert predictions arrive through the capture channel of :mod:`comfy_poe.experts.generative`;
a model that does not fill it is a single expert (no generative correction needed).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..experts.base import DiscriminativeExpert, canonical_parameterization, evaluate_potentials, is_flow, sigma_to_ve
from ..experts.generative import POE_CAPTURE_KEY, PoECapture
from .localize import auto_block_size, block_ess, block_index, block_participation, block_resample, block_sums, diversity_kept, stitch
from .resampling import RESAMPLING_SCHEMES, effective_sample_size, log_mean_weight, normalized_log_weights, resample_indices

FK_MODES = ("full", "product", "off")
WEIGHTINGS = ("incremental", "paper", "max", "sum", "none")
MCMC_KINDS = ("mala", "ula")
SELECTIONS = ("auto", "argmax", "sample", "resample", "all")
TEMPERINGS = ("constant", "linear", "capped")

PRESETS = {
    # Zhang et al. 2025, Algorithm 1: Euler init kernel, ULA, resample every level on the current reward.
    "paper": dict(fk_correction="off", weighting="paper", eta=0.0, mcmc="ula", selection="argmax", tempering="constant",
                  proposal="summed", guard="off", step="ancestral"),
    # Principled default: Feynman-Kac corrector weights for the Λ-aware proposal, difference potentials,
    # ESS-triggered per-item resampling, collapse guard (docs/sampler_high_dimension.md).
    "fk": dict(fk_correction="full", weighting="incremental", eta=1.0, mcmc="mala", selection="auto", tempering="capped",
               proposal="lambda", trace="auto", guard="fallback", step="dpmpp_2m_sde"),
    # The FK-corrector paper's sampler as it was the default before: summed-score SDE, no guard (Skreta et al. 2025).
    "fk_summed": dict(fk_correction="full", weighting="incremental", eta=1.0, proposal="summed", guard="off",
                      step="ancestral"),
    # The FK-corrector authors' image recipe: per-level increments centred and clipped, resampling every level.
    "fkc_clipped": dict(fk_correction="full", weighting="incremental", eta=1.0, proposal="summed", guard="off", fk_clip=1.0,
                        step="ancestral"),
}


@dataclass
class SMCReport:
    """Diagnostics of one :func:`sample_poe_smc` run (filled in place when passed as ``report=``)."""

    sigmas: list = field(default_factory=list)
    ess: list = field(default_factory=list)  # per level: (B,) effective sample size before resampling
    resampled: list = field(default_factory=list)  # per level: bool
    log_z: Optional[torch.Tensor] = None  # (B,) running estimate of log Z_final / Z_initial
    acceptance: list = field(default_factory=list)  # per MCMC sweep: mean acceptance rate
    step_scales: list = field(default_factory=list)  # per MCMC sweep: the c used (κ² = c σ²)
    model_calls_per_particle: int = 0
    particle_evals: int = 0
    judge_evals: int = 0
    final_log_weights: Optional[torch.Tensor] = None  # (L, B)
    final_potentials: Optional[torch.Tensor] = None  # (L, B) Σ γ_j r_j of the final samples
    selected: Optional[torch.Tensor] = None
    particles: int = 0
    options: dict = field(default_factory=dict)
    resampled_items: list = field(default_factory=list)  # per level: (B,) bool, which items were resampled
    guard_events: list = field(default_factory=list)  # collapse guard firings: dict(level, sigma, item, ess, action)
    trace_calls_per_particle: int = 0  # of model_calls_per_particle, spent on Hutchinson trace probes
    trace_source: Optional[str] = None  # "exact" | "hutchinson" | None (no trace term was needed)
    blocks: int = 0  # localize="blocks": number of blocks K per item (0: global weights)
    block_resampled: list = field(default_factory=list)  # per level: (B, K) bool, which blocks were resampled
    block_ess_min: list = field(default_factory=list)  # per level: min over items and blocks of block ESS / L
    block_refresh_calls: int = 0  # of model_calls_per_particle, spent re-evaluating stitched particles
    block_guard: list = field(default_factory=list)  # per-block guard firings: dict(level, sigma, item, blocks)

    def block_resample_counts(self) -> list:
        """Per batch item: block resamplings summed over levels and blocks."""
        if not self.block_resampled:
            return []
        return torch.stack(self.block_resampled).sum((0, 2)).tolist()

    def resample_counts(self) -> list:
        """Resampling count per batch item."""
        if not self.resampled_items:
            return []
        return torch.stack(self.resampled_items).sum(0).tolist()

    def min_ess_fraction(self) -> float:
        """Smallest ESS / L over levels and items (1.0 = no weight degeneracy)."""
        if not self.ess:
            return 1.0
        return float(torch.stack(self.ess).min()) / max(self.particles, 1)

    def summary(self) -> str:
        ess = torch.stack(self.ess).mean(1) if self.ess else torch.zeros(0)
        counts = self.resample_counts()
        opts = self.options
        lines = [
            f"particles {self.particles}, levels {len(self.ess)}, resampled at {sum(self.resampled)} levels"
            + (f" (per item: {' '.join(str(c) for c in counts)})" if len(counts) > 1 else ""),
            f"min ESS/L {self.min_ess_fraction():.3f}",
            f"model calls per particle {self.model_calls_per_particle}"
            + (f" ({self.trace_calls_per_particle} for Hutchinson trace probes)" if self.trace_calls_per_particle else "")
            + f", particle evaluations {self.particle_evals}, judge evaluations {self.judge_evals}",
        ]
        if opts:
            lines.append(f"proposal {opts.get('proposal', '?')}, FK correction {opts.get('fk_correction', '?')}, "
                         f"trace {self.trace_source or 'not needed'}, collapse guard {opts.get('guard', '?')}"
                         + (f", FK increments centred and clipped to ±{opts['fk_clip']}" if opts.get("fk_clip") else ""))
        if self.blocks:
            levels = sum(bool(m.any()) for m in self.block_resampled)
            per_item = self.block_resample_counts()
            lines.append(
                f"block-local resampling ({opts.get('block_size')}×{opts.get('block_size')} tiles × all channels, "
                f"{self.blocks} blocks per item): blocks resampled at {levels} levels, "
                f"{' '.join(str(c) for c in per_item)} block resamplings per item, min block ESS/L "
                f"{min(self.block_ess_min) if self.block_ess_min else 1.0:.3f}; every weighted block resampled at the last "
                f"level (equal output weights); {self.block_refresh_calls} model calls per particle re-evaluated "
                "stitched particles")
            if opts.get("guard") == "fallback":
                dropped = {}
                for e in self.block_guard:
                    dropped[e["item"]] = dropped.get(e["item"], 0) + e["blocks"]
                lines.append("block collapse guard: " + ("; ".join(
                    f"item {b}: FK weights of {n} of {self.blocks} blocks dropped (spread over more than "
                    f"{opts.get('block_guard_dims')} elements of the block, or too little diversity left), those blocks "
                    "continue unweighted" for b, n in sorted(dropped.items())) if dropped else "did not fire"))
        elif self.guard_events:
            lines += ["COLLAPSE GUARD FIRED: " + e["action"] for e in self.guard_events]
        elif opts.get("guard") == "fallback":
            lines.append("collapse guard: did not fire")
        lines.append("ESS trace: " + " ".join(f"{v:.1f}" for v in ess.tolist()))
        if self.log_z is not None:
            lines.append("log Z estimate: " + " ".join(f"{v:.3f}" for v in self.log_z.tolist()))
        if self.acceptance:
            lines.append(f"MCMC acceptance: mean {sum(self.acceptance) / len(self.acceptance):.3f}")
        if self.final_potentials is not None:
            lines.append("final potentials per particle (item 0): " + " ".join(f"{v:.3f}" for v in self.final_potentials[:, 0].tolist()))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# pure helpers


def ancestral_sigmas(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step in VE coordinates (k-diffusion get_ancestral_step).

    sigma_from may be +inf (a flow model at σ = 1): sigma_up = eta·σ_to.
    """
    if sigma_to == 0:
        return 0.0, 0.0
    if math.isinf(sigma_from):
        up = min(sigma_to, eta * sigma_to)
    else:
        up = min(sigma_to, eta * math.sqrt(max(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2, 0.0)))
    return math.sqrt(max(sigma_to**2 - up**2, 0.0)), up


def dpmpp_2m_coefficient(s_prev: float, s_from: float, s_to: float, down: float) -> float:
    """Weight of (D_from − D_prev) in the second-order (multistep) move from σ_from to σ_to (VE coordinates).

    DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2, eq. for x̃_{t_i}; its SDE variant as in k-diffusion's
    ``sample_dpmpp_2m_sde``, solver "midpoint"): with h = log(σ_from/σ_to), h_last = log(σ_prev/σ_from),
    r = h_last/h, the data prediction over the step is extrapolated linearly in λ = −log σ from the previous
    level's prediction, which adds
        ½ (1 − e^{−(1+η)h}) / r · (D_from − D_prev)
    to the first-order (ancestral) mean D_from + (σ_down/σ_from)(y − D_from). Here 1 − σ_down/σ_from is the
    first-order weight of D_from: 1 − e^{−2h} for eta = 1 (the SDE step) and 1 − e^{−h} for eta = 0 (the ODE
    step), so the formula is Lu et al.'s at both ends. 0 where there is no usable history: the first move,
    a move from or to a non-positive / infinite σ (the last step to σ = 0 returns D itself).
    """
    if s_prev is None or not (0 < s_to < s_from < s_prev) or math.isinf(s_prev):
        return 0.0
    h, h_last = math.log(s_from / s_to), math.log(s_prev / s_from)
    return 0.5 * (1.0 - down / s_from) * h / h_last


def fk_consensus(components, y: torch.Tensor):
    """Λ = Σ W_k, the consensus D̄ = Σ W_k D_k / Λ and the spread Σ_k W_k (D_k − D̄)², per element (float64)."""
    lam = torch.zeros_like(y, dtype=torch.float64)
    acc = torch.zeros_like(y, dtype=torch.float64)
    for denoised, w in components:
        w = torch.as_tensor(w, dtype=torch.float64, device=y.device)
        lam = lam + w
        acc = acc + w * denoised.to(torch.float64)
    if (lam == 0).any():
        raise ValueError("the experts' weights sum to zero on part of the latent: the product is improper there")
    d_bar = acc / lam
    spread = torch.zeros_like(d_bar)
    for denoised, w in components:
        spread = spread + torch.as_tensor(w, dtype=torch.float64, device=y.device) * (denoised.to(torch.float64) - d_bar) ** 2
    return lam, d_bar, spread


def fk_product_numerator(y: torch.Tensor, components) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """½ σ⁴ (‖Σ W_k s_k‖² − Σ W_k ‖s_k‖²) per particle, Λ = Σ W_k and the consensus D̄ = Σ W_k D_k / Λ.

    With s_k = (D_k − y)/σ² and D̄ = Σ W_k D_k / Λ this equals
        ½ Σ_elements [Λ(Λ−1)(D̄ − y)² − Σ_k W_k (D_k − D̄)²]
    (the cross term vanishes), which avoids cancelling large numbers at high noise. Dividing by σ⁴
    gives the Feynman-Kac corrector rate of the product (Skreta et al. 2025) for the summed-score SDE.
    """
    lam, d_bar, spread = fk_consensus(components, y)
    per_elem = lam * (lam - 1) * (d_bar - y.to(torch.float64)) ** 2 - spread
    return 0.5 * per_elem.reshape(y.shape[0], -1).sum(1), lam, d_bar


def fk_lambda_numerator(spread: torch.Tensor, trace: Optional[torch.Tensor]) -> torch.Tensor:
    """FK numerator of the Λ-aware proposal (rate = num/σ⁴ per unit σ², up to a particle-independent constant).

    Moving with dy = (S/Λ) d(σ²) + dW/√Λ (the consensus D̄ as one model at noise σ/√Λ) towards
    π_σ ∝ Π_k p_{k,σ}^{W_k}, the Feynman-Kac rate ∂_t log π + ∇·b + b·∇log π − ½ Σ_i a_i (∂_i² + (∂_i log π)²)
    reduces, with ∂_i s_k,i = (Cov_k,ii/σ² − 1)/σ² (Tweedie), to
        num = −½ Σ_elements [ (1 − 1/Λ) Σ_k W_k (Cov_k[x0|y] − σ²) + Σ_k W_k (D_k − D̄)² ];
    the Λ(Λ−1)‖D̄ − y‖² term of the summed-score SDE, which grows like d, is gone. ``trace`` is the
    per-element Σ_k W_k (1 − 1/Λ) (Cov_k − σ²) (None drops it: exact where Λ = 1).
    """
    per_elem = spread if trace is None else spread + trace
    return -0.5 * per_elem.reshape(per_elem.shape[0], -1).sum(1)


def fk_increment(num_from: torch.Tensor, num_to: torch.Tensor, s_from: float, s_to: float) -> torch.Tensor:
    """∫ rate d(σ²) from σ_from down to σ_to with rate = num/σ⁴, num linear across the step:
    ½(num_from + num_to)(1/σ_to² − 1/σ_from²); the last step to σ = 0 uses the left point num/σ²."""
    if s_to == 0:
        return num_from / s_from**2
    inv_from = 0.0 if math.isinf(s_from) else 1.0 / s_from**2
    return 0.5 * (num_from + num_to) * (1.0 / s_to**2 - inv_from)


def intermediate_judges(judges: Sequence[DiscriminativeExpert], tempering: str) -> list[DiscriminativeExpert]:
    """The judges of the intermediate targets (every level but the last, which always has the full weights).

    "capped" caps each weight γ_j at 1. The exact intermediate potential (the twist) of a final factor
    p(y | x0)^γ is log E[p(y | x0)^γ | x_t] (Wu et al. 2023, twisted SMC); for a judge that is nearly certain
    on clean samples p^γ ≈ p, so that twist is ≈ log p(y | x_t) — the noisy posterior at weight 1, whatever γ.
    The γ-th power instead exaggerates the mode the noisy judge happens to prefer early, resampling then
    drops the other modes' lineages, and no later weight brings them back. The final level restores γ, so
    the target is unchanged (the potential increments telescope to γ r at σ = 0).
    """
    if tempering != "capped":
        return list(judges)
    return [dataclasses.replace(j, weight=min(float(j.weight), 1.0)) for j in judges]


MAX_STEP_SCALE = 0.2


def adapt_step_scale(c: float, acceptance: float, target: float = 0.574, gain: float = 3.0,
                     max_scale: float = MAX_STEP_SCALE) -> float:
    """Robbins-Monro style update of the MALA step scale from the last sweep's acceptance rate:
    c · exp(gain · (acceptance − target)), kept within [1e-4, max_scale].

    The cap keeps proposals within about σ: π_σ is smooth on that scale, so the trapezoid energy
    estimate stays accurate; longer jumps could cross a barrier between modes that the two end-point
    scores cannot see, and MALA would stop being π_σ-invariant.
    """
    return float(min(max(c * math.exp(gain * (acceptance - target)), 1e-4), max_scale))


def _bdims(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def _sumdims(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).sum(1)


# --------------------------------------------------------------------------------------------------
# model evaluation in VE coordinates


@dataclass
class _Eval:
    D: torch.Tensor  # combined denoised prediction (defines the summed score)
    num: torch.Tensor  # FK corrector numerator per particle
    lam: Optional[torch.Tensor]  # Λ per element, None for a plain model
    x0: torch.Tensor  # what judges score: consensus D̄ of the experts (D for a plain model)
    elem: Optional[torch.Tensor] = None  # per-element FK numerator (N, d) when FK weights were computed


class _Evaluator:
    """Evaluates the (combined) model on particles in chunks, in VE coordinates, counting calls.

    ``proposal`` picks the FK numerator: "summed" (reverse SDE of the summed score, Skreta et al. 2025)
    or "lambda" (the consensus D̄ as one model at noise σ/√Λ, :func:`fk_lambda_numerator`), whose trace
    term comes from the model's exact posterior variances or a Hutchinson estimate (``trace``).
    """

    def __init__(self, model, extra_args, parameterization, fk_mode, chunk, batch, interrupt=None,
                 need_consensus=False, proposal="summed", trace="auto", trace_probes=1, rademacher=None):
        self.model = model
        self.need_consensus = need_consensus  # judges score D̄, so the components are needed even without FK
        self.interrupt = interrupt
        self.extra_args = dict(extra_args or {})
        self.base_options = dict(self.extra_args.pop("model_options", None) or {})
        self.flow = is_flow(parameterization)
        self.fk_mode = fk_mode
        self.chunk = max(batch, (chunk // batch) * batch) if chunk else None
        self.batch = batch
        self.proposal = proposal
        self.trace = trace
        self.trace_probes = int(trace_probes)
        self.rademacher = rademacher  # shape -> ±1 tensor from the sampler's generator
        self.calls = 0
        self.trace_calls = 0  # model calls per particle spent on Hutchinson probes (included in calls)
        self.particle_evals = 0
        self.trace_source = None  # "exact" | "hutchinson" once a trace was needed

    def native(self, y: torch.Tensor, s_ve: float) -> tuple[torch.Tensor, float]:
        if not self.flow:
            return y, s_ve
        s = 1.0 if math.isinf(s_ve) else s_ve / (1.0 + s_ve)
        return y * (1.0 - s), s

    def _call(self, xc, s, want_variance=False):
        capture = PoECapture(want_variance=want_variance)
        options = dict(self.base_options)
        options[POE_CAPTURE_KEY] = capture
        sig = torch.full((xc.shape[0],), s, dtype=xc.dtype, device=xc.device)
        denoised = self.model(xc, sig, model_options=options, **self.extra_args)
        if not torch.isfinite(denoised).all():
            raise FloatingPointError(f"the model returned non-finite predictions at sigma={s:.4g}")
        return denoised, capture.predictions

    def _trace_term(self, yc, s_ve, s_nat, preds, comps, lam):
        """Σ_k W_k (1 − 1/Λ) (diag Cov_k[x0 | y] − σ²) per element (the Λ-aware weights' trace term; the −σ²
        is the particle-independent part that keeps log Ẑ exact and the rate finite as σ → 0).

        Exact from the model's posterior variances when it gives them; else Hutchinson with Rademacher
        probes z and a forward difference of the experts' predictions, Cov_k = σ² ∂D_k/∂y (Tweedie):
        diag ≈ z ⊙ (D_k(y + h z) − D_k(y)) σ² / h, h = 0.01 σ — one extra model call per probe. The probe is
        shared by the particles of a batch item (common random numbers): only differences between particles
        enter the weights, and where Cov_k does not depend on the particle its probe noise cancels exactly.
        """
        mode = "full" if self.fk_mode == "off" else self.fk_mode
        coef = 1.0 - 1.0 / lam
        if self.trace in ("auto", "exact"):
            var = preds.components(yc, mode, variances=True)
            if var is not None:
                self.trace_source = "exact"
                out = torch.zeros_like(lam)
                for (v, w) in var:
                    out = out + torch.as_tensor(w, dtype=torch.float64, device=yc.device) * v.to(torch.float64)
                return coef * (out - lam * s_ve**2)
            if self.trace == "exact":
                raise ValueError('trace="exact" needs a model that gives posterior variances (the analytic experts '
                                 'do); use trace="hutchinson" or "auto" for real networks')
        self.trace_source = "hutchinson"
        h = 0.01 * s_ve
        est = torch.zeros_like(lam)
        for _ in range(self.trace_probes):
            z = self.rademacher((self.batch,) + tuple(yc.shape[1:])).to(device=yc.device, dtype=yc.dtype)
            z = z.repeat((yc.shape[0] // self.batch,) + (1,) * (yc.ndim - 1))
            xp, _ = self.native(yc + h * z, s_ve)
            _, preds_p = self._call(xp, s_nat)
            comps_p = preds_p.components(xp, mode)
            acc = torch.zeros_like(lam)
            for (d0, w), (d1, _) in zip(comps, comps_p):
                acc = acc + torch.as_tensor(w, dtype=torch.float64, device=yc.device) * (d1.to(torch.float64) - d0.to(torch.float64))
            est = est + z.to(torch.float64) * acc * (s_ve**2 / h)
        return coef * (est / self.trace_probes - lam * s_ve**2)

    def __call__(self, y, s_ve: float, x_native: Optional[torch.Tensor] = None, count: bool = True,
                 need_lam: bool = False):
        """Model outputs at VE state y: combined D, FK numerator (N,), Λ (or None) and the consensus x̂0.

        Judges see the experts' consensus D̄ = Σ W_k D_k / Λ rather than the combined D = y + Λ (D̄ − y):
        both agree for a single or CFG'd model (Λ = 1) and as σ → 0, but for Λ ≠ 1 the combined
        prediction extrapolates to ≈ (1 − Λ) y at high noise, which no reward can judge sensibly.
        The Λ-aware proposal moves with D̄ too.

        ``x_native`` is given instead of y when the VE state is infinite (a flow model at σ = 1).
        The per-expert components are only reduced when something needs them (FK weights, judges, Λ,
        the Λ-aware proposal): the naive baseline pays nothing beyond the model call.
        """
        fk_here = self.fk_mode != "off" and not math.isinf(s_ve)
        lam_prop = self.proposal == "lambda"
        use_components = fk_here or self.need_consensus or need_lam or lam_prop
        want_var = fk_here and lam_prop and self.trace in ("auto", "exact")
        if self.interrupt is not None:
            self.interrupt()
        x, s = self.native(y, s_ve) if x_native is None else (x_native, 1.0)
        n = x.shape[0]
        step = self.chunk or n
        outs, nums, lams, consensus, elems = [], [], [], [], []
        traced = False
        for start in range(0, n, step):
            xc = x[start:start + step]
            denoised, preds = self._call(xc, s, want_var)
            outs.append(denoised)
            num = torch.zeros(xc.shape[0], dtype=torch.float64, device=xc.device)
            x0 = denoised
            if preds is not None and use_components:
                mode = "full" if self.fk_mode == "off" else self.fk_mode
                ref = xc if math.isinf(s_ve) else y[start:start + step]
                comps = preds.components(xc, mode)
                if lam_prop and fk_here:
                    lam, d_bar, spread = fk_consensus(comps, ref)
                    tr = None
                    if self.trace != "off" and bool((lam != 1).any()):
                        tr = self._trace_term(ref, s_ve, s, preds, comps, lam)
                        traced = traced or self.trace_source == "hutchinson"
                    num = fk_lambda_numerator(spread, tr)
                    elems.append(-0.5 * (spread if tr is None else spread + tr).reshape(xc.shape[0], -1))
                else:
                    lam, d_bar, spread = fk_consensus(comps, ref)
                    if fk_here:
                        elem = 0.5 * (lam * (lam - 1) * (d_bar - ref.to(torch.float64)) ** 2 - spread)
                        elems.append(elem.reshape(xc.shape[0], -1))
                        num = elem.reshape(xc.shape[0], -1).sum(1)
                lams.append(lam)
                x0 = d_bar.to(denoised.dtype)
            nums.append(num)
            consensus.append(x0)
        if count:
            self.calls += 1
            if traced:
                self.calls += self.trace_probes
                self.trace_calls += self.trace_probes
        self.particle_evals += n * (1 + (self.trace_probes if traced else 0))
        lam = torch.cat(lams) if len(lams) == len(outs) else None
        elem = torch.cat(elems) if len(elems) == len(outs) else None
        return _Eval(torch.cat(outs), torch.cat(nums), lam, torch.cat(consensus), elem)


# --------------------------------------------------------------------------------------------------


def sample_poe_smc(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[dict] = None,
    callback: Optional[Callable] = None,
    disable: Optional[bool] = None,
    *,
    particles: int = 4,
    judges: Sequence[DiscriminativeExpert] = (),
    decode: Optional[Callable] = None,
    eta: float = 1.0,
    mcmc_steps: int = 0,
    mcmc: str = "mala",
    step_scale: float = 0.1,
    adapt_step: bool = True,
    target_acceptance: float = 0.574,
    fk_correction: str = "full",
    weighting: str = "incremental",
    tempering: str = "capped",
    resampling: str = "systematic",
    ess_threshold: float = 0.5,
    resample_every: int = 1,
    judge_window: tuple = (0.0, math.inf),
    twist: bool = False,
    selection: str = "auto",
    seed: Optional[int] = None,
    chunk_size: Optional[int] = None,
    parameterization: Optional[str] = None,
    prior_scaling: bool = True,
    interrupt: Optional[Callable[[], None]] = None,
    report: Optional[SMCReport] = None,
    resample_at=None,
    final_correction: bool = False,
    proposal: str = "lambda",
    trace: str = "auto",
    trace_probes: int = 1,
    guard: str = "fallback",
    guard_diversity: float = 0.7,
    guard_dims: float = 64.0,
    fk_clip: Optional[float] = None,
    step: str = "dpmpp_2m_sde",
    localize: str = "off",
    block_size: Optional[int] = None,
    block_guard_dims: float = 4.0,
) -> torch.Tensor:
    """Sample a product of experts with SMC; k-diffusion signature (ComfyUI KSAMPLER wraps it as is).

    model(x, sigma, **extra_args) -> denoised, in the model's own coordinates; a product model fills
    the capture channel with per-expert predictions (FK corrector weights need them).
    x: initial noise already scaled to sigmas[0] (B, ...); sigmas: decreasing noise levels.
    Options (see docs/sampler.md, "Sampler options"): particles L per batch item; judges (discriminative experts)
    and decode (latent -> IMAGE for pixel judges); eta (1 ancestral, 0 Euler); mcmc_steps K, mcmc kind,
    step_scale c (κ² = c σ²); fk_correction "full" | "product" | "off"; weighting "incremental" |
    "paper" | "max" | "sum" | "none"; tempering "constant" | "linear" (β ramp over the judge window) |
    "capped" (judge weights above 1 enter the intermediate targets as 1, see :func:`intermediate_judges`);
    resampling scheme, ess_threshold, resample_every; judge_window (σ_lo, σ_hi) in model sigmas (judges
    always score the final samples); twist (add ∇ of differentiable potentials to the drift, with the
    exact Gaussian proposal correction); selection "auto" | "argmax" | "sample" | "resample" | "all";
    seed; chunk_size (max particles per model call). When sigmas[0] is pure noise (σ_ve >= 10, or a flow
    model at σ = 1) particles other than the first get fresh noise; from a partially noised latent
    (img2img) all particles start from x and diversify through the ancestral noise; prior_scaling (start from N(0, σ²/Λ), the product
    of the experts' priors); interrupt (called before every model evaluation; raise from it to stop,
    e.g. ComfyUI's throw_exception_if_processing_interrupted); report (an :class:`SMCReport` filled in place);
    resample_at (a schedule by step index, FK steering: level indices — 0 the first level, len(sigmas) − 1 the
    final one — or a callable of the number of steps returning them; judges then score only at those levels and
    the final one, and the population is resampled at each of them whatever the ESS; None keeps judge_window,
    resample_every and the ESS rule); final_correction (weightings paper / max / sum: the final weights become
    the final potential minus the potentials already used at the ancestors' resamplings, FK steering's
    terminal correction, so the weights target p(x)·exp(Σ γ r(x0)); default off, as before).
    proposal: "lambda" (default) moves with the experts' consensus D̄ as one model at noise σ/√Λ, which
    removes the Λ(Λ−1)‖D̄ − y‖² term (∝ d) from the FK weights (:func:`fk_lambda_numerator`); "summed" is the
    reverse SDE of the summed score (Skreta et al. 2025, the paper-faithful corrector). trace: the Λ-aware
    weights' posterior-covariance term, "auto" (exact when the model gives posterior variances, else
    Hutchinson), "exact", "hutchinson" (``trace_probes`` extra model calls per level, counted) or "off".
    guard "fallback" | "off": every resampling driven by the FK weights keeps (1 − 1/ESS_FK)/(1 − 1/L) of the
    population's diversity (n effective draws keep 1 − 1/n of the variance); a resampling that would bring an
    item's retained share (the product over its resamplings) below ``guard_diversity`` is not made: that
    item's FK weights are dropped and switched off from there (the proposal continues unweighted, judges
    keep weighting) and the report says so. The same happens when the weights' spread across particles is
    carried by more than ``guard_dims`` latent elements (participation ratio of the per-element FK
    numerators): a correction spread over that many elements is noise that L particles cannot resolve
    (measured: experts that differ in every element at d ≥ 1,024). fk_clip c: the FK-corrector authors' image recipe, the per-level FK
    increment centred across particles and clipped to [−c, c], resampling at every level (stable, biased).
    step: "dpmpp_2m_sde" (default) adds ``dpmpp_2m_coefficient · (D_i − D_{i−1})`` to the ancestral mean, D the
    prediction the move uses (D̄ for the Λ-aware proposal), D_{i−1} the particle's own prediction one level
    earlier (carried through resampling; the difference is taken along the move, before MCMC). Same one model
    call per level; one expert's variance error at 60 Karras levels +0.02 instead of the ancestral step's
    −0.18 (``benchmarks/integrator_bias.py``). The FK weights need no change: the Feynman-Kac rate is a
    property of the SDE both steps discretise (the trapezoid increment integrates it along the particle's path),
    and the move stays a Gaussian kernel, so the twist's proposal correction uses the kernel's true mean
    (the 2M mean). "ancestral": the first-order step (the default before; naive, best-of-N, the presets
    "paper" / "fk_summed" / "fkc_clipped" and FK steering keep it).
    Resampling decisions are per batch item: one item's degenerate weights never resample another's.
    localize "off" | "blocks": "blocks" is block-local resampling (the block particle filter, Rebeschini &
    van Handel 2015; :mod:`.localize`): the FK weights are kept per block of ``block_size``×``block_size``
    pixels over all channels (frames too) from the per-element FK numerators, each block whose ESS drops
    below ``ess_threshold``·L picks its own ancestors, the new particle is stitched from its blocks and
    re-evaluated (one model call per level with a block resampling, counted), and every block whose weights
    are unequal is resampled at the last level, so the output weights are equal. Judges stay global. Biased where structure crosses
    block borders (docs/sampler_high_dimension.md). The collapse guard (``guard``) then works per block: a
    block whose weights' spread lies on more than ``block_guard_dims`` of its elements, or whose resampling
    would leave less than ``guard_diversity`` of its diversity, keeps its lineage and continues unweighted
    (``block_size`` None: the tile side whose block holds ≤ 64 elements — 4×4 on a 4-channel SD latent, 2×2
    on a 16-channel Flux latent; with the limit of 4 elements, the best measured at d = 16,384 and 262,144).
    Returns (B, ...) for argmax / sample, (B·L, ...) item-major for resample / all.
    """
    _check_options(particles, mcmc_steps, mcmc, fk_correction, weighting, tempering, resampling, ess_threshold,
                   resample_every, selection, step_scale, eta, sigmas, x)
    schedule = _resampling_schedule(resample_at, len(sigmas))
    _check_new_options(proposal, trace, trace_probes, guard, guard_diversity, guard_dims, fk_clip, step)
    _check_localize(localize, block_size, block_guard_dims, fk_clip, weighting, judges)
    extra_args = dict(extra_args or {})
    param = canonical_parameterization(parameterization or getattr(model, "parameterization", None) or "eps")
    flow = is_flow(param)
    judges = list(judges)
    seed = int(extra_args.get("seed", 0) if seed is None else seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    report = report if report is not None else SMCReport()
    report.particles = particles
    report.options = dict(particles=particles, eta=eta, mcmc_steps=mcmc_steps, mcmc=mcmc, step_scale=step_scale,
                          adapt_step=adapt_step, fk_correction=fk_correction, weighting=weighting, resampling=resampling,
                          ess_threshold=ess_threshold, twist=twist, selection=selection, seed=seed, proposal=proposal,
                          trace=trace, trace_probes=trace_probes, guard=guard,
                          guard_diversity=guard_diversity, guard_dims=guard_dims, fk_clip=fk_clip, step=step,
                          localize=localize, block_size=block_size, block_guard_dims=block_guard_dims)
    if schedule is not None or final_correction:
        report.options.update(resample_at=None if schedule is None else sorted(schedule),
                              final_correction=final_correction)

    B = x.shape[0]
    L = particles
    N = L * B
    # particle-major layout (index l*B + b) so ComfyUI's conditioning tiling stays aligned per item
    x_part = x.repeat((L,) + (1,) * (x.ndim - 1))
    sig_native = [float(s) for s in sigmas]
    sig_ve = [sigma_to_ve(s, param) for s in sig_native]
    n_levels = len(sig_native)

    def noise_like(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, dtype=torch.float32).to(device=t.device, dtype=t.dtype)

    def rademacher(shape) -> torch.Tensor:
        return torch.randint(0, 2, tuple(shape), generator=gen, dtype=torch.int8).to(torch.float32) * 2 - 1

    evaluator = _Evaluator(model, extra_args, param, fk_correction, chunk_size, B, interrupt,
                           need_consensus=bool(judges), proposal=proposal, trace=trace, trace_probes=trace_probes,
                           rademacher=rademacher)

    interim = intermediate_judges(judges, tempering)

    def judges_at(level: int) -> list:
        return judges if level == n_levels - 1 else interim

    active = [judge_window[0] <= s <= judge_window[1] for s in sig_native]
    if schedule is not None:
        active = [i in schedule for i in range(n_levels)]
    active[-1] = True
    if tempering == "linear":
        ramp_len = sum(active)
        betas, k = [], 0
        for a in active:
            k += a
            betas.append(k / ramp_len if a else 0.0)
    else:
        betas = [1.0 if a else 0.0 for a in active]
    betas[-1] = 1.0

    def potential(D: torch.Tensor, y: torch.Tensor, level: int) -> torch.Tensor:
        x_t, s_nat = evaluator.native(y, sig_ve[level]) if sig_native[level] > 0 else (D, 0.0)
        out = []
        step = evaluator.chunk or N
        for start in range(0, D.shape[0], step):
            sl = slice(start, start + step)
            sig = torch.full((D[sl].shape[0],), s_nat, dtype=D.dtype, device=D.device)
            out.append(evaluate_potentials(judges_at(level), D[sl], decode, x_t=x_t[sl], sigma=sig))
        report.judge_evals += D.shape[0]
        return betas[level] * torch.cat(out)

    def twist_grad(y: torch.Tensor, level: int) -> torch.Tensor:
        """∇_y β Σ γ r at the VE state y (through the model for x0-based judges)."""
        diff = [j for j in judges_at(level) if j.differentiable]
        with torch.inference_mode(False), torch.enable_grad():
            yg = y.detach().clone().requires_grad_(True)
            x_t, s_nat = evaluator.native(yg, sig_ve[level])
            sig = torch.full((N,), s_nat, dtype=y.dtype, device=y.device)
            total = torch.zeros((), dtype=torch.float64, device=y.device)
            noisy = [j for j in diff if j.noisy]
            if noisy:
                total = total + evaluate_potentials(noisy, x_t, None, x_t=x_t, sigma=sig).sum()
            clean = [j for j in diff if not j.noisy]
            if clean:
                ev = evaluator(yg, sig_ve[level])
                total = total + evaluate_potentials(clean, ev.x0, decode).sum()
            (grad,) = torch.autograd.grad(betas[level] * total, yg, allow_unused=True)
        return torch.zeros_like(y) if grad is None else grad.detach()

    # ---- level 0 ------------------------------------------------------------------------------
    s0 = sig_ve[0]
    start_inf = math.isinf(s0)
    if start_inf:
        active[0] = n_levels == 1  # nothing to judge in pure noise
    pure_noise = start_inf or s0 >= 10.0
    if pure_noise and L > 1:
        # SMC needs L independent draws from the prior: particle 0 keeps the caller's noise (L = 1 is a
        # plain sampler run), the others get fresh seeded noise at the same scale (x ≈ σ0·ε).
        fresh = noise_like(x_part[B:]) * (1.0 if start_inf else sig_native[0])
        x_part = torch.cat([x_part[:B], fresh])
    x_init = x_part
    if prior_scaling and pure_noise:
        # the product of the experts' Gaussian priors N(0, σ²)^{W_k} is N(0, σ²/Λ): start there
        probe_y = None if start_inf else (x_part[:B] / (1.0 - sig_native[0]) if flow else x_part[:B])
        lam = evaluator(probe_y, s0, x_native=x_part[:B] if start_inf else None, count=False, need_lam=True).lam
        if lam is not None:
            if (lam <= 0).any():
                raise ValueError("the experts' weights must sum to a positive value everywhere (got Λ <= 0)")
            x_init = x_part / lam.repeat((L,) + (1,) * (lam.ndim - 1)).sqrt().to(x_part.dtype)
    if start_inf:
        y = None
        ev = evaluator(None, s0, x_native=x_init, need_lam=True)
        eps_hat = x_init  # a flow state at σ = 1 is pure noise: ε̂ = x
    else:
        y = x_init / (1.0 - sig_native[0]) if flow else x_init
        ev = evaluator(y, s0, need_lam=True)
        eps_hat = None
    D, num, X0, lam_t = ev.D, ev.num, ev.x0, ev.lam
    elem = ev.elem
    lam_prop = proposal == "lambda" and lam_t is not None
    # √Λ per element for the Λ-aware move (and the correctly scaled first move of a flow model)
    inv_sqrt_lam = None if lam_t is None else lam_t.rsqrt().to(x_part.dtype)

    log_w = torch.zeros(L, B, dtype=torch.float64)
    fk_w = torch.zeros(L, B, dtype=torch.float64)  # FK part of log_w since the last resampling (for the guard)
    fk_on = torch.ones(B, dtype=torch.bool)
    retained = torch.ones(B, dtype=torch.float64)  # diversity share kept through FK-driven resampling (guard)
    report.guard_events = []
    report.resampled_items = []
    log_z = torch.zeros(B, dtype=torch.float64)
    replace_term = torch.zeros(L, B, dtype=torch.float64)  # paper / max / sum: current (non-accumulated) weight
    used_potential = torch.zeros(L, B, dtype=torch.float64)  # final_correction: Σ replace_term at ancestors' resamplings
    pot_prev = torch.zeros(N, dtype=torch.float64, device=x.device)
    running = None
    use_judges = bool(judges)
    twisting = twist and any(j.differentiable for j in judges)
    move_correction = torch.zeros(N, dtype=torch.float64, device=x.device)
    c_step = float(step_scale)
    # block-local resampling: FK log-weights per block (L, B, K), from the per-element FK numerators
    localized = localize == "blocks" and fk_correction != "off" and L > 1
    blk_w, elem_prev = None, None
    report.block_resampled, report.block_ess_min, report.block_guard = [], [], []
    if localized:
        blk_side = auto_block_size(tuple(x.shape[1:])) if block_size is None else block_size
        report.options["block_size"] = blk_side
        blk_idx, n_blocks = block_index(tuple(x.shape[1:]), blk_side)
        blk_w = torch.zeros(L, B, n_blocks, dtype=torch.float64)
        blk_on = torch.ones(B, n_blocks, dtype=torch.bool)  # blocks whose FK weights the guard has not dropped
        blk_retained = torch.ones(B, n_blocks, dtype=torch.float64)
        report.blocks = n_blocks
    # step="dpmpp_2m_sde": D_i − D_{i−1} of the prediction the move uses, taken along the last move (before
    # this level's MCMC, which jumps at fixed σ and says nothing about how D changes with σ); None = no history
    pred_diff = None

    for i in range(n_levels):
        # ---- weights for arriving at level i -----------------------------------------------------
        fk_applied = False
        if i > 0:
            log_w += move_correction.reshape(L, B).cpu()
            inc = None
            if fk_correction != "off" and not math.isinf(sig_ve[i - 1]):
                inc = fk_increment(num_prev, num, sig_ve[i - 1], sig_ve[i]).reshape(L, B).cpu()
            elif fk_correction != "off" and lam_prop and sig_ve[i] > 0:
                # first move of a flow model from σ = 1 (σ_ve = ∞): ∫ num/σ⁴ d(σ²) over [σ_1, ∞) with num
                # at its σ_1 value (num tends to a constant as σ → ∞ for the Λ-aware weights)
                inc = fk_increment(num, num, math.inf, sig_ve[i]).reshape(L, B).cpu()
            first = math.isinf(sig_ve[i - 1])
            if inc is not None and localized and elem is not None and (first or elem_prev is not None):
                # the FK increment is a sum over elements (num = Σ_j elem_j): each block gets its own elements'
                # share; the global weights keep the judges and move corrections only
                e_inc = fk_increment(elem if first else elem_prev, elem, sig_ve[i - 1], sig_ve[i])
                blk_w += block_sums(e_inc, blk_idx, n_blocks).reshape(L, B, n_blocks).cpu() * blk_on[None]
                inc = None
            if inc is not None:
                if fk_clip is not None:
                    inc = (inc - inc.mean(0, keepdim=True)).clamp(-fk_clip, fk_clip)
                inc = torch.where(fk_on[None], inc, torch.zeros_like(inc))
                log_w += inc
                fk_w += inc
                fk_applied = True
        final = i == n_levels - 1
        if use_judges and active[i] and (weighting != "none" or final):
            pot = potential(X0, y if y is not None else D, i)
            if weighting == "incremental":
                log_w += (pot - pot_prev).reshape(L, B).cpu()
            elif weighting == "paper":
                replace_term = pot.reshape(L, B).cpu()
            elif weighting == "max":
                running = pot if running is None else torch.maximum(running, pot)
                replace_term = running.reshape(L, B).cpu()
            elif weighting == "sum":
                running = pot if running is None else running + pot
                replace_term = running.reshape(L, B).cpu()
            pot_prev = pot
            if final and final_correction and weighting in ("paper", "max", "sum"):
                replace_term = pot.reshape(L, B).cpu() - used_potential
        if localized and y is not None:
            # ---- block-local resampling (block particle filter): each block with a low ESS picks its own
            # ancestors; at the last level every block with unequal weights, so the output weights are equal
            ess_blk = block_ess(blk_w)
            report.block_ess_min.append(float(ess_blk.min()) / L)
            if final:
                need_blk = (blk_w.amax(0) - blk_w.amin(0)) > 1e-9  # unequal beyond round-off
            elif schedule is None and i % resample_every != 0:
                need_blk = torch.zeros_like(ess_blk, dtype=torch.bool)
            else:
                need_blk = ess_blk < ess_threshold * L
            if guard == "fallback" and bool(need_blk.any()) and elem is not None:
                # the collapse guard, per block: a block whose weights' spread lies on more than block_guard_dims of its
                # elements, or whose resampling would leave less than guard_diversity of its diversity, is not
                # resampled; its FK weights are dropped and off from here (that block continues unweighted)
                keep_blk = diversity_kept(ess_blk, L)
                wide = block_participation(elem, L, blk_idx, n_blocks) > block_guard_dims
                fire = blk_on & need_blk & ((blk_retained * keep_blk < guard_diversity) | wide)
                if bool(fire.any()):
                    blk_on, need_blk = blk_on & ~fire, need_blk & ~fire
                    blk_w = blk_w * (~fire)[None].to(torch.float64)
                    for b in torch.nonzero(fire.any(1)).flatten().tolist():
                        report.block_guard.append(dict(level=i, sigma=sig_native[i], item=b, blocks=int(fire[b].sum())))
                blk_retained = torch.where(need_blk, blk_retained * keep_blk, blk_retained)
            report.block_resampled.append(need_blk)
            if bool(need_blk.any()):
                anc_blk, dz = block_resample(blk_w, need_blk, resampling, gen)
                log_z += dz
                blk_w = blk_w * (~need_blk)[None].to(torch.float64)
                y = stitch(y, anc_blk, blk_idx)
                # the 2M step's history D_i − D_{i−1} follows each block's new ancestor, like the state
                pred_diff = stitch(pred_diff, anc_blk, blk_idx) if pred_diff is not None else None
                # a network's prediction for a stitched image is not the stitch of its predictions: evaluate again
                if sig_ve[i] > 0:
                    calls_before = evaluator.calls
                    ev = evaluator(y, sig_ve[i])
                    D, num, X0, elem = ev.D, ev.num, ev.x0, ev.elem
                    report.block_refresh_calls += evaluator.calls - calls_before
                else:
                    D, X0 = y, y
                if use_judges and active[i] and (weighting == "incremental" or final):
                    # the judge term follows the stitched state (difference potentials; at the last level the
                    # final potentials are those of the stitched samples)
                    pot = potential(X0, y, i)
                    if weighting == "incremental":
                        log_w += (pot - pot_prev).reshape(L, B).cpu()
                    pot_prev = pot
        total_w = log_w + replace_term
        report.ess.append(effective_sample_size(total_w))
        report.sigmas.append(sig_native[i])

        # ---- resampling (decided per batch item) --------------------------------------------------
        need = torch.zeros(B, dtype=torch.bool)
        if schedule is not None:  # FK steering: every item at the scheduled levels, whatever the ESS
            if not final and L > 1 and i in schedule:
                need = torch.ones(B, dtype=torch.bool)
        elif not final and L > 1 and i % resample_every == 0:
            if (weighting in ("paper", "max", "sum") and use_judges and active[i]) or (fk_clip is not None and fk_applied):
                need = torch.ones(B, dtype=torch.bool)
            else:
                need = report.ess[-1] < ess_threshold * L
        resample_now = bool(need.any())
        report.resampled.append(resample_now)
        report.resampled_items.append(need)
        if resample_now and fk_applied and L > 1:
            # ---- collapse guard: a resampling on FK weights that would leave too little diversity is not made;
            # the item's FK weights are dropped and switched off from here (checked before resampling)
            fk_ess = effective_sample_size(fk_w)
            # a population of n effective independent draws keeps (1 − 1/n) of the variance
            keep = diversity_kept(fk_ess, L)
            if guard == "fallback" and fk_clip is None:
                dims = torch.zeros(B, dtype=torch.float64)
                if elem is not None:  # participation ratio of the elements in the weights' spread across particles
                    v = elem.reshape(L, B, -1).cpu().var(0)
                    dims = v.sum(1) ** 2 / (v**2).sum(1).clamp_min(1e-300)
                too_wide = dims > guard_dims
                fire = fk_on & need & ((retained * keep < guard_diversity) | too_wide)
                for b in torch.nonzero(fire).flatten().tolist():
                    report.guard_events.append(dict(
                        level=i, sigma=sig_native[i], item=b, ess=float(fk_ess[b]), retained=float(retained[b] * keep[b]),
                        dims=float(dims[b]),
                        action=f"item {b}, level {i} (σ={sig_native[i]:.4g}): resampling on the FK corrector weights (ESS "
                               f"{float(fk_ess[b]):.2f} of {L}, spread over ≈{float(dims[b]):.0f} latent elements, limit "
                               f"{guard_dims:g}) would keep {float(retained[b] * keep[b]):.2f} of the population's diversity "
                               f"(limit {guard_diversity}); FK weights dropped and off from here, the "
                               f"{'Λ-aware' if lam_prop else 'summed-score'} proposal continues unweighted (the product "
                               "is no longer corrected for this item)"))
                if bool(fire.any()):
                    fk_on = fk_on & ~fire
                    drop = fire[None].to(torch.float64)
                    log_w = log_w - drop * fk_w
                    fk_w = fk_w * (1 - drop)
                    total_w = log_w + replace_term
                    forced = ((weighting in ("paper", "max", "sum") and use_judges and active[i])
                              or (schedule is not None and i in schedule))
                    need = need & (~fire | torch.as_tensor(forced) | (effective_sample_size(total_w) < ess_threshold * L))
                    resample_now = bool(need.any())
                    report.resampled[-1] = resample_now
                    report.resampled_items[-1] = need
            retained = torch.where(need & fk_on, retained * keep, retained)
        if resample_now:
            log_z += torch.where(need, log_mean_weight(total_w), torch.zeros_like(log_z))
            anc = resample_indices(total_w, resampling, gen)  # (L, B)
            anc = torch.where(need[None], anc, torch.arange(L)[:, None].expand(L, B))
            flat = (anc * B + torch.arange(B)[None]).reshape(-1).to(D.device)
            D, num, X0, pot_prev = D[flat], num[flat], X0[flat], pot_prev[flat]
            y = y[flat] if y is not None else None
            eps_hat = eps_hat[flat] if eps_hat is not None else None
            pred_diff = pred_diff[flat] if pred_diff is not None else None
            if running is not None:
                running = running[flat]
            # potentials already paid for at resamplings (FK steering's final correction), per resampled item
            used_potential = torch.where(need[None], torch.gather(used_potential + replace_term, 0, anc), used_potential)
            keep = (~need)[None].to(torch.float64)
            log_w, replace_term, fk_w = log_w * keep, replace_term * keep, fk_w * keep

        if callback is not None:
            best = torch.argmax(log_w + replace_term, dim=0)
            pick = best * B + torch.arange(B)
            shown_x = evaluator.native(y, sig_ve[i])[0][pick.to(D.device)] if y is not None else x_init[:B]
            callback({"x": shown_x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": X0[pick.to(X0.device)], "ess": report.ess[-1], "particles": L})
        if final:
            break

        # ---- MCMC at level i -----------------------------------------------------------------------
        if mcmc_steps > 0 and y is not None and sig_native[i] > 0:
            y, D, num, X0, pot_prev, rate, elem = _mcmc_sweep(
                evaluator, y, D, num, X0, pot_prev, sig_ve[i], mcmc_steps, mcmc, c_step, noise_like, gen, elem=elem,
                tilt=(lambda D_, y_, i_=i: potential(D_, y_, i_)) if (use_judges and active[i] and weighting == "incremental") else None,
                twist=(lambda y_, i_=i: twist_grad(y_, i_)) if (twisting and active[i]) else None,
            )
            report.acceptance.append(rate)
            report.step_scales.append(c_step)
            if adapt_step and mcmc == "mala":
                c_step = adapt_step_scale(c_step, rate, target_acceptance)

        # ---- move to level i+1 ---------------------------------------------------------------------
        s_from, s_to = sig_ve[i], sig_ve[i + 1]
        down, up = ancestral_sigmas(s_from, s_to, eta)
        # Λ-aware move: the consensus D̄ as one model at noise σ/√Λ (drift and noise variance scaled by 1/Λ);
        # from σ = 1 (flow) both proposals start at the product's scale σ_1/√Λ, not σ_1
        scaled = lam_prop or (y is None and inv_sqrt_lam is not None)
        up_t = up * inv_sqrt_lam if (scaled and inv_sqrt_lam is not None) else up
        if y is None:
            base_mean = D + down * eps_hat
        elif lam_prop:
            base_mean = X0 + (down / s_from) * (y - X0)
        else:
            base_mean = D + (down / s_from) * (y - D)
        if pred_diff is not None and y is not None:  # second-order move (dpmpp_2m_coefficient)
            c2 = dpmpp_2m_coefficient(sig_ve[i - 1], s_from, s_to, down)
            if c2:
                base_mean = base_mean + c2 * pred_diff
        mean = base_mean
        move_correction = torch.zeros(N, dtype=torch.float64, device=x.device)
        if twisting and active[i] and y is not None and s_to > 0:
            drift_coef = (1.0 - down / s_from) * s_from**2
            if lam_prop:
                drift_coef = drift_coef * inv_sqrt_lam**2
            mean = base_mean + drift_coef * twist_grad(y, i)
            if up > 0:  # exact proposal correction: log N(y'; base, up²) − log N(y'; twisted, up²)
                z = noise_like(y)
                y_new = mean + up_t * z
                move_correction = _sumdims((((y_new - mean) ** 2 - (y_new - base_mean) ** 2) / (2 * up_t**2)).to(torch.float64))
            else:
                y_new = mean
        else:
            y_new = mean + up_t * noise_like(mean) if up > 0 else mean
        num_prev, elem_prev = num, elem
        pred_from = X0 if lam_prop else D
        y, eps_hat = y_new, None
        if s_to == 0:
            D, X0, num = y, y, torch.zeros(N, dtype=torch.float64, device=x.device)
        else:
            ev = evaluator(y, s_to)
            D, num, X0, elem = ev.D, ev.num, ev.x0, ev.elem
        use_history = step == "dpmpp_2m_sde" and s_to > 0 and not math.isinf(s_from)
        pred_diff = (X0 if lam_prop else D) - pred_from if use_history else None

    # ---- selection ---------------------------------------------------------------------------------
    final_w = log_w + replace_term
    log_z += log_mean_weight(final_w)
    report.log_z = log_z
    report.final_log_weights = final_w
    report.final_potentials = (pot_prev / betas[-1]).reshape(L, B).cpu() if use_judges else None
    report.model_calls_per_particle = evaluator.calls
    report.trace_calls_per_particle = evaluator.trace_calls
    report.trace_source = evaluator.trace_source
    report.particle_evals = evaluator.particle_evals
    out_nat = evaluator.native(y, sig_ve[-1])[0] if sig_native[-1] > 0 else y
    mode = selection if selection != "auto" else ("argmax" if use_judges else "sample")
    if mode == "argmax":
        score = report.final_potentials if use_judges else final_w
        pick = torch.argmax(score, dim=0)
        report.selected = pick
        return out_nat[(pick * B + torch.arange(B)).to(out_nat.device)]
    if mode == "sample":
        probs = normalized_log_weights(final_w).exp()
        pick = torch.multinomial(probs.T, 1, generator=gen).reshape(B)
        report.selected = pick
        return out_nat[(pick * B + torch.arange(B)).to(out_nat.device)]
    if mode == "resample":
        anc = resample_indices(final_w, resampling, gen)
    else:
        anc = torch.arange(L)[:, None].expand(L, B)
    report.selected = anc
    flat = (anc * B + torch.arange(B)[None]).T.reshape(-1)  # item-major output
    return out_nat[flat.to(out_nat.device)]


def _mcmc_sweep(evaluator, y, D, num, x0, pot, s_ve, steps, kind, step_scale, noise_like, gen, tilt=None, twist=None,
                elem=None):
    """K Langevin steps at fixed σ targeting π_σ (· exp(potential) when ``tilt`` is given).

    ULA: y' = y + (κ²/2) S(y) + κ z with κ² = c σ² (Zhang et al. 2025, Algorithm 1 step b).
    MALA adds the Metropolis test with log π(y') − log π(y) ≈ ½ (S(y) + S(y'))·(y' − y)
    (+ exact potential difference), so it is π_σ-invariant up to the energy estimate.
    """
    kappa2 = step_scale * s_ve**2
    kappa = math.sqrt(kappa2)
    accepted = 0.0
    score = (D - y) / s_ve**2
    drift = score + twist(y) if twist is not None else score
    for _ in range(steps):
        prop = y + 0.5 * kappa2 * drift + kappa * noise_like(y)
        ev = evaluator(prop, s_ve)
        D_p, num_p, x0_p, elem_p = ev.D, ev.num, ev.x0, ev.elem
        score_p = (D_p - prop) / s_ve**2
        drift_p = score_p + twist(prop) if twist is not None else score_p
        if kind == "ula":
            y, D, num, x0, score, drift, elem = prop, D_p, num_p, x0_p, score_p, drift_p, elem_p
            accepted += 1.0
            continue
        pot_p = tilt(x0_p, prop) if tilt is not None else pot
        d_log_pi = 0.5 * _sumdims(((score + score_p) * (prop - y)).to(torch.float64)) + (pot_p - pot)
        log_q_fwd = -_sumdims(((prop - y - 0.5 * kappa2 * drift) ** 2).to(torch.float64)) / (2 * kappa2)
        log_q_rev = -_sumdims(((y - prop - 0.5 * kappa2 * drift_p) ** 2).to(torch.float64)) / (2 * kappa2)
        log_alpha = d_log_pi + log_q_rev - log_q_fwd
        u = torch.rand(y.shape[0], generator=gen, dtype=torch.float64).to(y.device)
        acc = torch.log(u) < log_alpha
        m = _bdims(acc, y)
        y = torch.where(m, prop, y)
        D = torch.where(m, D_p, D)
        x0 = torch.where(m, x0_p, x0)
        score = torch.where(m, score_p, score)
        drift = torch.where(m, drift_p, drift)
        num = torch.where(acc, num_p, num)
        if elem is not None and elem_p is not None:  # per-element FK numerators (guard, block weights) follow the state
            elem = torch.where(acc[:, None], elem_p, elem)
        pot = torch.where(acc, pot_p, pot)
        accepted += acc.double().mean().item()
    if kind == "ula" and tilt is not None and twist is not None:
        # twisted ULA targets π_σ·exp(potential) (approximately): the next difference potential
        # must start from the moved state. Untwisted ULA keeps the stale value, which telescopes.
        pot = tilt(x0, y)
    return y, D, num, x0, pot, accepted / steps, elem


def _resampling_schedule(resample_at, n_levels: int) -> Optional[set]:
    """Level indices of a ``resample_at`` option (a sequence, or a callable of the number of steps)."""
    if resample_at is None:
        return None
    levels = resample_at(n_levels - 1) if callable(resample_at) else resample_at
    levels = [int(i) for i in levels]
    bad = [i for i in levels if not 0 <= i < n_levels]
    if bad:
        raise ValueError(f"resample_at: levels {bad} lie outside 0..{n_levels - 1} (the schedule has {n_levels - 1} steps)")
    return set(levels)


PROPOSALS = ("lambda", "summed")
STEPS = ("ancestral", "dpmpp_2m_sde")
TRACES = ("auto", "exact", "hutchinson", "off")
GUARDS = ("fallback", "off")
LOCALIZE = ("off", "blocks")


def _check_localize(localize, block_size, block_guard_dims, fk_clip, weighting, judges):
    if localize not in LOCALIZE:
        raise ValueError(f"localize must be one of {LOCALIZE}, got {localize!r}")
    if block_size is not None and not (isinstance(block_size, int) and block_size >= 1):
        raise ValueError(f"block_size must be an integer >= 1 (tile side in latent pixels), got {block_size!r}")
    if not block_guard_dims > 0:
        raise ValueError(f"block_guard_dims must be positive, got {block_guard_dims!r}")
    if localize == "blocks" and fk_clip is not None:
        raise ValueError('localize="blocks" keeps FK weights per block; fk_clip (centred, clipped global increments) '
                         'cannot be combined with it: set fk_clip=None or localize="off"')
    if localize == "blocks" and judges and weighting in ("paper", "max", "sum"):
        raise ValueError(f'localize="blocks" with judges needs weighting="incremental" (got {weighting!r}): the '
                         "judge term of a stitched particle is re-evaluated as a difference potential")


def _check_new_options(proposal, trace, trace_probes, guard, guard_diversity, guard_dims, fk_clip, step="ancestral"):
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    if proposal not in PROPOSALS:
        raise ValueError(f"proposal must be one of {PROPOSALS}, got {proposal!r}")
    if trace not in TRACES:
        raise ValueError(f"trace must be one of {TRACES}, got {trace!r}")
    if not (isinstance(trace_probes, int) and trace_probes >= 1):
        raise ValueError(f"trace_probes must be an integer >= 1, got {trace_probes!r}")
    if guard not in GUARDS:
        raise ValueError(f"guard must be one of {GUARDS}, got {guard!r}")
    if not 0.0 <= guard_diversity <= 1.0:
        raise ValueError(f"guard_diversity must lie in [0, 1], got {guard_diversity!r}")
    if not guard_dims > 0:
        raise ValueError(f"guard_dims must be positive, got {guard_dims!r}")
    if fk_clip is not None and not fk_clip > 0:
        raise ValueError(f"fk_clip must be positive (or None), got {fk_clip!r}")


def _check_options(particles, mcmc_steps, mcmc, fk_correction, weighting, tempering, resampling, ess_threshold,
                   resample_every, selection, step_scale, eta, sigmas, x):
    def need(cond, msg):
        if not cond:
            raise ValueError(msg)

    need(isinstance(particles, int) and particles >= 1, f"particles must be an integer >= 1, got {particles!r}")
    need(isinstance(mcmc_steps, int) and mcmc_steps >= 0, f"mcmc_steps must be an integer >= 0, got {mcmc_steps!r}")
    need(mcmc in MCMC_KINDS, f"mcmc must be one of {MCMC_KINDS}, got {mcmc!r}")
    need(fk_correction in FK_MODES, f"fk_correction must be one of {FK_MODES}, got {fk_correction!r}")
    need(weighting in WEIGHTINGS, f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    need(tempering in TEMPERINGS, f"tempering must be one of {TEMPERINGS}, got {tempering!r}")
    need(resampling in RESAMPLING_SCHEMES, f"resampling must be one of {RESAMPLING_SCHEMES}, got {resampling!r}")
    need(0.0 <= ess_threshold <= 1.0, f"ess_threshold must lie in [0, 1], got {ess_threshold!r}")
    need(isinstance(resample_every, int) and resample_every >= 1, "resample_every must be an integer >= 1")
    need(selection in SELECTIONS, f"selection must be one of {SELECTIONS}, got {selection!r}")
    need(step_scale > 0, f"step_scale must be positive, got {step_scale!r}")
    need(0.0 <= eta <= 1.0, f"eta must lie in [0, 1], got {eta!r}")
    s = torch.as_tensor(sigmas)
    need(s.ndim == 1 and s.numel() >= 2, "sigmas must be a 1-D schedule with at least two levels")
    need(bool(torch.isfinite(s).all()) and bool((s >= 0).all()), "sigmas must be finite and non-negative")
    need(bool((s[1:] < s[:-1]).all()), "sigmas must be strictly decreasing")
    need(x.ndim >= 2 and x.shape[0] >= 1, f"x must be a batch (B, ...), got shape {tuple(x.shape)}")
    need(bool(torch.isfinite(x).all()), "the initial noise x contains NaN or inf")


def sample_naive_composition(model, x, sigmas, extra_args=None, callback=None, disable=None, *, judges=(), decode=None,
                             eta: float = 1.0, twist: bool = False, seed=None, report=None, parameterization=None):
    """Baseline (Du et al. 2023): integrate the summed score once per sample — no weights, no MCMC.

    Differentiable judges only steer by gradient when ``twist`` (classifier-guidance style), at their full
    weights at every level (``tempering="constant"``: that is what summing the experts' scores means).
    """
    return sample_poe_smc(model, x, sigmas, extra_args, callback, disable, particles=1, judges=judges, decode=decode,
                          eta=eta, fk_correction="off", weighting="none", twist=twist, selection="all", seed=seed,
                          report=report, parameterization=parameterization, mcmc_steps=0, tempering="constant",
                          proposal="summed", guard="off", step="ancestral")


def sample_best_of_n(model, x, sigmas, extra_args=None, callback=None, disable=None, *, n: int = 4, judges=(),
                     decode=None, eta: float = 1.0, seed=None, report=None, parameterization=None, chunk_size=None):
    """Baseline: N independent naive samples per item, keep the one with the highest final potential."""
    return sample_poe_smc(model, x, sigmas, extra_args, callback, disable, particles=n, judges=judges, decode=decode,
                          eta=eta, fk_correction="off", weighting="none", selection="argmax" if judges else "sample",
                          seed=seed, report=report, parameterization=parameterization, mcmc_steps=0,
                          chunk_size=chunk_size, tempering="constant", proposal="summed", guard="off", step="ancestral")
