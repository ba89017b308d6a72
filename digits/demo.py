"""The digits demo: three composition tasks with known answers, every method at equal model-evaluation budgets.

    python -m comfy_poe demo [--out DIR] [--samples N] [--budget E] [--seed S] [--quick]

Tasks (engine experts on the embedded digits UNet, reference digits_benchmark.md):
  1. attributes — attribute product with a known answer: unconditional model × an "even" expert × a "≥ 5" expert,
                  p(x) · p(even | x)^γ · p(≥5 | x)^γ with γ = 2 (:data:`ATTRIBUTE_WEIGHT`), puts its mass on {6, 8}
                  with the 6-vs-8 share of the data; at γ > 1 naive composition overweights the 6s.
  2. class      — class by product: unconditional model × noise-aware guidance classifier p(c | x_σ) (weight 1),
                  classes round-robin over the batch items.
  3. regions    — regional composition on an 8×12 canvas: two 8×8 windows sharing 4 columns (0–7 and 4–11),
                  each window's expert asking for its own class (pairs (k, k+5 mod 10), round-robin).

Methods (all through :func:`comfy_poe.samplers.sample_poe_smc`, so they share every line of the integrator):
  naive          score-sum composition (Du et al. 2023), one ancestral pass per output; in tasks 1 and 2 this
                 is plain classifier guidance (the experts' gradients added to the drift, no weights)
  best-of-N      N naive passes per output, keep the one the reward (guidance classifier on x̂0) likes most
  paper sketch   Zhang et al. 2025 Algorithm 1 (PRESETS["paper"]): Euler init kernel, ULA, resample on the
                 current reward every level, output the argmax — L particles per output
  MCMC only      naive + MALA steps per level, no weights (in tasks 1 and 2 the MALA target includes the classifier)
  FK-SMC ULA/MALA  Feynman-Kac corrector weights + ESS-triggered systematic resampling + ULA / MALA steps;
                 one population of P particles per batch item, all particles returned (resampled by their
                 final weights). In tasks 1 and 2 the noisy classifier is the twist (twisted SMC, Wu et al. 2023),
                 with "capped" tempering: the attribute experts enter the intermediate targets at weight 1 and
                 the final one at γ (see :func:`comfy_poe.samplers.smc.intermediate_judges`).
  reference      the conditional model sampled directly (Heun, 30 steps) — what a perfect composition
                 would look like (task 3: the two windows sampled independently, without overlap)

Equal budgets: every method gets the same number E of *product-model evaluations per output sample*
(``SMCReport.particle_evals / outputs``): one evaluation = every expert's prediction for one particle at one
noise level (tasks 1 and 2: one UNet row; task 3: two 8×8 UNet rows). Reward / judge evaluations (the guidance classifier on x̂0 or x_σ; a forward
and, for gradients, a backward pass of a 134k-parameter CNN — cheap next to the 1.2M-parameter UNet) are
counted separately in the table. Methods with MCMC trade noise levels for MCMC steps at the same E.

Judging: the separately trained evaluator (never a reward). "On target" = evaluator class in the target set
(task 3: both windows right); FD = Fréchet distance of evaluator features against real held-out test digits
of the target classes; task 1's mode balance = share of 6s among samples in {6, 8} against the product's
true share (:func:`true_share_of_six`: the data share; an importance-sampling check over 4,000 unconditional
samples gives 0.506 ± 0.017 for the γ = 2 product).
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..fileio import atomic_write, atomic_write_text, check_output_dir
from ..experts import DiscriminativeExpert, GenerativeExpert, ProductOfExperts
from ..samplers import PRESETS, SMCReport, sample_best_of_n, sample_naive_composition, sample_poe_smc
from . import figures
from . import classifier_log_prob, load_classifier, load_denoiser, load_evaluator, real_digits
from .data import load_split
from .models import SIGMA_MAX, SIGMA_MIN
from .sampling import frechet_distance, karras_sigmas, sample_heun

EVEN = frozenset({0, 2, 4, 6, 8})
AT_LEAST_5 = frozenset({5, 6, 7, 8, 9})
PRODUCT_SET = (6, 8)
CANVAS_WIDTH = 12  # two 8-wide windows sharing 4 columns
RIGHT_START = CANVAS_WIDTH - 8
TASKS = ("attributes", "class", "regions")
TASK_TITLES = {
    "attributes": "1. even AND ≥5 → {6, 8}",
    "class": "2. unconditional × classifier",
    "regions": "3. overlapping windows",
}
# Task 1's experts are discriminative: the noise-aware classifier's p(even | x_σ) and p(≥5 | x_σ), each at weight γ,
# multiplied with the unconditional model. On clean digits the classifier is nearly certain, so the product is
# p(x | {6, 8}) with the data's 6-share; at γ = 2 naive guidance puts 0.64 of its {6, 8} samples on 6s (6 seeds).
# (The first version used generative attribute experts, classifier-weighted mixtures of the class-conditional UNet,
# with the all-classes mixture at weight −1: its Feynman-Kac weights integrate the disagreement between classifier
# and UNet over 64 pixels and every level, and at γ > 1 every population collapsed onto one lineage, ESS 1.)
ATTRIBUTE_WEIGHT = 2.0
# FK-SMC particles per population: populations of 10 balance modes better than 20 at the same budget (the
# particles of one population share a few ancestors, so fewer, larger populations move the share in blocks)
POPULATION = 10
METHODS = ("naive", "best-of-N", "paper sketch", "MCMC only", "FK-SMC ULA", "FK-SMC MALA")


# --------------------------------------------------------------------------------------------------
# pure helpers


def item_of_rows(n_rows: int, n_items: int) -> torch.Tensor:
    """Batch item of each row in the sampler's particle-major layout (row l·B + b belongs to item b)."""
    if n_rows % n_items:
        raise ValueError(f"{n_rows} rows do not tile {n_items} batch items")
    return torch.arange(n_rows) % n_items


