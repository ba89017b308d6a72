"""Seeded, reproducible training of the embedded digits models (CPU, minutes).

    python -m comfy_poe.digits.train [--what unet|classifier|evaluator|mlp|all] [--out DIR] [--threads 2]

Writes NAME.safetensors + NAME.json atomically into DIR (default: the package's weights folder).
Every model trains on the TRAIN split only (comfy_poe.digits.data); the TEST split is used only to report
held-out numbers in the JSON metadata. Recipes follow the reference measurements (digits_benchmark.md).
"""
from __future__ import annotations

import argparse
import copy
import math
import platform
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from ..cli import plain_help, positive_int
from ..fileio import check_output_dir
from . import store as wio
from .data import load_split, real_digits, train_validation_split
from .models import (
    NULL_CLASS, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, UNET_CONFIG, DigitsEvaluator, EDMUNet,
    MLPDenoiserNet, NoiseAwareClassifier, build_unet, count_parameters, edm_loss_weight,
)
from .sampling import frechet_distance, karras_sigmas, sample_heun

CLASSIFIER_EVAL_SIGMAS = (SIGMA_MIN, 0.25, 0.5, 1.0, 2.0)
DENOISER_EVAL_SIGMAS = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)


# -- pure helpers ----------------------------------------------------------------------------------
def index_batches(n: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless mini-batches of indices, a fresh seeded permutation every epoch."""
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch + 1, batch):
            yield order[i : i + batch]


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def edm_training_sigmas(n: int, generator: torch.Generator, p_mean: float = -1.2, p_std: float = 1.2) -> torch.Tensor:
    """ln σ ~ N(P_mean, P_std²) (Karras et al. 2022, Table 1 'training')."""
    return torch.exp(p_mean + p_std * torch.randn(n, generator=generator))


def classifier_training_sigmas(n: int, generator: torch.Generator) -> torch.Tensor:
    """Half EDM log-normal (the informative range), half log-uniform over [σ_min, σ_max] (the full schedule)."""
    lognormal = edm_training_sigmas(n, generator)
    loguniform = torch.exp(math.log(SIGMA_MIN) + torch.rand(n, generator=generator) * math.log(SIGMA_MAX / SIGMA_MIN))
    pick = torch.rand(n, generator=generator) < 0.5
    return torch.where(pick, lognormal, loguniform).clamp(SIGMA_MIN, SIGMA_MAX)


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each digit by up to ``max_shift`` pixels, filling with background (-1)."""
    n = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(8)[None])[:, :, None].expand(n, 8, 8)
    cols = (dx[:, None] + torch.arange(8)[None])[:, None, :].expand(n, 8, 8)
    return padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


def _environment() -> dict:
    import diffusers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warm-up, min(decay, (1 + t) / (10 + t)): without it a 1,000-step run at 0.999 would
    keep 0.999^1000 = 37% of the random initial weights in the average."""
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


@torch.no_grad()
def denoising_losses(network, images, labels, sigmas=DENOISER_EVAL_SIGMAS, seed: int = 1234) -> dict:
    """Mean EDM-weighted denoising loss per σ on fixed seeded noise (lower is better)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in sigmas:
        noise = torch.randn(images.shape, generator=g)
        sigma = torch.full((len(images),), float(s))
        d = network(images + s * noise, sigma, labels)
        out[f"{s:g}"] = round(float((edm_loss_weight(sigma)[:, None, None, None] * (d - images) ** 2).mean()), 5)
    return out


