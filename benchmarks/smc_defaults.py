"""Issue 15 point 4: FK-SMC at the engine's and the nodes' default options on the README's 2-D / 8-D products.

    python -m comfy_poe.benchmarks.smc_defaults [--levels 100,60] [--particles 4000] [--seeds 0,1,2,3]
        [--methods "engine default,node default,old default"]

Sliced W2 of the weighted population / exact-vs-exact noise floor, one cell per sampler seed (the problems
of benchmarks/gmm.py and tests/test_smc.py). Methods (``--methods``, comma-separated names of METHODS):
engine default (no options: no MCMC), node default (mcmc_steps=1, MALA), old default (summed proposal, no
guard, ancestral step, no MCMC), the same with the step spelled out (``… ancestral`` / ``… 2m``), and
"exact samples": i.i.d. exact draws of the same size against the same reference, the metric's own spread.
"""
from __future__ import annotations

import argparse

import torch

from ..samplers import SMCReport, normalized_log_weights, sample_poe_smc
from ..samplers.metrics import noise_floor, sliced_wasserstein
from ..samplers.schedules import karras_sigmas
from .gmm import problem

METHODS = {
    "engine default": {},
    "node default": dict(mcmc_steps=1),
    "old default": dict(proposal="summed", guard="off", step="ancestral"),
    "engine ancestral": dict(step="ancestral"),
    "engine 2m": dict(step="dpmpp_2m_sde"),
    "node ancestral": dict(mcmc_steps=1, step="ancestral"),
    "node 2m": dict(mcmc_steps=1, step="dpmpp_2m_sde"),
    "node 2m, 2 MALA": dict(mcmc_steps=2, step="dpmpp_2m_sde"),
    # i.i.d. exact samples of the same size (seed 1000 + sampler seed) scored the same way: the metric's own spread
    "exact samples": None,
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="100,60")
    ap.add_argument("--particles", type=int, default=4000)
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--methods", default="engine default,node default,old default")
    ap.add_argument("--dims", default="2,8", help="which problems: 2 (2-D, problem seed 0) and/or 8 (8-D, seed 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    n = args.particles
    names = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    print("| levels | problem | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for levels in [int(v) for v in args.levels.split(",")]:
        for dim, ps in [(d, {2: 0, 8: 1}[d]) for d in (int(v) for v in args.dims.split(","))]:
            for tilt in (False, True):
                model, exact, judges = problem(dim, ps, tilt)
                ref = exact.sample(n, torch.Generator().manual_seed(99))
                floor = noise_floor(exact, n)
                cells = []
                for opts in (METHODS[m] for m in names):
                    ratios = []
                    for seed in [int(v) for v in args.seeds.split(",")]:
                        if opts is None:
                            out = exact.sample(n, torch.Generator().manual_seed(1000 + seed))
                            ratios.append(sliced_wasserstein(out, ref) / floor)
                            continue
                        x = torch.randn(1, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 80.0
                        rep = SMCReport()
                        out = sample_poe_smc(model, x, karras_sigmas(levels, 0.002, 80.0), particles=n, judges=judges,
                                             selection="all", seed=seed, report=rep, **opts)
                        w = normalized_log_weights(rep.final_log_weights)[:, 0].exp()
                        ratios.append(sliced_wasserstein(out, ref, weights_a=w) / floor)
                    cells.append(" / ".join(f"{r:.2f}" for r in ratios))
                print(f"| {levels} | {dim}-D {'tilted' if tilt else 'product'} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