@dataclass(frozen=True)
class PerItem:
    """A conditioning that differs per batch item: ``labels[b]`` for item b, whatever the particle count."""

    labels: torch.Tensor  # (B,) int64

    def rows(self, n_rows: int) -> torch.Tensor:
        return self.labels[item_of_rows(n_rows, len(self.labels))]


def window_mask(start: int, width: int = CANVAS_WIDTH, size: int = 8) -> torch.Tensor:
    """(1, 8, width) 0/1 mask of an 8-wide window starting at column ``start``."""
    if start < 0 or start + size > width:
        raise ValueError(f"a window starting at column {start} does not fit a canvas {width} wide")
    mask = torch.zeros(1, size, width)
    mask[..., start:start + size] = 1.0
    return mask


def region_pairs(n_items: int) -> torch.Tensor:
    """(B, 2) classes (left, right) asked by item b: (k, k + 5 mod 10) with k = b mod 10."""
    k = torch.arange(n_items) % 10
    return torch.stack([k, (k + 5) % 10], dim=1)


@functools.lru_cache(maxsize=None)  # read once: every task-1 judgement needs the exact share
def class_counts(split: str = "train") -> torch.Tensor:
    """Digits per class in a split (the class prior the classifier and the attribute experts carry)."""
    _, labels = load_split(split)
    return torch.bincount(labels, minlength=10).double()


def true_share_of_six(counts: Optional[torch.Tensor] = None) -> float:
    """Task 1's exact 6-share among {6, 8}: π_6 / (π_6 + π_8) with π the training class prior, which the
    attribute experts carry (their mixture weights are the classifier's posterior)."""
    counts = class_counts("train") if counts is None else counts
    return float(counts[6] / (counts[6] + counts[8]))


# --------------------------------------------------------------------------------------------------
# engine models


class WindowedDigits:
    """An engine denoiser on an 8×W canvas whose conditionings are (column, class) windows.

    ``denoise(x, sigma, conds)`` with each cond a ``(start, classes)`` pair: crop columns start..start+7,
    run the 8×8 digits model there (``classes``: an int, None, or a :class:`PerItem`), and put the
    prediction back; outside the window the prediction is x itself (zero score). That filler is never
    used by a product as long as the expert's mask is zero outside its window, but it must be finite.
    All windows of one call go through ONE batched UNet forward.
    """

    parameterization = "eps"

    def __init__(self, denoiser):
        self.denoiser = denoiser

    def denoise(self, x: torch.Tensor, sigma, conds) -> list:
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(n) if torch.as_tensor(sigma).ndim == 0 else sigma
        crops, labels = [], []
        for start, classes in conds:
            if x.shape[-1] < start + 8:
                raise ValueError(f"window at column {start} does not fit latents of width {x.shape[-1]}")
            crops.append(x[..., start:start + 8])
            if isinstance(classes, PerItem):
                labels.append(classes.rows(n))
            else:
                labels.append(torch.full((n,), 10 if classes is None else int(classes), dtype=torch.int64))
        pred = self.denoiser.denoise(torch.cat(crops), sigma.repeat(len(conds)), [torch.cat(labels)])[0]
        out = []
        for k, (start, _) in enumerate(conds):
            full = x.clone()
            full[..., start:start + 8] = pred[k * n:(k + 1) * n]
            out.append(full)
        return out


def per_item_log_prob(labels: torch.Tensor, classifier) -> Callable:
    """Noise-aware potential (x_σ, σ) -> log p(labels[item] | x_σ) in the particle-major layout."""

    def fn(x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32).clamp_min(SIGMA_MIN)  # σ = 0 at the final level
        log_p = classifier.log_probs(x, sigma)
        return log_p.gather(1, PerItem(labels).rows(x.shape[0])[:, None])[:, 0]

    return fn