@torch.no_grad()
def classifier_accuracies(classifier, images, labels, sigmas=CLASSIFIER_EVAL_SIGMAS, seed: int = 1234) -> dict:
    """Accuracy per σ on x0 + σ·ε with fixed seeded noise."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in sigmas:
        x = images + s * torch.randn(images.shape, generator=g)
        pred = classifier.log_probs(x, torch.full((len(images),), float(s))).argmax(1)
        out[f"{s:g}"] = round(float((pred == labels).float().mean()), 4)
    return out


# -- the loop every trainer shares ---------------------------------------------------------------------
def edm_denoising_loss(network, x0: torch.Tensor, labels: torch.Tensor, g: torch.Generator,
                       p_uncond: float) -> torch.Tensor:
    """EDM loss of a class-conditional denoiser; the label drops to the null class with prob. p_uncond
    (classifier-free). Random draws in a fixed order: drop mask, σ, noise."""
    y = labels.clone()
    y[torch.rand(len(y), generator=g) < p_uncond] = NULL_CLASS
    sigma = edm_training_sigmas(len(y), g)
    denoised = network(x0 + sigma[:, None, None, None] * torch.randn(x0.shape, generator=g), sigma, y)
    return (edm_loss_weight(sigma)[:, None, None, None] * (denoised - x0) ** 2).mean()


def fit(tag: str, model: torch.nn.Module, opt: torch.optim.Optimizer, loss_of_batch: Callable, n_images: int,
        steps: int, batch: int, warmup: int, g: torch.Generator, log: Callable, log_every: int,
        after_step: Optional[Callable] = None, at_log: Optional[Callable] = None) -> float:
    """Warm-up + cosine schedule over ``steps`` seeded batches; ``after_step(step)`` after each update (EMA),
    ``at_log(step) -> str`` appended to the progress line (validation). Returns the training seconds."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: warmup_cosine(k, steps, warmup))
    start, running = time.time(), None
    for step, idx in zip(range(steps), index_batches(n_images, batch, g)):
        model.train()
        loss = loss_of_batch(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if after_step is not None:
            after_step(step)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            extra = at_log(step) if at_log is not None else ""
            log(f"[{tag}] step {step + 1}/{steps} loss {running:.4f}{extra} ({time.time() - start:.0f}s)")
    return time.time() - start


# -- trainers ------------------------------------------------------------------------------------------
def train_unet(out=None, seed: int = 0, steps: int = 1000, batch: int = 128, lr: float = 2e-3, warmup: int = 50,
               ema_decay: float = 0.999, p_uncond: float = 0.15, log: Callable = print) -> Path:
    """Class-conditional EDM UNet (classifier-free: label dropped to the null class with prob. p_uncond)."""
    torch.manual_seed(seed)  # parameter initialisation
    g = torch.Generator().manual_seed(seed)
    images, labels = load_split("train")
    network = EDMUNet(build_unet())
    ema = copy.deepcopy(network).eval()
    opt = torch.optim.Adam(network.parameters(), lr=lr)
    log(f"[unet] {count_parameters(network):,} parameters, {steps} steps of {batch}")
    train_seconds = fit("unet", network, opt, lambda idx: edm_denoising_loss(network, images[idx], labels[idx], g, p_uncond),
                        len(images), steps, batch, warmup, g, log, 100,
                        after_step=lambda step: _ema_update(ema, network, ema_decay_at(step, ema_decay)))
    test_images, test_labels = load_split("test")
    meta = {
        "model": "class-conditional EDM UNet (diffusers UNet2DModel), null class 10 = unconditional",
        "config": {"unet": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()},
                   "sigma_data": SIGMA_DATA},
        "parameters": count_parameters(ema),
        "training": {"seed": seed, "steps": steps, "batch": batch, "lr": lr, "warmup": warmup, "schedule": "cosine",
                     "ema_decay": ema_decay, "ema_warmup": "min(decay, (1+t)/(10+t))", "p_uncond": p_uncond, "P_mean": -1.2, "P_std": 1.2, "split": "train"},
        "train_seconds": round(train_seconds, 1),
        "heldout_denoising_loss": denoising_losses(ema, test_images, test_labels),
        "train_denoising_loss": denoising_losses(ema, *load_split("train")),
        "environment": _environment(),
    }
    path = wio.save_model(ema, "digits_unet", meta, out, dtype=torch.float16)
    log(f"[unet] wrote {path} in {train_seconds:.0f}s; held-out loss {meta['heldout_denoising_loss']}")
    return path


