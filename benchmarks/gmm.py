"""Benchmark on exact targets: products of Gaussian mixtures (2-D and 8-D, plain and reward-tilted).

    python -m comfy_poe.benchmarks.gmm [--particles 2000] [--quick]

Prints one table: method × model-evaluation budget → sliced-W2 / noise floor, mode-weight error,
final ESS, wall time, plus the noise-floor row (exact vs exact). Budgets are model calls per particle.
Methods (all through samplers.sample_poe_smc, so they share every line of the integrator):
  naive        score-sum composition (Du et al. 2023), one ancestral pass (summed score)
  best-of-N    N naive samples, keep the highest reward (tilted targets only)
  paper        Zhang et al. 2025 Algorithm 1: Euler init kernel, ULA, resample on the current reward
  MCMC only    naive + MALA steps per level, no weights
  FK-SMC, engine defaults   sample_poe_smc with no options: Λ-aware proposal, second-order step, no MCMC
  FK-SMC ULA   the defaults + 2 ULA steps per level (fewer levels, same calls)
  FK-SMC MALA  the defaults + 2 adaptive MALA steps per level (fewer levels, same calls)
"""
from __future__ import annotations

import argparse
import time

import torch

from ..cli import plain_help, positive_int
from ..experts import GenerativeExpert, GMMDenoiser, ProductOfExperts, gaussian_reward
from ..experts.gmm import random_product_problem
from ..samplers import SMCReport, normalized_log_weights, sample_poe_smc
from ..samplers.metrics import mode_weight_error, noise_floor, sliced_wasserstein
from ..samplers.schedules import karras_sigmas


def problem(dim: int, seed: int, tilt: bool):
    p1, p2 = random_product_problem(dim, seed)
    exact = p1.product(p2)
    judges = []
    if tilt:
        center = exact.means[exact.weights.argmin()]
        judges = [gaussian_reward(center, 0.1)]
        exact = exact.tilt(center, 0.1)
    den = GMMDenoiser()
    return ProductOfExperts([GenerativeExpert(den, p1), GenerativeExpert(den, p2)]), exact, judges


def methods(budget: int, tilted: bool):
    """(name, options) at about ``budget`` model calls per particle; MCMC methods trade levels for steps."""
    k = 2
    levels = max(budget // (1 + k), 10)
    base = dict(proposal="summed", guard="off", step="ancestral")  # the baselines as defined: summed score, ancestral
    out = [
        ("naive", dict(steps=budget, particles_per_output=1, fk_correction="off", weighting="none", **base)),
        ("paper sketch", dict(steps=levels, fk_correction="off", weighting="paper", eta=0.0, mcmc="ula",
                              mcmc_steps=k, step_scale=0.05, selection="argmax", particles_per_output=8, **base)),
        ("MCMC only (MALA)", dict(steps=levels, particles_per_output=1, fk_correction="off", weighting="none",
                                  mcmc_steps=k, **base)),
        ("FK-SMC, engine defaults", dict(steps=budget)),
        ("FK-SMC ULA", dict(steps=levels, fk_correction="full", mcmc="ula", mcmc_steps=k, step_scale=0.05)),
        ("FK-SMC MALA", dict(steps=levels, fk_correction="full", mcmc="mala", mcmc_steps=k)),
    ]
    if tilted:
        out.insert(1, ("best-of-8", dict(steps=budget, particles_per_output=8, fk_correction="off",
                                          weighting="none", selection="argmax", **base)))
    return out


def run_method(model, exact, judges, dim, n, opts, seed=0):
    opts = dict(opts)
    steps = opts.pop("steps")
    per_output = opts.pop("particles_per_output", None)
    sigmas = karras_sigmas(steps, 0.002, 80.0)
    rep = SMCReport()
    t0 = time.perf_counter()
    if per_output:  # independent runs, one output each (batch items = outputs)
        x = torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 80.0
        opts.setdefault("selection", "all" if per_output == 1 else "argmax")
        out = sample_poe_smc(model, x, sigmas, particles=per_output, judges=judges, seed=seed, report=rep, **opts)
        weights = None
    else:  # one population of n particles (weighted set)
        x = torch.randn(1, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 80.0
        out = sample_poe_smc(model, x, sigmas, particles=n, judges=judges, selection="all", seed=seed, report=rep, **opts)
        weights = normalized_log_weights(rep.final_log_weights)[:, 0].exp()
    wall = time.perf_counter() - t0
    ref = exact.sample(n, torch.Generator().manual_seed(99))
    sw = sliced_wasserstein(out, ref, weights_a=weights)
    if weights is not None:  # mode error of the weighted set: resample it once
        idx = torch.multinomial(weights, n, replacement=True, generator=torch.Generator().manual_seed(7))
        mode_err = mode_weight_error(out[idx], exact)
    else:
        mode_err = mode_weight_error(out, exact)
    evals = rep.particle_evals / out.shape[0] if per_output else rep.model_calls_per_particle
    ess = float(rep.ess[-1].mean()) / (per_output or n)
    return sw, mode_err, evals, ess, wall


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m comfy_poe.benchmarks.gmm", description=plain_help(__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--particles", type=positive_int, default=2000, help="particles (= output samples) per method")
    ap.add_argument("--budgets", type=positive_int, nargs="+", default=[60, 150, 300], help="model calls per particle")
    ap.add_argument("--quick", action="store_true", help="one 2-D problem, one budget")
    ap.add_argument("--dims", type=positive_int, nargs="+", default=[2, 8], help="problem dimensions (2 and/or 8)")
    ap.add_argument("--methods", nargs="+", default=None, help="only these method names (default: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    cases = [c for c in [(2, 0, False), (2, 0, True), (8, 1, False), (8, 1, True)] if c[0] in args.dims]
    budgets = args.budgets
    if args.quick:
        cases, budgets = [(2, 0, False)], [budgets[0]]
    n = args.particles
    print(f"| problem | method | calls/particle | evals/output | SW2 / floor | mode-weight error | final ESS/L | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for dim, seed, tilt in cases:
        model, exact, judges = problem(dim, seed, tilt)
        name = f"{dim}-D {'tilted ' if tilt else ''}product"
        floor = noise_floor(exact, n)
        print(f"| {name} | exact vs exact (noise floor) | – | – | 1.00 | {mode_weight_error(exact.sample(n, torch.Generator().manual_seed(5)), exact):.3f} | – | – |")
        for budget in budgets:
            for label, opts in methods(budget, tilt):
                if args.methods and label not in args.methods:
                    continue
                sw, me, evals, ess, wall = run_method(model, exact, judges, dim, n, opts)
                print(f"| {name} | {label} | {budget} | {evals:.0f} | {sw / floor:.2f} | {me:.3f} | {ess:.2f} | {wall:.1f} |", flush=True)


if __name__ == "__main__":
    main()