def clean_judge(fn: Callable, name: str, weight: float = 1.0) -> DiscriminativeExpert:
    """A reward on x̂0 (the paper's discriminative expert): the noise-aware classifier told σ = σ_min."""

    def on_x0(x0: torch.Tensor) -> torch.Tensor:
        return fn(x0, torch.full((x0.shape[0],), SIGMA_MIN))

    return DiscriminativeExpert(fn=on_x0, weight=weight, differentiable=True, name=name)


@dataclass
class Task:
    """One composition problem: the product model, its rewards and how to judge samples."""

    key: str
    model: object
    shape: tuple  # one latent (C, H, W)
    reward: list  # judges on x̂0 for best-of-N and the paper sketch
    smc_judges: list = field(default_factory=list)  # judges of naive / MCMC / FK-SMC (tasks 1, 2: the noisy twist)
    twist: bool = False
    labels: Optional[torch.Tensor] = None  # per-item classes (tasks 2, 3)


def build_task(key: str, denoiser, classifier, attribute_weight: float = ATTRIBUTE_WEIGHT) -> Task:
    """The product of experts of a task (its per-item classes are attached by :func:`set_items`)."""
    if key == "attributes":
        model = ProductOfExperts([GenerativeExpert(denoiser, None, name="unconditional")])
        experts = {"even": classifier_log_prob(EVEN, classifier), "≥5": classifier_log_prob(AT_LEAST_5, classifier)}
        noisy = [DiscriminativeExpert(fn=fn, weight=attribute_weight, noisy=True, differentiable=True,
                                      name=f"p({name} | x_σ)") for name, fn in experts.items()]
        reward = [clean_judge(fn, f"p({name} | x̂0)", attribute_weight) for name, fn in experts.items()]
        return Task(key, model, (1, 8, 8), reward, smc_judges=noisy, twist=True)
    if key == "class":
        model = ProductOfExperts([GenerativeExpert(denoiser, None, name="unconditional")])
        return Task(key, model, (1, 8, 8), [], twist=True)
    if key == "regions":
        return Task(key, None, (1, 8, CANVAS_WIDTH), [])
    raise ValueError(f"task must be one of {TASKS}, got {key!r}")


def set_items(task: Task, n_items: int, denoiser, classifier) -> Task:
    """Attach per-item target classes for a run with ``n_items`` batch items (tasks 2 and 3)."""
    if task.key == "class":
        labels = torch.arange(n_items) % 10
        noisy = per_item_log_prob(labels, classifier)
        task.labels = labels
        task.smc_judges = [DiscriminativeExpert(fn=noisy, noisy=True, differentiable=True, name="p(c | x_σ)")]
        task.reward = [clean_judge(noisy, "p(c | x̂0)")]
    elif task.key == "regions":
        pairs = region_pairs(n_items)
        task.labels = pairs
        windowed = WindowedDigits(denoiser)
        task.model = ProductOfExperts([
            GenerativeExpert(windowed, (0, PerItem(pairs[:, 0])), mask=window_mask(0), name="left"),
            GenerativeExpert(windowed, (RIGHT_START, PerItem(pairs[:, 1])), mask=window_mask(RIGHT_START), name="right"),
        ])
        left, right = per_item_log_prob(pairs[:, 0], classifier), per_item_log_prob(pairs[:, 1], classifier)

        def both(x, sigma):
            return left(x[..., :8], sigma) + right(x[..., RIGHT_START:], sigma)

        task.reward = [clean_judge(both, "p(a | left) p(b | right)")]
    return task


# --------------------------------------------------------------------------------------------------
# methods at an equal budget


@dataclass
class MethodConfig:
    levels: int
    particles: int = 1  # per batch item
    population: bool = False  # one population of P particles per item, all returned
    mcmc_steps: int = 0
    options: dict = field(default_factory=dict)


def method_config(method: str, budget: int, best_of: int = 4, paper_particles: int = 2, mcmc_steps: int = 1,
                  population: int = POPULATION, fk_tempering: str = "capped") -> MethodConfig:
    """Noise levels and particles so that every method spends ``budget`` product evaluations per output.

    One evaluation per particle and level plus one per MCMC step: naive uses E levels, best-of-N E/N,
    the paper sketch E/(L·(1+K)) with L = 2 particles and K = 1 ULA step, MCMC-only and FK-SMC E/(1+K)
    with K = 1 (FK-SMC weights degenerate below ~30 levels on these 64-dimensional digits). FK-SMC returns all P
    particles of a population, so it pays E per output like naive. ``fk_tempering``: FK-SMC's judge tempering
    ("capped", or "constant" for the ablation in docs/demo.md).
    """
    def levels(n):
        return max(int(n), 3)

    if method == "naive":
        return MethodConfig(levels(budget))
    if method == "best-of-N":
        return MethodConfig(levels(budget / best_of), particles=best_of)
    if method == "paper sketch":
        return MethodConfig(levels(budget / (paper_particles * 2)), particles=paper_particles, mcmc_steps=1,
                            options=dict(PRESETS["paper"], step_scale=0.05))
    if method == "MCMC only":
        return MethodConfig(levels(budget / (1 + mcmc_steps)), mcmc_steps=mcmc_steps,
                            options=dict(fk_correction="off", mcmc="mala", tempering="constant", **SUMMED))
    if method in ("FK-SMC ULA", "FK-SMC MALA"):
        kind = "ula" if method.endswith("ULA") else "mala"
        return MethodConfig(levels(budget / (1 + mcmc_steps)), particles=population, population=True,
                            mcmc_steps=mcmc_steps,
                            options=dict(fk_correction="full", weighting="incremental", eta=1.0, mcmc=kind,
                                         step_scale=0.05 if kind == "ula" else 0.1, tempering=fk_tempering, **SUMMED))
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


