"""The product sampler at latent size: exact diagonal-mixture products from d = 2 to 262,144.

    python -m comfy_poe.benchmarks.highdim                       # default grid (a few minutes, 2 cores)
    python -m comfy_poe.benchmarks.highdim --dims 16384 --particles 16,64 --json out.json
    python -m comfy_poe.benchmarks.highdim --dims 262144 --particles 16 --items 1 --methods naive,default

Every expert is a factorised density (:class:`~comfy_poe.experts.gmm.DiagonalMixture`): element 0 is a
two-mode 1-D mixture, every other element a Gaussian, so denoisers and posterior variances are exact and
elementwise, and the product is exact (element 0 on a fine grid, the others in closed form) for any real
weights, CFG and soft masks. A latent of 16,384 elements is shaped 4×64×64 (an SD latent), 262,144 is
16×128×128 (a Flux 1024² latent). The Λ = 2 cases rotate the Gaussian elements pairwise (45°) in a
shared frame, so the experts' Jacobians are not diagonal and a Hutchinson trace estimate has its real
noise; metrics are computed in the experts' own frame.

Cases: lam2_all (two full-weight experts that differ in every element), lam2_few (identical but for 8
elements), ratio (p_A p_B / p_base, Λ = 1), cfg (cond 3 / uncond −2), masks_disjoint (two halves),
masks_soft (masks overlapping in a feathered band: Λ from 1 to 2 there), global_mode (Λ = 2, each expert a
mixture of two d-dimensional Gaussians at ±0.25·1 + offsets, the component shared by every element: the
"upper mode" is a property of the whole latent, judged by the sign of the latent's mean). EPS (Karras σ)
and CONST (flow σ, shift 3) parameterisations.

Metrics per method, over ``items`` independent batch items of L particles each (the output is the
weighted particle population, so "calls/output" = model calls per particle):
  mode err   mean over items of |weighted mass of element 0's upper mode − exact|
  var err    mean over items and Gaussian elements of weighted variance / exact − 1 (reliability-weighted)
  mean err   RMS over items and Gaussian elements of (weighted mean − exact) / exact sd
  resamples  mean resampling count per item; min ESS/L over levels and items; guard: items where the
             collapse guard fired.
  incoh      global_mode only: share of outputs with an 8×8-tile block (all channels) whose mean lies on
             the other side of the mode boundary than the whole latent's mean (a sample stitched from both
             modes; exact samples: 0).
  blk res    localize="blocks": mean block resamplings per item (summed over levels and blocks).
The "exact" row draws exact samples with the same L and items: its errors are the seed-noise floor.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass

import torch

from ..experts import GenerativeExpert, ProductOfExperts
from ..experts.gmm import DiagonalDenoiser, DiagonalMixture
from ..samplers import SMCReport, normalized_log_weights, sample_poe_smc
from ..samplers.localize import block_index
from ..samplers.schedules import flow_sigmas, karras_sigmas

SHAPES = {16384: (4, 64, 64), 262144: (16, 128, 128)}
CASES = ("lam2_all", "lam2_few", "ratio", "cfg", "masks_disjoint", "masks_soft", "global_mode")
METHODS = {
    "naive": dict(fk_correction="off", proposal="summed", guard="off", step="ancestral"),
    "naive Λ-aware": dict(fk_correction="off", proposal="lambda", guard="off"),
    "fk summed (old default)": dict(proposal="summed", guard="off", step="ancestral"),
    "fk summed clip±1": dict(proposal="summed", guard="off", fk_clip=1.0),
    "fk Λ exact": dict(proposal="lambda", trace="exact", guard="off"),
    "fk Λ hutchinson": dict(proposal="lambda", trace="hutchinson", guard="off"),
    "default": dict(),
    "default ancestral": dict(step="ancestral"),
    "default hutchinson": dict(trace="hutchinson"),
    "default guard 0.5": dict(guard_diversity=0.5),
    "blocks": dict(localize="blocks"),  # tiles of ≤ 64 elements (4×4 × 4 channels), block guard at 4 elements (defaults)
    "blocks 4": dict(localize="blocks", block_size=4),  # 4×4 tiles whatever the channels (256 elements at 16 channels)
    "blocks hutchinson": dict(localize="blocks", trace="hutchinson"),
    "blocks 2": dict(localize="blocks", block_size=2),  # 2×2 tiles: 64 elements per block on a 16-channel latent
    "blocks 4 guard 8": dict(localize="blocks", block_size=4, block_guard_dims=8.0),
    "blocks 8 guard 16": dict(localize="blocks", block_size=8, block_guard_dims=16.0),
    "blocks 8 guard 64": dict(localize="blocks", block_size=8, block_guard_dims=64.0),
    "blocks 8 guard 8": dict(localize="blocks", block_size=8, block_guard_dims=8.0),
    "blocks 16 guard 16": dict(localize="blocks", block_size=16, block_guard_dims=16.0),
}
MAIN_METHODS = ("naive", "naive Λ-aware", "fk summed (old default)", "fk summed clip±1", "fk Λ exact", "default",
                "default hutchinson")
# element 0 of experts A and B: (means, variances, weights); the product puts 0.13 of its mass on the upper
# mode, naive score summing about 0.45 (a wide mode in both experts against a narrow one in both)
MODES = (((-2.0, 2.0), (0.02, 1.0), (0.5, 0.5)), ((-2.0, 2.0), (0.02, 1.0), (0.5, 0.5)))
GRID = torch.linspace(-12.0, 12.0, 48001, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# problems


class PairRotated:
    """p(R x) for a mixture p and the pairwise 45° rotation R of elements (1,2), (3,4), … (R = Rᵀ = R⁻¹);
    element 0 and an odd last element stay. Exact denoiser R D(R y) and posterior variance diag(R C R)."""

    def __init__(self, inner: DiagonalMixture):
        self.inner = inner
        d = inner.dim
        self.pairs = (d - 1) // 2

    def rotate(self, y: torch.Tensor) -> torch.Tensor:
        flat = y.reshape(y.shape[0], -1)
        n = 2 * self.pairs
        pairs = flat[:, 1:n + 1].reshape(flat.shape[0], self.pairs, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        rot = torch.stack([a + b, a - b], -1).reshape(flat.shape[0], n) * (1 / math.sqrt(2))
        return torch.cat([flat[:, :1], rot, flat[:, n + 1:]], 1).reshape(y.shape)

    def denoise_and_var(self, y, s_ve):
        mean, c = self.inner.denoise_and_var(self.rotate(y), s_ve)
        c = c.reshape(y.shape[0], -1).clone()
        n = 2 * self.pairs
        avg = 0.5 * (c[:, 1:n + 1:2] + c[:, 2:n + 2:2])
        c[:, 1:n + 1:2], c[:, 2:n + 2:2] = avg, avg
        return self.rotate(mean), c.reshape(y.shape)


class SharedModeMixture:
    """p(x) = Σ_c π_c Π_j N(x_j; μ_cj, v_cj): a mixture of K d-dimensional diagonal Gaussians whose component
    is shared by every element (a global mode). Exact denoiser and diag Cov[x0 | y] at any σ: the
    responsibilities r_c(y) ∝ π_c Π_j N(y_j; μ_cj, v_cj + σ²) depend on the whole latent."""

    def __init__(self, means, variances, weights):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.vars = torch.as_tensor(variances, dtype=torch.float64)
        self.log_pi = torch.as_tensor(weights, dtype=torch.float64).log()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def denoise_and_var(self, y, s_ve):
        flat = y.reshape(y.shape[0], -1).to(torch.float64)
        s2 = torch.as_tensor(s_ve, dtype=torch.float64)
        s2 = (s2.reshape(-1, 1, 1) if s2.ndim else s2) ** 2
        tot = self.vars[None] + s2  # (N, K, d)
        diff = flat[:, None] - self.means[None]
        resp = torch.softmax(self.log_pi[None] - 0.5 * (diff**2 / tot + tot.log()).sum(2), dim=1)[:, :, None]
        gain = self.vars[None] / tot
        m = self.means[None] + gain * diff
        mean = (resp * m).sum(1)
        var = ((resp * (gain * s2 + m * m)).sum(1) - mean * mean).clamp_min(0)
        return mean.reshape(y.shape).to(y.dtype), var.reshape(y.shape).to(y.dtype)


GLOBAL_M = 0.25  # the modes ±m·1: the mode is decided around σ ≈ 2m√d / (a few) inside the 80 → 0.002 schedule
GLOBAL_PI = (0.25, 0.75)  # both experts: upper, lower component weights; exact upper mass 0.25² / (0.25² + 0.75²) = 0.1


def _global_mode_problem(d, shape, g):
    """global_mode: two experts A, B, each Σ_± π_± N(±m·1 + δ_k, diag v_k); the exact product is the mixture over
    component pairs (a, b) with weight π_a π_b Π_j N(μ_aj − μ_bj; 0, v_Aj + v_Bj) and per-element precision
    1/v_A + 1/v_B (the cross pairs carry ≈ e^{−d·m²/2} of the mass)."""
    experts, mix = [], []
    for name in ("A", "B"):
        delta = 0.5 * torch.randn(d, generator=g, dtype=torch.float64)
        v = torch.exp(0.4 * torch.randn(d, generator=g, dtype=torch.float64))
        means = torch.stack([delta + GLOBAL_M, delta - GLOBAL_M])
        mix.append(SharedModeMixture(means, v.expand(2, d).clone(), GLOBAL_PI))
        experts.append(GenerativeExpert(DiagonalDenoiser("eps"), mix[-1], name=name))
    A, B = mix
    prec = 1.0 / A.vars[0] + 1.0 / B.vars[0]
    pairs, logw = [], []
    for a in range(2):
        for b in range(2):
            tot = A.vars[a] + B.vars[b]
            logw.append(float(A.log_pi[a] + B.log_pi[b] - 0.5 * ((A.means[a] - B.means[b]) ** 2 / tot + tot.log()).sum()))
            pairs.append((A.means[a] / A.vars[a] + B.means[b] / B.vars[b]) / prec)
    w = torch.softmax(torch.tensor(logw, dtype=torch.float64), 0)
    centre = torch.stack(pairs)  # (4, d) component means of the product
    mid = (A.means.mean(0) / A.vars[0] + B.means.mean(0) / B.vars[0]) / prec  # halfway between the ++ and −− means
    upper = (centre - mid).mean(1) > 0
    mean = (w[:, None] * centre).sum(0)
    var = (w[:, None] * (1.0 / prec + centre**2)).sum(0) - mean**2
    return experts, dict(p_upper=float(w[upper].sum()), mean=mean, var=var, pair_w=w, pair_mean=centre, pair_var=1.0 / prec,
                         mid=mid)


def _mode_mixture(means, variances, weights, d, g_means, g_vars):
    """Element 0: the given 1-D mixture; elements 1..d-1: Gaussians (two identical components)."""
    m = torch.empty(2, d, dtype=torch.float64)
    v = torch.empty(2, d, dtype=torch.float64)
    w = torch.full((2, d), 0.5, dtype=torch.float64)
    m[:, 0], v[:, 0], w[:, 0] = torch.tensor(means), torch.tensor(variances), torch.tensor(weights)
    m[:, 1:], v[:, 1:] = g_means[None], g_vars[None]
    return DiagonalMixture(m, v, w)


def _ramp(shape, lo, hi):
    """Masks vary along the last (width) axis: 0 before lo, 1 after hi (fractions of the width)."""
    width = shape[-1]
    u = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    r = ((u - lo) / max(hi - lo, 1e-9)).clamp(0, 1)
    return r.expand(shape).contiguous()


@dataclass
class Problem:
    name: str
    model: ProductOfExperts
    p_upper: float  # exact mass of element 0's upper mode (x0 > 0)
    mean: torch.Tensor  # exact means of the Gaussian elements (experts' frame)
    var: torch.Tensor
    grid_cdf: torch.Tensor  # element 0 on GRID
    frame: object  # PairRotated (metrics in the experts' frame) or None
    shape: tuple
    global_mode: dict = None  # global_mode: the exact product's pairs (weights, means, variance) and the mode boundary


def build(case: str, d: int, param: str = "eps", seed: int = 0) -> Problem:
    shape = SHAPES.get(d, (d,))
    g = torch.Generator().manual_seed(1000 + seed)
    n = d - 1
    mA, vA = 0.5 * torch.randn(n, generator=g, dtype=torch.float64), torch.exp(0.4 * torch.randn(n, generator=g, dtype=torch.float64))
    mB, vB = 0.5 * torch.randn(n, generator=g, dtype=torch.float64), torch.exp(0.4 * torch.randn(n, generator=g, dtype=torch.float64))
    A0, B0 = MODES
    den = DiagonalDenoiser(param)
    rotate = case.startswith("lam2")
    if case == "global_mode":
        if param != "eps":
            raise ValueError("global_mode is built for EPS only")
        experts, exact = _global_mode_problem(d, shape, g)
        return Problem(case, ProductOfExperts(experts), exact["p_upper"], exact["mean"], exact["var"], None, None, shape,
                       exact)
    if case == "lam2_few":
        mB, vB = mA.clone(), vA.clone()
        mB[:8] += 0.5
        vB[:8] *= 2.0
    A = _mode_mixture(*A0, d, mA, vA)
    B = _mode_mixture(*B0, d, mB, vB)
    ones = torch.ones(d, dtype=torch.float64)
    if case in ("lam2_all", "lam2_few"):
        factors = [(A, ones), (B, ones)]
        experts = [GenerativeExpert(den, PairRotated(A), name="A"), GenerativeExpert(den, PairRotated(B), name="B")]
    elif case == "ratio":
        base = _mode_mixture((0.0, 0.0), (9.0, 9.0), (0.5, 0.5), d, 0.5 * torch.randn(n, generator=g, dtype=torch.float64),
                             2.0 * torch.maximum(vA, vB))
        factors = [(A, ones), (B, ones), (base, -ones)]
        experts = [GenerativeExpert(den, A, name="A"), GenerativeExpert(den, B, name="B"),
                   GenerativeExpert(den, base, weight=-1.0, name="base")]
    elif case == "cfg":
        vU = vA * torch.exp(0.3 * torch.randn(n, generator=g, dtype=torch.float64)).clamp_min(0.8)
        U = _mode_mixture((-2.0, 2.0), (1.0, 1.0), (0.5, 0.5), d, mA + 0.5 * torch.randn(n, generator=g, dtype=torch.float64), vU)
        factors = [(A, 3.0 * ones), (U, -2.0 * ones)]
        experts = [GenerativeExpert(den, A, negative=U, cfg=3.0, name="cond")]
    elif case in ("masks_disjoint", "masks_soft"):
        lo, hi = (0.5, 0.5) if case == "masks_disjoint" else (0.35, 0.45)
        mask_b = _ramp(shape, lo, hi)  # B acts on the right, A on the left (element 0 is in A's part)
        mask_a = 1.0 - _ramp(shape, 1.0 - hi, 1.0 - lo)
        if case == "masks_disjoint":
            mask_a = 1.0 - mask_b
        factors = [(A, mask_a.reshape(-1)), (B, mask_b.reshape(-1))]
        experts = [GenerativeExpert(den, A, mask=mask_a.float(), name="A"), GenerativeExpert(den, B, mask=mask_b.float(), name="B")]
    else:
        raise ValueError(f"unknown case {case!r}; choose from {CASES}")
    # exact product: element 0 on a grid, the Gaussian elements in closed form (precisions add with weights)
    logp = torch.zeros_like(GRID)
    prec = torch.zeros(n, dtype=torch.float64)
    lin = torch.zeros(n, dtype=torch.float64)
    for mix, w in factors:
        comp = mix.log_w[:, 0:1] - 0.5 * ((GRID[None] - mix.means[:, 0:1]) ** 2 / mix.vars[:, 0:1] + mix.vars[:, 0:1].log())
        logp = logp + w[0] * torch.logsumexp(comp, 0)
        prec = prec + w[1:] / mix.vars[0, 1:]
        lin = lin + w[1:] * mix.means[0, 1:] / mix.vars[0, 1:]
    if (prec <= 0).any():
        raise ValueError(f"case {case}: the exact product is improper on some element")
    p = torch.softmax(logp, 0)
    return Problem(case, ProductOfExperts(experts), float(p[GRID > 0].sum()), lin / prec, 1.0 / prec, p.cumsum(0),
                   PairRotated(A) if rotate else None, shape)


# ------------------------------------------------------------------------------------------------
# metrics


def population_metrics(prob: Problem, x: torch.Tensor, log_w: torch.Tensor) -> dict:
    """x: (items·L, d) item-major outputs; log_w: (L, items) final log-weights."""
    L, items = log_w.shape
    flat = x.reshape(items * L, -1).to(torch.float64)
    if prob.frame is not None:
        flat = prob.frame.rotate(flat)
    flat = flat.reshape(items, L, -1)
    w = normalized_log_weights(log_w).exp().T  # (items, L)
    incoherent = None
    if prob.global_mode is not None:  # the mode of the whole latent: the sign of its mean (against the boundary)
        dev = flat - prob.global_mode["mid"][None, None]
        side = dev.mean(2) > 0
        upper = (w * side.double()).sum(1)
        idx, k = block_index(prob.shape, 8)
        blk = torch.zeros(items, L, k, dtype=torch.float64).index_add_(2, idx, dev) > 0
        incoherent = float((w * (blk != side[:, :, None]).any(2).double()).sum(1).mean())
        g = flat
    else:
        upper = (w * (flat[:, :, 0] > 0).double()).sum(1)
        g = flat[:, :, 1:]
    mean = (w[:, :, None] * g).sum(1)
    rel = 1.0 - (w**2).sum(1)  # reliability-weights correction (unbiased for independent particles)
    var = (w[:, :, None] * (g - mean[:, None]) ** 2).sum(1) / rel.clamp_min(1e-12)[:, None]
    var = torch.where(rel[:, None] > 1e-9, var, torch.zeros_like(var))
    return dict(
        mode_err=float((upper - prob.p_upper).abs().mean()),
        mode_err_items=(upper - prob.p_upper).abs().tolist(),
        var_err=float((var / prob.var[None] - 1).mean()),
        var_err_items=(var / prob.var[None] - 1).mean(1).tolist(),
        mean_err=float((((mean - prob.mean[None]) ** 2) / prob.var[None]).mean().sqrt()),
        incoherent=incoherent,
    )


def exact_samples(prob: Problem, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if prob.global_mode is not None:
        ex = prob.global_mode
        pair = torch.multinomial(ex["pair_w"], n, replacement=True, generator=g)
        return ex["pair_mean"][pair] + ex["pair_var"].sqrt()[None] * torch.randn(n, prob.mean.numel(), generator=g, dtype=torch.float64)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    x0 = GRID[torch.searchsorted(prob.grid_cdf, u).clamp_max(GRID.numel() - 1)]
    rest = prob.mean[None] + prob.var.sqrt()[None] * torch.randn(n, prob.mean.numel(), generator=g, dtype=torch.float64)
    out = torch.cat([x0[:, None], rest], 1)
    return prob.frame.rotate(out) if prob.frame is not None else out  # metrics rotate back


def run(prob: Problem, method: str, L: int, items: int, param: str, levels: int, seed: int, dtype) -> dict:
    t0 = time.perf_counter()
    if method == "exact":
        x = exact_samples(prob, items * L, seed)
        m = population_metrics(prob, x, torch.zeros(L, items, dtype=torch.float64))
        return dict(m, resamples=0.0, min_ess=1.0, calls=0, guard=0, block_resamples=0.0, wall=time.perf_counter() - t0)
    opts = dict(METHODS[method])
    flow = param == "const"
    sigmas = flow_sigmas(levels, shift=3.0) if flow else karras_sigmas(levels, 0.002, 80.0)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((items,) + prob.shape, generator=g, dtype=torch.float64).to(dtype) * (1.0 if flow else 80.0)
    rep = SMCReport()
    out = sample_poe_smc(prob.model, x, sigmas, particles=L, selection="all", seed=seed, report=rep,
                         parameterization=param, **opts)
    m = population_metrics(prob, out, rep.final_log_weights)
    counts = rep.resample_counts()
    return dict(m, resamples=sum(counts) / max(len(counts), 1), min_ess=rep.min_ess_fraction(),
                calls=rep.model_calls_per_particle, guard=len({e["item"] for e in rep.guard_events}),
                block_resamples=sum(rep.block_resample_counts()) / items, wall=time.perf_counter() - t0)


def contract(rows: list, d: int = 16384, method: str = "default") -> list:
    """Point 3 of issue 15 at dimension d: per (case, param, L) ``method`` (the default) vs naive.

    never worse: mode err ≤ naive + 2·se and |var err| ≤ |naive| + 2·se (se from the item spread);
    Λ = 2 (lam2_*): mode err ≤ naive / 2; calls/output ≤ 3× naive; global_mode: incoherent share ≤ naive + 0.05."""
    out, want = [], method
    keyed = {(r["d"], r["case"], r["param"], r["L"], r["method"]): r for r in rows}
    for (dd, case, param, L, method), r in keyed.items():
        if dd != d or method != want:
            continue
        nv = keyed.get((dd, case, param, L, "naive"))
        if nv is None:
            continue
        se = lambda key: math.sqrt((_sd(r[key]) ** 2 + _sd(nv[key]) ** 2) / len(r[key]))
        ok_mode = r["mode_err"] <= nv["mode_err"] + 2 * se("mode_err_items")
        ok_var = abs(r["var_err"]) <= abs(nv["var_err"]) + 2 * se("var_err_items")
        ok_half = (r["mode_err"] <= 0.5 * nv["mode_err"]) if case.startswith("lam2") else True
        ok_calls = r["calls"] <= 3 * nv["calls"]
        # global_mode: no more samples stitched from both modes than naive's (+0.05)
        ok_coh = r.get("incoherent") is None or r["incoherent"] <= (nv.get("incoherent") or 0.0) + 0.05
        out.append(dict(case=case, param=param, L=L, holds=ok_mode and ok_var and ok_half and ok_calls and ok_coh,
                        mode=ok_mode, var=ok_var, halves=ok_half, calls=ok_calls, coherent=ok_coh))
    return out


def _sd(v):
    t = torch.tensor(v, dtype=torch.float64)
    return float(t.std()) if t.numel() > 1 else 0.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="2,64,1024,16384", help="comma-separated element counts (16384 → 4×64×64, 262144 → 16×128×128)")
    ap.add_argument("--particles", default="16", help="comma-separated L values (issue: 4,16,64)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {CASES}")
    ap.add_argument("--params", default="eps", help="eps, const or eps,const")
    ap.add_argument("--methods", default=",".join(MAIN_METHODS), help=f"comma-separated subset of {tuple(METHODS)} (exact is always added)")
    ap.add_argument("--items", type=int, default=8, help="independent batch items per run (seeds of the population)")
    ap.add_argument("--levels", type=int, default=60, help="noise levels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--float32-above", type=int, default=8192, help="use float32 states above this many elements")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="write every row (with per-item errors) to this file")
    ap.add_argument("--merge", default="", help="comma-separated JSON files of earlier runs (same seed): their rows join "
                    "the contract check (e.g. the naive rows), they are not re-run or re-printed")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = ["exact"] + [m for m in args.methods.split(",") if m]
    for m in methods[1:]:
        if m not in METHODS:
            ap.error(f"--methods: unknown {m!r}; choose from {tuple(METHODS)}")
    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        if c not in CASES:
            ap.error(f"--cases: unknown {c!r}; choose from {CASES}")
    rows = []
    print("| d | case | param | L | method | mode err | var err | mean err | resamples | min ESS/L | calls/output | guard "
          "| blk res | incoh | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for d in [int(v) for v in args.dims.split(",")]:
        dtype = torch.float32 if d > args.float32_above else torch.float64
        for param in args.params.split(","):
            for case in cases:
                prob = build(case, d, param, args.seed)
                for L in [int(v) for v in args.particles.split(",")]:
                    for method in methods:
                        r = run(prob, method, L, args.items, param, args.levels, args.seed, dtype)
                        r.update(d=d, case=case, param=param, L=L, method=method)
                        rows.append(r)
                        print(f"| {d} | {case} | {param} | {L} | {method} | {r['mode_err']:.3f} | {r['var_err']:+.3f} | "
                              f"{r['mean_err']:.3f} | {r['resamples']:.1f} | {r['min_ess']:.3f} | {r['calls']} | "
                              f"{r['guard']}/{args.items} | {r['block_resamples']:.0f} | "
                              f"{'-' if r['incoherent'] is None else format(r['incoherent'], '.3f')} | {r['wall']:.1f} |", flush=True)
    merged = list(rows)
    for path in [p for p in args.merge.split(",") if p]:
        with open(path) as f:
            merged += [r for r in json.load(f) if (r["d"], r["case"], r["param"], r["L"], r["method"]) not in
                       {(q["d"], q["case"], q["param"], q["L"], q["method"]) for q in rows}]
    for dd, method in sorted({(r["d"], r["method"]) for r in rows if r["method"] in ("default", "blocks")}):
        res = contract(merged, dd, method)
        if res:
            print(f"\ncontract of issue 15 point 3 at d = {dd} ({method} vs naive):")
            for c in res:
                print(f"  {c['case']:15s} {c['param']} L={c['L']}: {'holds' if c['holds'] else 'FAILS'}"
                      f" (mode {c['mode']}, var {c['var']}, halves {c['halves']}, calls {c['calls']}, coherent {c['coherent']})")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        import os

        os.replace(args.json + ".tmp", args.json)
    return rows


if __name__ == "__main__":
    main()
