"""Issue 15 point 4: FK-SMC at the engine's and the nodes' default options on the README's 2-D / 8-D products.

    python -m comfy_poe.benchmarks.smc_defaults [--levels 100,60] [--particles 4000]

Sliced W2 of the weighted population / exact-vs-exact noise floor, two sampler seeds per cell (the problems
of benchmarks/gmm.py and tests/test_smc.py). Methods: engine default (no options, no MCMC), node default
(mcmc_steps=1, MALA), old default (summed proposal, no guard, no MCMC).
"""
from __future__ import annotations

import argparse

import torch

from ..samplers import SMCReport, normalized_log_weights, sample_poe_smc
from ..samplers.metrics import noise_floor, sliced_wasserstein
from ..samplers.schedules import karras_sigmas
from .gmm import problem

METHODS = {"engine default": {}, "node default": dict(mcmc_steps=1), "old default": dict(proposal="summed", guard="off")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="100,60")
    ap.add_argument("--particles", type=int, default=4000)
    ap.add_argument("--seeds", default="0,1")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    n = args.particles
    print("| levels | problem | " + " | ".join(METHODS) + " |")
    print("|---|---|" + "---|" * len(METHODS))
    for levels in [int(v) for v in args.levels.split(",")]:
        for dim, ps in ((2, 0), (8, 1)):
            for tilt in (False, True):
                model, exact, judges = problem(dim, ps, tilt)
                ref = exact.sample(n, torch.Generator().manual_seed(99))
                floor = noise_floor(exact, n)
                cells = []
                for opts in METHODS.values():
                    ratios = []
                    for seed in [int(v) for v in args.seeds.split(",")]:
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
