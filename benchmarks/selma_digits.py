"""SELMA on the digits model: two skill LoRAs trained separately on self-generated data, then merged.

    python -m comfy_poe.benchmarks.selma_digits --classes 3 7 --data 64 --steps 150 --samples 200

Skill c = "draw a c" for the UNCONDITIONAL digits model (the null class):
1. data: the same model, conditioned on class c, generates ``--data`` digits (Heun, Karras σ), written
   through :func:`comfy_poe.selma.dataset.build_dataset`; the guidance classifier is the judge and keeps only
   images with p(c | x) ≥ 0.5 (SELMA §3.2 with a judge filter);
2. one LoRA per skill on UNet attention, trained with :func:`comfy_poe.selma.trainer.train_skill_lora`
   (plain ε-MSE, captions → the null class, i.e. the LoRA changes the unconditional behaviour);
3. merge: :func:`comfy_poe.lora.merge_loras` with ``concat`` and weights 1/N (SELMA §3.4: ΔW = Σ ΔW_i / N).

Measure: for each skill, the share of unconditional samples (fixed evaluation noises never used for data)
that the separately trained, held-out evaluator calls class c — with no LoRA, the skill's own LoRA, the
other skill's LoRA and the merged LoRA. The judge (classifier) and the measure (evaluator) are different
networks.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from ..cli import int_in, plain_help, positive_float, positive_int, seed as seed_arg
from .. import digits
from ..experts import PIXEL, DiscriminativeExpert
from ..lora import atomic_write_safetensors, load_lora_file
from ..lora.merge import LoraInput, merge_loras
from ..selma.dataset import SkillDataset, build_dataset
from ..selma.trainer import SkillTrainConfig, train_skill_lora
from ..training import LoRAConfig, create_lora

EVAL_SEED = 10_000


def unit_to_model(images: torch.Tensor) -> torch.Tensor:
    """IMAGE (N, 8, 8, 3) in [0, 1] -> digits latent (N, 1, 8, 8) in [-1, 1]."""
    return images.mean(-1)[:, None] * 2 - 1


def make_dataset(root: Path, den, classifier, target: int, n: int, steps: int, seed: int) -> SkillDataset:
    """Conditional samples of ``target`` kept when the guidance classifier gives p(target | x) ≥ 0.5."""
    sigmas = digits.karras_sigmas(steps)

    def generate(prompts, seeds):
        noise = torch.stack([torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(s % 2**63))
                             for s in seeds]) * sigmas[0]
        with torch.no_grad():
            x = digits.sample_heun(lambda x, s: den.denoise(x, s, [target])[0], noise, sigmas)
        return digits.model_to_unit(x)[:, 0, :, :, None].expand(-1, 8, 8, 3).contiguous()

    log_p = digits.classifier_log_prob(target, classifier)
    judge = DiscriminativeExpert(fn=lambda img: log_p(unit_to_model(img), torch.full((img.shape[0],), 0.002)),
                                 space=PIXEL, name=f"classifier p({target})")
    build_dataset(root, [f"a handwritten digit {target}"], generate, seed=seed, images_per_prompt=n,
                  judges=[judge], threshold=math.log(0.5), batch_size=64)
    return SkillDataset(root, create=False)


def success(den, evaluator, target: int, n: int, steps: int) -> float:
    sigmas = digits.karras_sigmas(steps)
    noise = torch.randn((n, 1, 8, 8), generator=torch.Generator().manual_seed(EVAL_SEED)) * sigmas[0]
    with torch.no_grad():
        x = digits.sample_heun(lambda x, s: den.denoise(x, s, [None])[0], noise, sigmas)
        return (evaluator.log_probs(x).argmax(1) == target).float().mean().item()


def main(argv=None):
    from ..extras import exit_unless_installed

    exit_unless_installed("digits", "The SELMA digits benchmark")
    ap = argparse.ArgumentParser(prog="python -m comfy_poe.benchmarks.selma_digits", description=plain_help(__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int_in(0, 9), nargs="+", default=[3, 7])
    ap.add_argument("--data", type=positive_int, default=64, help="self-generated images per skill (before filtering)")
    ap.add_argument("--data-steps", type=positive_int, default=12, help="Heun steps for the data")
    ap.add_argument("--steps", type=positive_int, default=150, help="training steps per skill")
    ap.add_argument("--rank", type=positive_int, default=4)
    ap.add_argument("--lr", type=positive_float, default=3e-3)
    ap.add_argument("--batch", type=positive_int, default=8)
    ap.add_argument("--sigma-range", type=positive_float, nargs=2, default=[0.05, 20.0],
                    help="training σ: log-uniform table over this range")
    ap.add_argument("--samples", type=positive_int, default=200, help="evaluation samples per condition")
    ap.add_argument("--eval-steps", type=positive_int, default=10)
    ap.add_argument("--seed", type=seed_arg, default=0)
    ap.add_argument("--threads", type=positive_int, default=2)
    args = ap.parse_args(argv)
    if args.sigma_range[0] >= args.sigma_range[1]:
        ap.error(f"--sigma-range: give LOW HIGH with LOW < HIGH, got {args.sigma_range[0]:g} {args.sigma_range[1]:g}")
    args.classes = list(dict.fromkeys(args.classes))  # one skill per class
    torch.set_num_threads(args.threads)
    den = digits.load_denoiser(with_classifier=False)
    den.network.requires_grad_(False)
    classifier, evaluator = digits.load_classifier(), digits.load_evaluator()
    lo, hi = args.sigma_range
    table = torch.exp(torch.linspace(math.log(lo), math.log(hi), 1000))
    config = SkillTrainConfig(rank=args.rank, alpha=float(args.rank), lr=args.lr, steps=args.steps,
                              batch_size=args.batch, micro_batch=args.batch, seed=args.seed, eval_samples=64)
    null = torch.tensor([digits.NULL_CLASS])
    files, log = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for c in args.classes:
            t0 = time.perf_counter()
            ds = make_dataset(tmp / f"skill_{c}", den, classifier, c, args.data, args.data_steps, args.seed)
            t_data = time.perf_counter() - t0
            result = train_skill_lora(tmp / f"skill_{c}", den.network, lambda x, s, cond: den.denoise(x, s, [cond])[0],
                                      lambda caption: null, lambda px: unit_to_model(px), config=config, sigmas=table)
            result.network.detach()
            files[c] = atomic_write_safetensors(tmp / f"skill_{c}.safetensors",
                                                result.network.export_state_dict("diffusion_model."))
            log.append(f"skill {c}: {len(ds.accepted)}/{len(ds.records)} images kept by the judge ({t_data:.1f} s); "
                       f"{result.summary().replace(chr(10), '; ')}")
        merged = merge_loras([LoraInput.from_file(files[c], 1.0 / len(files)) for c in args.classes], "concat")
        merged_sd = merged.state_dict()

        def with_lora(sd, rank):
            net = create_lora(den.network, LoRAConfig(rank=rank, alpha=float(rank), targets="attention"), seed=0)
            net.load_factors(sd, prefix="diffusion_model.")
            return net

        own = {c: with_lora(load_lora_file(files[c]).tensors, args.rank) for c in args.classes}
        merged_net = with_lora(merged_sd, args.rank * len(files))
        rows = []
        for c in args.classes:
            row = {"skill": c, "none": success(den, evaluator, c, args.samples, args.eval_steps)}
            for label, net in [("own", own[c]), ("merged", merged_net)] + [
                    (f"other ({o})", own[o]) for o in args.classes if o != c][:1]:
                net.attach(den.network)
                try:
                    row[label.split(" ")[0]] = success(den, evaluator, c, args.samples, args.eval_steps)
                finally:
                    net.detach()
            rows.append(row)
    print("\n".join(log))
    print(f"digits UNet, unconditional model + skill LoRA (rank {args.rank}, attention, AdamW lr {args.lr}, batch "
          f"{args.batch}, {args.steps} steps); merge = concat at 1/{len(files)}; measure = held-out evaluator, "
          f"{args.samples} samples, Heun {args.eval_steps} steps")
    print("| skill | no LoRA | own LoRA | other skill's LoRA | merged (1/N each) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| draw {r['skill']} | {r['none']:.3f} | {r['own']:.3f} | {r.get('other', float('nan')):.3f} | "
              f"{r['merged']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
