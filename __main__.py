"""Command line of comfy-poe: ``python -m comfy_poe <command>`` (also the ``comfy-poe`` script).

Commands:
  demo   the digits demo — three composition tasks with known answers, every sampling method at equal
         model-evaluation budgets, on the embedded 8×8 digits models (CPU, a few minutes):
         PNG grids + index.md + table.md in --out, one markdown table on stdout.
  convert-reward  turn an official reward-model checkpoint (PickScore, HPS v2.1, ImageReward, LAION aesthetic;
         pickle .pt/.pth) into a safetensors folder for ComfyUI/models/reward, once, with --allow-pickle;
         checks the converted folder reproduces the original's scores (docs/reward_judges.md).

Other tools have their own entry points: ``python -m comfy_poe.lora``, ``python -m comfy_poe.digits.train``,
``python -m comfy_poe.benchmarks.gmm``, ``python -m comfy_poe.benchmarks.digits``.
"""
from __future__ import annotations

import argparse
import sys


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m comfy_poe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("demo", help="digits demo: naive / best-of-N / paper / MCMC / FK-SMC on three tasks",
                       description="Run the digits demo (see docs/demo.md).")
    d.add_argument("--out", default="demo_out", help="output folder for the PNG grids, index.md and table.md")
    d.add_argument("--samples", type=_positive, default=None,
                   help="output samples per method (a multiple of --population; default 100, --quick 20)")
    d.add_argument("--budget", type=_positive, default=None,
                   help="product-model evaluations per output sample, equal for every method (default 60, --quick 30)")
    d.add_argument("--population", type=_positive, default=None, help="FK-SMC particles per population (default 10)")
    d.add_argument("--attribute-weight", type=_positive_float, default=None,
                   help="task 1: weight γ of the 'even' and '≥5' experts (default 2; 1 makes naive balanced, >1 not)")
    d.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    d.add_argument("--tasks", nargs="+", choices=("attributes", "class", "regions"), default=None,
                   help="subset of tasks (default: all three)")
    d.add_argument("--model", choices=("unet", "mlp"), default="unet",
                   help="digits denoiser: the UNet (quality) or the fast MLP")
    d.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: torch's choice, at most 2)")
    d.add_argument("--quick", action="store_true", help="tiny run for smoke tests (20 samples, budget 30)")
    c = sub.add_parser("convert-reward", help="convert an official reward checkpoint (pickle) to a safetensors folder",
                       description="Convert an official reward-model checkpoint into a models/reward folder "
                                   "(see docs/reward_judges.md). Pickles can run code when loaded: they are only "
                                   "read with --allow-pickle, through torch's restricted weights-only loader.")
    c.add_argument("kind", choices=("pickscore", "hpsv2", "imagereward", "aesthetic"), help="which reward model")
    c.add_argument("--source", required=True,
                   help="the official checkpoint (HPS_v2.1_compressed.pt, ImageReward.pt, sac+logos+ava1-l14-linearMSE.pth) "
                        "or, for pickscore, the transformers folder with pytorch_model.bin")
    c.add_argument("--out", required=True, help="new folder to write, e.g. ComfyUI/models/reward/ImageReward")
    c.add_argument("--base", default=None,
                   help="transformers folder giving config / tokenizer / processor: CLIP-H for hpsv2, BLIP ITM for "
                        "imagereward, CLIP ViT-L/14 for aesthetic (its weights are copied)")
    c.add_argument("--format", dest="fmt", choices=("transformers", "open_clip"), default="transformers",
                   help="hpsv2 only: transformers CLIP folder (default) or open_clip weights (needs open_clip_torch)")
    c.add_argument("--allow-pickle", action="store_true",
                   help="allow reading the pickle checkpoint (only for files from a source you trust)")
    return ap


def run_demo_command(args) -> int:
    import torch

    from .extras import exit_unless_installed

    exit_unless_installed("digits", "The digits demo")
    from .digits.demo import ATTRIBUTE_WEIGHT, POPULATION, TASKS, run_demo

    torch.set_num_threads(args.threads or max(1, min(2, torch.get_num_threads())))
    samples = args.samples or (20 if args.quick else 100)
    budget = args.budget or (30 if args.quick else 60)
    population = args.population or min(POPULATION, samples)
    weight = ATTRIBUTE_WEIGHT if args.attribute_weight is None else args.attribute_weight
    try:
        result = run_demo(out_dir=args.out, samples=samples, budget=budget, seed=args.seed,
                          tasks=tuple(args.tasks or TASKS), population=population, model=args.model,
                          attribute_weight=weight)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print(result["table"])
    print()
    for note in result["notes"]:
        print(note)
    print(f"\nGrids, index.md and table.md written to {args.out}")
    return 0


def run_convert_reward_command(args) -> int:
    import warnings

    from .experts.reward import RewardFolderError, convert_reward

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = convert_reward(args.kind, args.source, args.out, base=args.base, allow_pickle=args.allow_pickle,
                                    fmt=args.fmt)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
    except (RewardFolderError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return run_demo_command(args)
    if args.command == "convert-reward":
        return run_convert_reward_command(args)
    parser.print_help()
    return 0 if argv is not None or len(sys.argv) > 1 else 1


if __name__ == "__main__":
    sys.exit(main())
