"""Benchmark on real data: the digits demo's table over several seeds, with standard errors.

    python -m comfy_poe.benchmarks.digits [--seeds 5] [--samples 100] [--budget 60] [--population 10]
        [--attribute-weight 2] [--fk-tempering capped|constant] [--model unet|mlp] [--quick]

Same tasks, methods and equal budgets as ``python -m comfy_poe demo`` (see comfy_poe.digits.demo):
every method gets ``--budget`` product-model evaluations per output sample. For each task × method the
table reports mean ± standard error over seeds of: fraction on target (evaluator), task 1's 6-share among
{6, 8} and class total variation to the exact class distribution, Fréchet distance of evaluator features against real held-out digits, plus evaluations per output
and wall time. The MLP denoiser (``--model mlp``) is ~20× faster for wide sweeps but is a weaker model.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from ..cli import plain_help, positive_float, positive_int
from ..digits import load_denoiser, load_evaluator
from ..digits.demo import (
    ATTRIBUTE_WEIGHT, METHODS, POPULATION, TASK_TITLES, TASKS, check_demo_args, item_labels, judge_samples, output_labels, real_features, reference_samples, run_method,
)


def mean_se(values) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    if len(values) == 1:
        return values[0], float("nan")
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def fmt(values, pct: bool = False, digits: int = 2) -> str:
    m, se = mean_se(values)
    if math.isnan(m):
        return "–"
    if pct:
        return f"{m:.1%}" + ("" if math.isnan(se) else f" ± {se:.1%}")
    return f"{m:.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")


def main(argv=None):
    from ..extras import exit_unless_installed

    exit_unless_installed("digits", "The digits benchmark")
    ap = argparse.ArgumentParser(prog="python -m comfy_poe.benchmarks.digits", description=plain_help(__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=positive_int, default=5, help="independent seeds (0..seeds-1)")
    ap.add_argument("--samples", type=positive_int, default=100, help="output samples per method and seed")
    ap.add_argument("--budget", type=positive_int, default=60, help="product-model evaluations per output sample")
    ap.add_argument("--population", type=positive_int, default=POPULATION, help="FK-SMC particles per population")
    ap.add_argument("--attribute-weight", type=positive_float, default=ATTRIBUTE_WEIGHT, help="task 1: weight of each attribute expert")
    ap.add_argument("--fk-tempering", choices=("capped", "constant"), default="capped",
                    help="FK-SMC's judge tempering (constant: the attribute weight at every level, the ablation)")
    ap.add_argument("--model", choices=("unet", "mlp"), default="unet")
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    ap.add_argument("--methods", nargs="+", choices=METHODS + ("reference",), default=list(METHODS) + ["reference"])
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--quick", action="store_true", help="2 seeds, 40 samples, task 1 only")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.samples, args.tasks = 2, 40, ["attributes"]
    try:  # the demo's checks (population tiling, minimum budget, ...) before any model loads
        check_demo_args(None, args.samples, args.budget, args.population, args.tasks,
                        [m for m in args.methods if m != "reference"], args.model, args.attribute_weight)
    except ValueError as e:
        ap.error(str(e))
    torch.set_num_threads(args.threads)
    denoiser = load_denoiser(model=args.model)
    evaluator = load_evaluator()
    real = real_features(evaluator)
    print(f"{args.seeds} seeds × {args.samples} samples, budget {args.budget} product evaluations per output, "
          f"model {args.model}, FK-SMC population {args.population}, task 1 attribute weight {args.attribute_weight:g}, "
          f"FK-SMC tempering {args.fk_tempering}\n")
    print("| task | method | on target | 6-share among {6,8} | class TV | FD vs real | evals/output | wall s (per seed) |")
    print("|---|---|---|---|---|---|---|---|")
    for task in args.tasks:
        for method in args.methods:
            on, share, tv, fd, evals, wall = [], [], [], [], [], []
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                if method == "reference":
                    res = reference_samples(task, args.samples, seed, denoiser)
                    labels = item_labels(task, args.samples, args.samples)
                else:
                    res = run_method(task, method, args.samples, args.budget, seed, denoiser, denoiser.classifier,
                                     population=args.population, attribute_weight=args.attribute_weight,
                                     fk_tempering=args.fk_tempering)
                    labels = output_labels(task, method, args.samples, args.population)
                score = judge_samples(task, res.samples, labels, evaluator, real)
                on.append(score.on_target)
                share.append(score.share_six)
                tv.append(score.class_tv)
                fd.append(score.fd)
                evals.append(res.evals_per_output)
                wall.append(time.perf_counter() - t0)
            print(f"| {TASK_TITLES[task]} | {method} | {fmt(on, pct=True)} | {fmt(share)} | {fmt(tv)} | {fmt(fd, digits=1)} | "
                  f"{statistics.fmean(evals):.0f} | {statistics.fmean(wall):.1f} |", flush=True)


if __name__ == "__main__":
    main()