# The demo's measured tables (README) predate the Λ-aware default proposal and the second-order step
# (issue 15): they keep the summed-score ancestral sampler they were measured with.
SUMMED = dict(proposal="summed", guard="off", step="ancestral")


@dataclass
class RunResult:
    samples: torch.Tensor
    evals_per_output: float
    judge_evals_per_output: float
    unet_rows_per_output: float
    wall: float
    report: Optional[SMCReport] = None


def run_method(task_key: str, method: str, n: int, budget: int, seed: int, denoiser, classifier,
               population: int = POPULATION, attribute_weight: float = ATTRIBUTE_WEIGHT,
               callback: Optional[Callable[[dict], None]] = None, **config_kw) -> RunResult:
    """Draw ``n`` outputs of a task with one method at ``budget`` product evaluations per output
    (``callback``: the sampler's per-level callback, e.g. a progress bar)."""
    cfg = method_config(method, budget, population=population, **config_kw)
    n_items = n // cfg.particles if cfg.population else n
    if cfg.population and n % cfg.particles:
        raise ValueError(f"samples ({n}) must be a multiple of the population size ({cfg.particles})")
    task = set_items(build_task(task_key, denoiser, classifier, attribute_weight), n_items, denoiser, classifier)
    sigmas = karras_sigmas(cfg.levels, SIGMA_MIN, SIGMA_MAX).double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n_items,) + task.shape, generator=gen) * SIGMA_MAX
    report = SMCReport()
    rows0 = denoiser.n_evals
    t0 = time.perf_counter()
    with torch.no_grad():
        if method == "naive":
            out = sample_naive_composition(task.model, x, sigmas, judges=task.smc_judges, twist=task.twist,
                                           seed=seed, report=report, callback=callback)
        elif method == "best-of-N":
            out = sample_best_of_n(task.model, x, sigmas, n=cfg.particles, judges=task.reward, seed=seed, report=report,
                                   callback=callback)
        elif method == "paper sketch":
            out = sample_poe_smc(task.model, x, sigmas, particles=cfg.particles, judges=task.reward,
                                 mcmc_steps=cfg.mcmc_steps, seed=seed, report=report, callback=callback, **cfg.options)
        elif method == "MCMC only":
            # one particle: "incremental" weighting only makes the MALA target include the judges (task 2)
            out = sample_poe_smc(task.model, x, sigmas, particles=1, judges=task.smc_judges, twist=task.twist,
                                 mcmc_steps=cfg.mcmc_steps, selection="all", weighting="incremental",
                                 seed=seed, report=report, callback=callback, **cfg.options)
        else:
            out = sample_poe_smc(task.model, x, sigmas, particles=cfg.particles, judges=task.smc_judges,
                                 twist=task.twist, mcmc_steps=cfg.mcmc_steps, selection="resample",
                                 seed=seed, report=report, callback=callback, **cfg.options)
    wall = time.perf_counter() - t0
    out = out.clamp(-1.0, 1.0)
    return RunResult(out, report.particle_evals / n, report.judge_evals / n, (denoiser.n_evals - rows0) / n,
                     wall, report)