def train_classifier(out=None, seed: int = 1, steps: int = 4000, batch: int = 128, lr: float = 2e-3, warmup: int = 100,
                     log: Callable = print) -> Path:
    """Noise-aware guidance classifier on x0 + σ·ε with σ from :func:`classifier_training_sigmas`."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = load_split("train")
    model = NoiseAwareClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    log(f"[classifier] {count_parameters(model):,} parameters, {steps} steps of {batch}")

    def loss_of_batch(idx):
        sigma = classifier_training_sigmas(batch, g)
        x = images[idx] + sigma[:, None, None, None] * torch.randn(images[idx].shape, generator=g)
        return F.cross_entropy(model(x, sigma), labels[idx])

    train_seconds = fit("classifier", model, opt, loss_of_batch, len(images), steps, batch, warmup, g, log, 500)
    model.eval()
    meta = {
        "model": "noise-aware guidance classifier p(y | x_sigma) (CNN with FiLM sigma embedding)",
        "config": {"channels": list(model.channels), "emb_dim": model.emb_dim, "sigma_data": SIGMA_DATA},
        "parameters": count_parameters(model),
        "training": {"seed": seed, "steps": steps, "batch": batch, "lr": lr, "warmup": warmup, "optimizer": "AdamW",
                     "weight_decay": 1e-4, "sigma_distribution": "50% lognormal(-1.2, 1.2), 50% log-uniform [0.002, 80]",
                     "split": "train"},
        "train_seconds": round(train_seconds, 1),
        "heldout_accuracy_by_sigma": classifier_accuracies(model, *load_split("test")),
        "train_accuracy_by_sigma": classifier_accuracies(model, *load_split("train")),
        "environment": _environment(),
    }
    path = wio.save_model(model, "digits_classifier", meta, out)
    log(f"[classifier] wrote {path} in {train_seconds:.0f}s; held-out accuracy by sigma {meta['heldout_accuracy_by_sigma']}")
    return path


def train_evaluator(out=None, seed: int = 2, steps: int = 1500, batch: int = 64, lr: float = 2e-3, warmup: int = 50,
                    log: Callable = print) -> Path:
    """Held-out evaluator: clean digits with ±1 pixel shifts, its own seed and architecture."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = load_split("train")
    model = DigitsEvaluator()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
    log(f"[evaluator] {count_parameters(model):,} parameters, {steps} steps of {batch}")

    def loss_of_batch(idx):
        x = images[idx]
        shifted = random_shift(x, g)
        x = torch.where((torch.rand(len(idx), generator=g) < 0.5)[:, None, None, None], shifted, x)
        return F.cross_entropy(model(x), labels[idx])

    train_seconds = fit("evaluator", model, opt, loss_of_batch, len(images), steps, batch, warmup, g, log, 500)
    model.eval()
    with torch.no_grad():
        test_x, test_y = load_split("test")
        train_x, train_y = load_split("train")
        test_acc = float((model.log_probs(test_x).argmax(1) == test_y).float().mean())
        train_acc = float((model.log_probs(train_x).argmax(1) == train_y).float().mean())
        fd_train_test = frechet_distance(model.features(train_x), model.features(test_x))
    meta = {
        "model": "held-out evaluator CNN (clean digits; judging only, never a reward or sampler component)",
        "config": {"dropout": model.dropout.p},
        "parameters": count_parameters(model),
        "training": {"seed": seed, "steps": steps, "batch": batch, "lr": lr, "warmup": warmup, "optimizer": "AdamW",
                     "weight_decay": 1e-3, "augmentation": "±1 pixel shifts on half the batch", "split": "train"},
        "train_seconds": round(train_seconds, 1),
        "heldout_accuracy": round(test_acc, 4),
        "train_accuracy": round(train_acc, 4),
        "frechet_distance_train_vs_test": round(fd_train_test, 3),
        "environment": _environment(),
    }
    path = wio.save_model(model, "digits_evaluator", meta, out)
    log(f"[evaluator] wrote {path} in {train_seconds:.0f}s; held-out accuracy {test_acc:.4f}, FD train-vs-test {fd_train_test:.2f}")
    return path


