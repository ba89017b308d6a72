"""Command line of comfy-poe: comfy-poe <command> (or python -m comfy_poe <command>).

Commands:
  demo   the digits demo: three composition tasks with known answers, every sampling method at equal
         model-evaluation budgets, on the embedded 8x8 digits models (CPU, about a minute):
         labelled PNG grids, summary.png, index.md and table.md in --out, one markdown table on stdout.
  convert-reward  turn an official reward-model checkpoint (PickScore, HPS v2.1, ImageReward, LAION aesthetic;
         pickle .pt/.pth) into a safetensors folder for ComfyUI/models/reward, once, with --allow-pickle;
         checks the converted folder reproduces the original's scores (docs/reward_judges.md).

Other tools have their own entry points: python -m comfy_poe.lora, python -m comfy_poe.digits.train,
python -m comfy_poe.benchmarks.gmm, python -m comfy_poe.benchmarks.digits (and the other benchmarks).
"""
from __future__ import annotations

import argparse
import sys

from .cli import plain_help, positive_float, positive_int, program_name, seed


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=program_name("comfy_poe", "comfy-poe"), description=plain_help(__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("demo", help="digits demo: naive / best-of-N / paper / MCMC / FK-SMC on three tasks",
                       description="Run the digits demo (docs/demo.md). Every option is checked before the "
                                   "models load; --out must be a folder (created if missing).")
    d.add_argument("--out", default="demo_out", help="output folder (created if missing) for the labelled PNG grids, summary.png, index.md and table.md")
    d.add_argument("--samples", type=positive_int, default=None,
                   help="output samples per method (a multiple of --population; default 100, --quick 20)")
    d.add_argument("--budget", type=positive_int, default=None,
                   help="product-model evaluations per output sample, equal for every method (default 60, --quick 30)")
    d.add_argument("--population", type=positive_int, default=None, help="FK-SMC particles per population (default 10)")
    d.add_argument("--attribute-weight", type=positive_float, default=None,
                   help="task 1: weight γ of the 'even' and '≥5' experts (default 2; 1 makes naive balanced, >1 not)")
    d.add_argument("--seed", type=seed, default=0, help="seed of every random choice")
    d.add_argument("--tasks", nargs="+", choices=("attributes", "class", "regions"), default=None,
                   help="subset of tasks (default: all three)")
    d.add_argument("--model", choices=("unet", "mlp"), default="unet",
                   help="digits denoiser: the UNet (quality) or the fast MLP")
    d.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice, at most 2)")
    d.add_argument("--quick", action="store_true", help="tiny run for smoke tests (20 samples, budget 30)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar (one line per method only)")
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
    from .digits.demo import ATTRIBUTE_WEIGHT, METHODS, POPULATION, TASKS, check_demo_args, run_demo

    samples = args.samples or (20 if args.quick else 100)
    budget = args.budget or (30 if args.quick else 60)
    population = args.population or min(POPULATION, samples)
    weight = ATTRIBUTE_WEIGHT if args.attribute_weight is None else args.attribute_weight
    tasks = tuple(dict.fromkeys(args.tasks or TASKS))
    try:
        # every option and the output folder, before the models load
        check_demo_args(args.out, samples, budget, population, tasks, METHODS, args.model, weight)
        torch.set_num_threads(args.threads or max(1, min(2, torch.get_num_threads())))
        result = run_demo(out_dir=args.out, samples=samples, budget=budget, seed=args.seed, tasks=tasks,
                          population=population, model=args.model, attribute_weight=weight,
                          progress=not args.no_progress)
    except (ValueError, OSError) as exc:  # bad options / paths (OutputPathError is a ValueError)
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