def item_labels(task_key: str, n_items: int, n: int) -> Optional[torch.Tensor]:
    """Target classes of the n outputs of a run with n_items batch items (item-major outputs)."""
    if task_key == "class":
        labels = torch.arange(n_items) % 10
    elif task_key == "regions":
        labels = region_pairs(n_items)
    else:
        return None
    return labels.repeat_interleave(n // n_items, dim=0)


def output_labels(task_key: str, method: str, n: int, population: int = POPULATION) -> Optional[torch.Tensor]:
    cfg = method_config(method, 30, population=population)
    return item_labels(task_key, n // cfg.particles if cfg.population else n, n)


@torch.no_grad()
def reference_samples(task_key: str, n: int, seed: int, denoiser, steps: int = 30) -> RunResult:
    """Sample the conditional model directly (Heun): {6, 8}; class c; each window's class on its own."""
    rows0 = denoiser.n_evals
    t0 = time.perf_counter()
    sigmas = karras_sigmas(steps)
    gen = torch.Generator().manual_seed(seed)

    def heun(cond):
        x = torch.randn((n, 1, 8, 8), generator=gen) * sigmas[0]
        return sample_heun(lambda x_, s_: denoiser.denoise(x_, s_, [cond])[0], x, sigmas)

    if task_key == "attributes":
        out = heun(set(PRODUCT_SET))
    elif task_key == "class":
        out = heun(item_labels("class", n, n))
    else:
        pairs = item_labels("regions", n, n)
        left, right = heun(pairs[:, 0]), heun(pairs[:, 1])
        # shown side by side with the 4 overlapping columns averaged (judged per window, uncropped)
        out = torch.zeros(n, 1, 8, CANVAS_WIDTH)
        out[..., :8] += left
        out[..., RIGHT_START:] += right
        out[..., RIGHT_START:8] /= 2
        out = (out, left, right)
    wall = time.perf_counter() - t0
    calls = 2 * steps - 1
    return RunResult(out, calls, 0.0, (denoiser.n_evals - rows0) / n, wall)


# --------------------------------------------------------------------------------------------------
# judging


@dataclass
class Scores:
    on_target: float
    share_six: Optional[float] = None  # task 1
    fd: float = float("nan")
    class_tv: Optional[float] = None  # task 1: total variation to the exact class distribution
    judged: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)  # evaluator class per sample
    # (task 3: (N, 2) classes of the left and right window)


def class_total_variation(pred: torch.Tensor, true_share: float) -> float:
    """½ Σ_c |p̂_c − p_c| between the evaluator's class histogram and task 1's exact class distribution
    (6: true_share, 8: 1 − true_share, every other class 0): mass on wrong classes plus the 6-vs-8 imbalance."""
    hist = torch.bincount(pred, minlength=10).double() / len(pred)
    exact = torch.zeros(10, dtype=torch.float64)
    exact[6], exact[8] = true_share, 1.0 - true_share
    return 0.5 * float((hist - exact).abs().sum())


@torch.no_grad()
def judge_samples(task_key: str, samples, labels: Optional[torch.Tensor], evaluator, real: dict,
                  true_share: Optional[float] = None) -> Scores:
    """Evaluator verdicts: fraction on target, 6-share among {6, 8} and class total variation (task 1; the exact
    share defaults to :func:`true_share_of_six`), FD against real target digits."""
    if task_key == "regions":
        # the reference row comes as (canvas, left, right): its windows were sampled separately
        left, right = samples[1:] if isinstance(samples, tuple) else (samples[..., :8], samples[..., RIGHT_START:])
        judged = torch.stack([evaluator.log_probs(left).argmax(1), evaluator.log_probs(right).argmax(1)], dim=1)
        ok = (judged == labels).all(dim=1)
        fd = 0.5 * (frechet_distance(evaluator.features(left), real["all"])
                    + frechet_distance(evaluator.features(right), real["all"]))
        return Scores(float(ok.double().mean()), None, fd, judged=judged)
    pred = evaluator.log_probs(samples).argmax(1)
    if task_key == "attributes":
        six, eight = int((pred == 6).sum()), int((pred == 8).sum())
        share = six / (six + eight) if six + eight else float("nan")
        fd = frechet_distance(evaluator.features(samples), real["68"])
        tv = class_total_variation(pred, true_share_of_six() if true_share is None else true_share)
        return Scores((six + eight) / len(pred), share, fd, tv, judged=pred)
    ok = pred == labels
    return Scores(float(ok.double().mean()), None, frechet_distance(evaluator.features(samples), real["all"]), judged=pred)


def real_features(evaluator) -> dict:
    with torch.no_grad():
        return {"68": evaluator.features(real_digits("test", classes=PRODUCT_SET)),
                "all": evaluator.features(real_digits("test"))}


# --------------------------------------------------------------------------------------------------
# output: grids and the table


def save_image(image, path: Path) -> Path:
    """Write a PIL image as PNG atomically (temp file + os.replace)."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", optimize=True))


def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text.lower()).strip("_").replace("__", "_")


# ASCII titles for the figures (Pillow's embedded font has no ≥ × →)
FIGURE_TITLES = {
    "attributes": "Task 1: unconditional x p(even)^g x p(>=5)^g -> digits 6 and 8",
    "class": "Task 2: unconditional x classifier p(c | x) -> digit c",
    "regions": "Task 3: two overlapping 8x8 windows on an 8x12 canvas, digits (a, b)",
}
# What a correct cell looks like, per task (index.md and the figures' last title line)
CELL_GUIDE = {
    "attributes": "label = judged class; correct = a 6 or an 8 (green), about half of them 6s; cells sorted by judged class",
    "class": "label = target/judged class, green when they agree; cells sorted by target (defaults: row r = digit r)",
    "regions": "label = target ab/judged left,right; correct = left window shows a AND right window shows b",
}


def grid_cells(task_key: str, score: Scores, labels: Optional[torch.Tensor], limit: int = 100):
    """(order, labels, ok) of a grid: which samples in which cell, the label under each, on target or not.
    Same rule for every method: tasks 2, 3 sorted by target, task 1 by judged class (6, 8, then the rest)."""
    judged = score.judged
    if task_key == "attributes":
        rank = {6: 0, 8: 1}
        key = [rank.get(int(c), 2 + int(c)) for c in judged]
        order = figures.display_order(key, limit)
        return order, [str(int(judged[i])) for i in order], [int(judged[i]) in PRODUCT_SET for i in order]
    if task_key == "class":
        order = figures.display_order(labels.tolist(), limit)
        return (order, [f"{int(labels[i])}/{int(judged[i])}" for i in order],
                [bool(labels[i] == judged[i]) for i in order])
    order = figures.display_order((labels[:, 0] * 10 + labels[:, 1]).tolist(), limit)
    return (order, [f"{int(labels[i, 0])}{int(labels[i, 1])}/{int(judged[i, 0])},{int(judged[i, 1])}" for i in order],
            [bool((labels[i] == judged[i]).all()) for i in order])


def metric_line(task_key: str, score: Scores, res: RunResult, true_share: Optional[float]) -> str:
    """The key numbers of one run, in words (grid titles)."""
    if task_key == "attributes":
        share = "-" if score.share_six is None or math.isnan(score.share_six) else f"{score.share_six:.2f}"
        exact = "" if true_share is None else f" (exact {true_share:.2f})"
        head = f"in {{6, 8}}: {score.on_target:.0%}   6-share {share}{exact}   class TV {score.class_tv:.2f}"
    else:
        head = f"on target: {score.on_target:.0%}"
    return f"{head}   FD {score.fd:.1f}   {res.evals_per_output:.0f} model evals/sample"


def save_labelled_grid(task_key: str, method: str, shown: torch.Tensor, score: Scores, res: RunResult,
                       labels: Optional[torch.Tensor], true_share: Optional[float], path: Path) -> Path:
    order, cell_labels, ok = grid_cells(task_key, score, labels)
    title = [f"{FIGURE_TITLES[task_key]}  |  {method}", metric_line(task_key, score, res, true_share),
             CELL_GUIDE[task_key]]
    image = figures.labelled_grid(shown[order], cell_labels, ok, title)
    return save_image(image, path)


SUMMARY_NOTES = {
    "class": ["On target: the class a separately trained evaluator (never the reward) gives the sample is the "
              "class asked for.",
              "FD: Frechet distance of the evaluator's features to real test digits of the target classes; "
              "lower is closer to real digits (the reference row is the conditional model itself)."],
    "regions": ["On target: the left 8x8 window shows digit a and the right one digit b (they share 4 columns).",
                "The reference samples each window on its own, without the overlap: what a perfect composition "
                "would give."],
}


def summary_rows(results: dict, tasks, methods, true_share: Optional[float] = None) -> list[dict]:
    """Rows of the summary figure: per task, on target, FD and (task 1) 6-share error and class TV."""
    rows = []
    for task_key in tasks:
        got = {m: results[(task_key, m)] for m in methods if (task_key, m) in results}
        on = {m: sc.on_target for m, (sc, _) in got.items()}
        fd = {m: sc.fd for m, (sc, _) in got.items()}
        metrics = [("in {6, 8}" if task_key == "attributes" else "on target", "higher", on),
                   ("FD vs real digits", "lower", fd)]
        if task_key == "attributes":
            exact = true_share
            share_err = {m: (abs(sc.share_six - exact) if exact is not None and sc.share_six is not None
                             and not math.isnan(sc.share_six) else None) for m, (sc, _) in got.items()}
            metrics += [("6-share error", "lower", share_err), ("class TV", "lower", {m: sc.class_tv for m, (sc, _) in got.items()})]
        rows.append({"title": FIGURE_TITLES[task_key], "metrics": metrics, "notes": SUMMARY_NOTES.get(task_key, []),
                     "percent": {"in {6, 8}": True, "on target": True}})
    return rows


TABLE_HEADER = ("| task | method | on target | 6-share (err) | class TV | FD vs real | evals/output | judge evals/output "
                "| UNet rows/output | wall s |\n|---|---|---|---|---|---|---|---|---|---|")


def table_row(task_key: str, method: str, score: Scores, res: RunResult, true_share: Optional[float]) -> str:
    share = "–"
    if score.share_six is not None and true_share is not None and not math.isnan(score.share_six):
        share = f"{score.share_six:.2f} ({abs(score.share_six - true_share):.2f})"
    tv = "–" if score.class_tv is None else f"{score.class_tv:.2f}"
    return (f"| {TASK_TITLES[task_key]} | {method} | {score.on_target:.1%} | {share} | {tv} | {score.fd:.1f} | "
            f"{res.evals_per_output:.0f} | {res.judge_evals_per_output:.0f} | {res.unet_rows_per_output:.0f} | {res.wall:.1f} |")


MIN_BUDGET = 12  # every method needs >= 3 noise levels: best-of-4 and the paper sketch (2 particles x 2) pay 12


def check_demo_args(out_dir, samples: int, budget: int, population: int, tasks, methods, model: str,
                    attribute_weight: float, true_share: Optional[float] = None) -> None:
    """Refuse, before any model loads, every option the demo cannot run (ValueError saying what to change)."""
    for name, value in (("samples", samples), ("budget", budget), ("population", population)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name} must be a whole number >= 1, got {value!r}")
    if budget < MIN_BUDGET:
        raise ValueError(f"--budget {budget} is too small: every method needs at least 3 noise levels, "
                         f"so the equal budget must be >= {MIN_BUDGET} model evaluations per sample")
    if any(m.startswith("FK-SMC") for m in methods) and samples % population:
        lower = samples - samples % population
        use = f"{lower} or {lower + population}" if lower else f"{population} (or a multiple)"
        raise ValueError(f"--samples ({samples}) must be a multiple of the FK-SMC population size ({population}): "
                         f"use --samples {use}, or change --population")
    if bad := [t for t in tasks if t not in TASKS]:
        raise ValueError(f"unknown task {', '.join(map(str, bad))}; choose from {', '.join(TASKS)}")
    if not tasks:
        raise ValueError(f"no task given; choose from {', '.join(TASKS)}")
    if bad := [m for m in methods if m not in METHODS]:
        raise ValueError(f"unknown method {', '.join(map(str, bad))}; choose from {', '.join(METHODS)}")
    if model not in ("unet", "mlp"):
        raise ValueError(f"--model must be unet or mlp, got {model!r}")
    if not (isinstance(attribute_weight, (int, float)) and math.isfinite(attribute_weight) and attribute_weight > 0):
        raise ValueError(f"--attribute-weight must be a finite number > 0, got {attribute_weight!r}")
    if true_share is not None and not 0.0 < true_share < 1.0:
        raise ValueError(f"true_share must lie in (0, 1), got {true_share!r}")
    if out_dir is not None:
        check_output_dir(out_dir, "--out")


def total_evals(tasks, methods, samples: int, budget: int, population: int, reference_steps: int = 30) -> int:
    """Product-model evaluations per output of a whole demo run (the progress bar's total)."""
    per_method = 0
    for method in methods:
        cfg = method_config(method, budget, population=population)
        per_method += cfg.levels * (1 + cfg.mcmc_steps) * (1 if cfg.population else cfg.particles)
    return len(tasks) * (per_method + 2 * reference_steps - 1)


class Progress:
    """One tqdm bar over the whole demo, in product-model evaluations per output sample (every level of every
    method advances it by what that level costs); ``None`` bar = silent."""

    def __init__(self, total: int, enabled: bool = True):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="eval", desc="digits demo", dynamic_ncols=True)

    def stage(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    def advance(self, n: float) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, text: str, log: Callable[[str], None]) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            log(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def index_markdown(tasks, sections: list[str], table: str, notes: list[str], true_share: Optional[float]) -> str:
    """index.md: the summary figure first, what a correct cell looks like, the table, then every grid."""
    guide = ["# comfy-poe digits demo", "", "![summary: on target, FD and task 1's share errors per method](summary.png)", "",
             "Every method draws the same number of samples at the same budget of product-model evaluations per sample; "
             "a separately trained evaluator (never the reward) judges each sample. Bars: on target (higher is better), "
             "FD = Fréchet distance of evaluator features to real test digits of the target classes (lower is better), "
             "and for task 1 the 6-share error and the class total variation (lower is better). *reference* is the "
             "conditional model sampled directly: what a perfect composition looks like.", "",
             "## What a correct cell looks like", "",
             "Each grid is titled with its task, method and key numbers; the label under a cell is green when the "
             "evaluator puts it on target and red when not. Cells are in the same order in every grid of a task.", ""]
    for task_key in tasks:
        if task_key == "attributes":
            share = f"{true_share:.2f}" if true_share is not None else "the data's"
            guide.append(f"- **{TASK_TITLES[task_key]}**: every cell should be a 6 or an 8 (label = judged class), "
                         f"with 6s making up about {share} of them (the exact product's share); cells are sorted 6s, "
                         "8s, then anything else, so the red tail is the off-target mass.")
        elif task_key == "class":
            guide.append(f"- **{TASK_TITLES[task_key]}**: label *target/judged*; at the defaults row r of every grid "
                         "asks for digit r, so a correct grid reads 0 to 9 down its rows.")
        else:
            guide.append(f"- **{TASK_TITLES[task_key]}**: each cell is an 8×12 canvas whose left window (columns 0–7) "
                         "should show digit a and right window (columns 4–11) digit b, sharing the middle 4 columns; "
                         "label *ab/left,right* (target pair / judged classes of the two windows); correct = both windows right.")
    return "\n".join(guide + ["", "## Table", "", table, "", *notes, "", *sections]) + "\n"


def run_demo(out_dir="demo_out", samples: int = 200, budget: int = 30, seed: int = 0, tasks=TASKS,
             methods=METHODS, population: int = POPULATION, true_share: Optional[float] = None, model: str = "unet",
             attribute_weight: float = ATTRIBUTE_WEIGHT, log: Callable[[str], None] = print,
             progress: bool = False) -> dict:
    """Run every task × method, write labelled PNG grids, summary.png, index.md and table.md into ``out_dir``;
    returns the results. Every argument is checked before any model loads (:func:`check_demo_args`).

    ``true_share`` (task 1's 6-share of the exact product) defaults to :func:`true_share_of_six`.
    ``progress``: a tqdm bar over every level of every method (the log lines are written above it).
    """
    tasks, methods = tuple(tasks), tuple(methods)
    check_demo_args(out_dir, samples, budget, population, tasks, methods, model, attribute_weight, true_share)
    out = Path(out_dir)
    torch.manual_seed(seed)
    bar = Progress(total_evals(tasks, methods, samples, budget, population), enabled=progress)
    try:
        bar.stage("loading the digits models")
        denoiser = load_denoiser(model=model)
        classifier = denoiser.classifier if denoiser.classifier is not None else load_classifier()
        evaluator = load_evaluator()
        real = real_features(evaluator)
        results, rows, sections = {}, [], []
        if "attributes" in tasks and true_share is None:
            true_share = true_share_of_six()
        all_methods = list(methods) + ["reference"]
        for task_key in tasks:
            t_no = TASKS.index(task_key) + 1
            sections.append(f"## {TASK_TITLES[task_key]}\n\n{CELL_GUIDE[task_key]}.\n")
            for m_index, method in enumerate(all_methods, 1):
                bar.stage(f"task {t_no} {task_key} · {method} ({m_index}/{len(all_methods)})")
                if method == "reference":
                    res = reference_samples(task_key, samples, seed, denoiser)
                    bar.advance(2 * 30 - 1)
                    labels = item_labels(task_key, samples, samples)
                    shown = res.samples[0] if isinstance(res.samples, tuple) else res.samples
                else:
                    cfg = method_config(method, budget, population=population)
                    per_level = (1 + cfg.mcmc_steps) * (1 if cfg.population else cfg.particles)
                    res = run_method(task_key, method, samples, budget, seed, denoiser, classifier,
                                     population=population, attribute_weight=attribute_weight,
                                     callback=lambda _info, k=per_level: bar.advance(k))
                    labels = output_labels(task_key, method, samples, population)
                    shown = res.samples
                score = judge_samples(task_key, res.samples, labels, evaluator, real, true_share)
                results[(task_key, method)] = (score, res)
                rows.append(table_row(task_key, method, score, res, true_share if task_key == "attributes" else None))
                name = f"task{t_no}_{task_key}_{slug(method)}.png"
                save_labelled_grid(task_key, method, shown, score, res, labels,
                                   true_share if task_key == "attributes" else None, out / name)
                sections.append(f"### {method}\n\n![{TASK_TITLES[task_key]}: {method}]({name})\n")
                bar.write(f"[task {t_no}] {method:<13} on target {score.on_target:.1%}, FD {score.fd:.1f}, "
                          f"{res.wall:.1f} s", log)
    finally:
        bar.close()
    notes = [f"Budget: {budget} product-model evaluations per output sample; {samples} samples per method; "
             f"seed {seed}; model {model}; FK-SMC population {population}; task 1 attribute weight {attribute_weight:g}."]
    if true_share is not None and "attributes" in tasks:
        notes.append(f"Task 1: the target is p(x) p(even|x)^g p(>=5|x)^g (g = {attribute_weight:g}); its exact 6-share among "
                     f"{{6, 8}} is the data prior's {true_share:.2f} (error in brackets); class TV = total variation between "
                     "the evaluator's class histogram and the exact class distribution (wrong classes + imbalance). "
                     "FK-SMC returns whole populations of related particles: its share varies more between seeds.")
    table = "\n".join([TABLE_HEADER] + rows)
    summary = figures.summary_figure(summary_rows(results, tasks, all_methods, true_share), all_methods,
                                     note=f"{samples} samples per method, {budget} model evaluations per sample, "
                                          f"seed {seed}, model {model}")
    save_image(summary, out / "summary.png")
    atomic_write_text(out / "table.md", table + "\n\n" + "\n".join(notes) + "\n")
    atomic_write_text(out / "index.md", index_markdown(tasks, sections, table, notes, true_share))
    return {"results": results, "table": table, "true_share": true_share, "notes": notes}