def train_mlp(out=None, seed: int = 3, steps: int = 6000, batch: int = 128, lr: float = 1e-3, warmup: int = 100,
              eval_every: int = 250, n_validation: int = 144, log: Callable = print) -> Path:
    """Fast MLP denoiser, early-stopped on a validation set carved out of the TRAIN split (test stays held out)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    (images, labels), (val_images, val_labels) = train_validation_split(n_validation, seed=seed)
    model = MLPDenoiserNet()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    log(f"[mlp] {count_parameters(model):,} parameters, up to {steps} steps of {batch}")
    best = (math.inf, -1, None)

    def validate(step):
        nonlocal best
        model.eval()
        val = sum(denoising_losses(model, val_images, val_labels).values())
        if val < best[0]:
            best = (val, step + 1, copy.deepcopy(model.state_dict()))
        return f" validation {val:.4f} (best @ {best[1]})"

    train_seconds = fit("mlp", model, opt, lambda idx: edm_denoising_loss(model, images[idx], labels[idx], g, 0.15),
                        len(images), steps, batch, warmup, g, log, eval_every, at_log=validate)
    model.load_state_dict(best[2])
    model.eval()
    meta = {
        "model": "fast MLP denoiser (EDM preconditioned), early-stopped on a validation slice of the train split",
        "config": {"width": model.width, "depth": model.depth, "dropout": model.dropout_p, "sigma_data": SIGMA_DATA},
        "parameters": count_parameters(model),
        "training": {"seed": seed, "max_steps": steps, "best_step": best[1], "batch": batch, "lr": lr, "warmup": warmup,
                     "p_uncond": 0.15, "validation": f"{n_validation} digits of the train split (seed {seed})",
                     "split": "train minus validation"},
        "train_seconds": round(train_seconds, 1),
        "heldout_denoising_loss": denoising_losses(model, *load_split("test")),
        "environment": _environment(),
    }
    path = wio.save_model(model, "digits_mlp", meta, out, dtype=torch.float16)
    log(f"[mlp] wrote {path} in {train_seconds:.0f}s (best step {best[1]})")
    return path


@torch.no_grad()
def evaluate_samples(out=None, model: str = "unet", per_class: int = 50, steps: int = 30, seed: int = 0,
                     log: Callable = print) -> dict:
    """Conditional samples (CFG 1, Heun, Karras ρ=7) judged by the evaluator: accuracy and FD vs real test digits."""
    denoiser = wio.load_denoiser(model=model, folder=out, with_classifier=False)
    evaluator = wio.load_evaluator(folder=out)
    labels = torch.arange(10).repeat_interleave(per_class)
    g = torch.Generator().manual_seed(seed)
    sigmas = karras_sigmas(steps)
    x = torch.randn((len(labels), 1, 8, 8), generator=g) * sigmas[0]
    start = time.time()
    samples = sample_heun(lambda x, s: denoiser(x, s, labels), x, sigmas)
    seconds = time.time() - start
    accuracy = float((evaluator.log_probs(samples).argmax(1) == labels).float().mean())
    fd = frechet_distance(evaluator.features(samples), evaluator.features(real_digits("test")))
    result = {"sample_eval": {"n": len(labels), "cfg": 1.0, "heun_steps": steps, "seed": seed,
                              "evaluator_accuracy": round(accuracy, 4), "frechet_distance_vs_test": round(fd, 3),
                              "sampling_seconds": round(seconds, 2)}}
    wio.update_metadata(f"digits_{model}", result, out)
    log(f"[{model}] samples: evaluator accuracy {accuracy:.4f}, FD vs test {fd:.2f} ({seconds:.1f}s for {len(labels)})")
    return result


TRAINERS = {"unet": train_unet, "classifier": train_classifier, "evaluator": train_evaluator, "mlp": train_mlp}


def main(argv: Optional[list] = None) -> None:
    from ..extras import exit_unless_installed

    exit_unless_installed("digits", "Training the digits models")
    parser = argparse.ArgumentParser(prog="python -m comfy_poe.digits.train",
                                     description=plain_help(__doc__.split("\n\n")[0]))
    parser.add_argument("--what", choices=["unet", "classifier", "evaluator", "mlp", "all"], default="all",
                        help="which model to train ('all' = evaluator, classifier, unet, mlp, then sample checks)")
    parser.add_argument("--out", default=None, help=f"output folder (default: {wio.WEIGHTS_DIR})")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    parser.add_argument("--no-eval", action="store_true", help="skip the sample-quality check after training a denoiser")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else wio.WEIGHTS_DIR
    try:  # before minutes of training
        check_output_dir(out, "--out")
    except ValueError as e:
        parser.error(str(e))
    torch.set_num_threads(args.threads)
    order = ["evaluator", "classifier", "unet", "mlp"] if args.what == "all" else [args.what]
    for name in order:
        TRAINERS[name](out)
        if name in ("unet", "mlp") and not args.no_eval:
            try:
                evaluate_samples(out, model=name)
            except FileNotFoundError as err:
                print(f"[{name}] sample check skipped: {err}")


if __name__ == "__main__":
    main()
