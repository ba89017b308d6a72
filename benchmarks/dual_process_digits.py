"""Dual-Process tuning on the digits model: the guidance classifier is the judge, the held-out evaluator
measures success (share of samples that are the target class) before / after, against training steps.

    python -m comfy_poe.benchmarks.dual_process_digits --classes 3 7 --steps 0 25 50 100 --samples 200

The classifier (the reward) and the evaluator (the measure) are different networks trained separately
(see readme_digits.md): success is not measured with the model that was optimised.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from ..cli import int_in, nonnegative_int, plain_help, positive_float, positive_int, seed as seed_arg
from .. import digits
from ..training import CheckpointStore, DualProcessConfig, Generator, LoopConfig, LoRAConfig, create_lora, noise_batch, sample, tune

EVAL_SEED = 10_000  # evaluation noises never appear in the training pool (training uses seed 0)


def success(gen, evaluator, target: int, n: int) -> float:
    noise = noise_batch(gen, EVAL_SEED, range(n))
    xs = torch.cat([sample(gen, noise[i:i + 100]) for i in range(0, n, 100)])
    return (evaluator.log_probs(xs).argmax(1) == target).float().mean().item()


def run(target: int, checkpoints: list[int], n_samples: int, sampling_steps: int, rank: int, lr: float,
        batch: int, seed: int) -> list[dict]:
    """One training run toward ``target``, measured at each step count in ``checkpoints``: the run is
    extended by resuming from its own checkpoint (identical to one uninterrupted run)."""
    den = digits.load_denoiser(with_classifier=False)
    den.network.requires_grad_(False)
    evaluator = digits.load_evaluator()
    judge = digits.classifier_judge(target)
    lora = create_lora(den.network, LoRAConfig(rank=rank, alpha=rank, targets="attention"), seed=seed)
    lora.attach(den.network)
    gen = Generator(lambda x, s: den.denoise(x, s, [None])[0], digits.karras_sigmas(sampling_steps), (1, 8, 8), "eps")
    rows, seconds = [], 0.0
    try:
        with tempfile.TemporaryDirectory() as folder:
            store = CheckpointStore(folder)
            for steps in sorted(set(checkpoints)):
                if steps:
                    cfg = DualProcessConfig(loop=LoopConfig(steps=steps, lr=lr, seed=seed), batch_size=batch,
                                            train_scale=1.0, eval_scale=1.0, pixel_range="none")
                    t0 = time.perf_counter()
                    tune(gen, [judge], lora, cfg, checkpoints=store, resume=True)
                    seconds += time.perf_counter() - t0
                lora.scale = 1.0 if steps else 0.0
                rows.append({"target": target, "steps": steps, "success": success(gen, evaluator, target, n_samples),
                             "train_s": seconds})
    finally:
        lora.detach()
    return rows


def main(argv=None):
    from ..extras import exit_unless_installed

    exit_unless_installed("digits", "The Dual-Process digits benchmark")
    ap = argparse.ArgumentParser(prog="python -m comfy_poe.benchmarks.dual_process_digits", description=plain_help(__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int_in(0, 9), nargs="+", default=[3, 7])
    ap.add_argument("--steps", type=nonnegative_int, nargs="+", default=[0, 25, 50, 100])
    ap.add_argument("--samples", type=positive_int, default=200)
    ap.add_argument("--sampling-steps", type=positive_int, default=4)
    ap.add_argument("--rank", type=positive_int, default=4)
    ap.add_argument("--lr", type=positive_float, default=3e-3)
    ap.add_argument("--batch", type=positive_int, default=4)
    ap.add_argument("--seed", type=seed_arg, default=0)
    ap.add_argument("--threads", type=positive_int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"digits UNet, unconditional, Euler {args.sampling_steps} steps, LoRA rank {args.rank} on attention, "
          f"AdamW lr {args.lr}, batch {args.batch}, judge = guidance classifier, measure = held-out evaluator "
          f"({args.samples} samples)")
    print("| target | train steps | evaluator success | train time (s) |")
    print("|---|---|---|---|")
    for target in args.classes:
        for row in run(target, [0, *args.steps], args.samples, args.sampling_steps, args.rank, args.lr,
                       args.batch, args.seed):
            print(f"| {row['target']} | {row['steps']} | {row['success']:.3f} | {row['train_s']:.1f} |")


if __name__ == "__main__":
    main()
