"""Issue 15 point 4: the integrator's own discretisation bias, one Gaussian expert alone (no product, no weights).

    python -m comfy_poe.benchmarks.integrator_bias [--levels 30,60,100,120,200] [--particles 20000]

One expert N(0, v·I) in 4-D (v = 1, 0.25, 0.02, 4 per element), Karras levels σ 80 → 0.002 then 0,
no MCMC. Every row prints the variance error Var[x] / v − 1 of the sampler's output (``sample_poe_smc``,
mean over the four elements, particles = independent outputs: one expert has no FK weights) next to the
exact value of the same linear Gaussian recursion (:func:`exact_variance_error`, no sampling noise).
Steps: ``ancestral`` (Euler–Maruyama / DPM-Solver++(1)-SDE, 1 call per level), ``dpmpp_2m_sde``
(the sampler's second-order multistep step, 1 call per level) and, in the exact column only, a
stochastic Heun step (predictor–corrector on the same noise, Karras et al. 2022 Alg. 2 without churn,
2 calls per level) — compare it with the others at twice the levels.
"""
from __future__ import annotations

import argparse
import math

import torch

from ..cli import plain_help
from ..experts import GaussianMixture, GenerativeExpert, GMMDenoiser, ProductOfExperts
from ..samplers import SMCReport, ancestral_sigmas, dpmpp_2m_coefficient, sample_poe_smc
from ..samplers.schedules import karras_sigmas

VARIANCES = (1.0, 0.25, 0.02, 4.0)


def exact_variance_error(levels: int, v: float, step: str, eta: float = 1.0) -> float:
    """Var[x_0]/v − 1 of the move for one expert N(0, v) (D = a y, a = v/(v + σ²)), exactly.

    The moves are linear in (y, D_prev) plus Gaussian noise, so the covariance recursion is exact:
    ancestral / dpmpp_2m_sde as in :func:`comfy_poe.samplers.sample_poe_smc`; "heun_sde" predicts with the
    ancestral step, evaluates D at the prediction and integrates the linear-in-λ interpolation of the two
    predictions exactly (weight 1 − (1 − e^{−2h})/(2h) on D_to − D_from), same noise: 2 calls per level.
    """
    sig = [float(s) for s in karras_sigmas(levels, 0.002, 80.0)]
    P, C, Q = sig[0] ** 2, 0.0, 0.0  # Var y, Cov(y, D_prev), Var D_prev
    s_prev = None
    for s, t in zip(sig[:-1], sig[1:]):
        a = v / (v + s * s)
        if t == 0:
            return a * a * P / v - 1.0
        down, up = ancestral_sigmas(s, t, eta)
        first = down / s + (1.0 - down / s) * a  # y -> ancestral mean coefficient
        if step == "heun_sde":
            a_t = v / (v + t * t)
            c = 1.0 - (1.0 - (down / s)) / (2.0 * math.log(s / t)) if eta == 1.0 else 0.5 * (1.0 - down / s)
            coef_y, coef_n = first - c * a + c * a_t * first, 1.0 + c * a_t
            P, C, Q = coef_y**2 * P + coef_n**2 * up**2, 0.0, 0.0
        else:
            c = dpmpp_2m_coefficient(s_prev, s, t, down) if step == "dpmpp_2m_sde" else 0.0
            A, Bc = first + c * a, -c
            P, C, Q = A * A * P + 2 * A * Bc * C + Bc * Bc * Q + up**2, A * a * P + Bc * a * C, a * a * P
        s_prev = s
    raise AssertionError("the schedule must end at 0")


def sampled_variance_error(levels: int, step: str, particles: int, seed: int = 0) -> float:
    """Var[x_0]/v − 1 of ``sample_poe_smc`` with one expert N(0, diag(VARIANCES)), mean over the elements."""
    v = torch.tensor(VARIANCES, dtype=torch.float64)
    model = ProductOfExperts([GenerativeExpert(GMMDenoiser(), GaussianMixture([[0.0] * len(VARIANCES)], [v.tolist()]))])
    x = torch.randn(1, len(VARIANCES), dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 80.0
    out = sample_poe_smc(model, x, karras_sigmas(levels, 0.002, 80.0), particles=particles, selection="all",
                         seed=seed, step=step, report=SMCReport())
    return float((out.var(0) / v - 1.0).mean())


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m comfy_poe.benchmarks.integrator_bias", description=plain_help(__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="30,60,100,120,200")
    ap.add_argument("--particles", type=int, default=20000)
    ap.add_argument("--seeds", default="0,1")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    mean_exact = lambda n, st: sum(exact_variance_error(n, v, st) for v in VARIANCES) / len(VARIANCES)
    print("| levels | ancestral: calls/output | var err sampled (seeds) | exact | dpmpp_2m_sde: var err sampled (seeds) | exact "
          "| heun_sde at levels/2 (same calls): exact |")
    print("|---|---|---|---|---|---|---|")
    for n in [int(v) for v in args.levels.split(",")]:
        cells = []
        for step in ("ancestral", "dpmpp_2m_sde"):
            sampled = [sampled_variance_error(n, step, args.particles, s) for s in seeds]
            cells += [" / ".join(f"{e:+.3f}" for e in sampled), f"{mean_exact(n, step):+.4f}"]
        heun = f"{mean_exact(n // 2, 'heun_sde'):+.4f}" if n >= 4 else "–"
        print(f"| {n} | {n} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | {heun} |", flush=True)
    print("\nper expert variance, exact, 60 / 200 levels (ancestral, dpmpp_2m_sde, heun_sde at 30 / 100):")
    for v in VARIANCES:
        print(f"  v = {v}: " + ", ".join(f"{exact_variance_error(60, v, st):+.4f} / {exact_variance_error(200, v, st):+.4f}"
                                          for st in ("ancestral", "dpmpp_2m_sde")) +
              f", {exact_variance_error(30, v, 'heun_sde'):+.4f} / {exact_variance_error(100, v, 'heun_sde'):+.4f}")


if __name__ == "__main__":
    main()
