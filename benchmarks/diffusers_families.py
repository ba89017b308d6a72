"""CPU seconds per training step of the diffusers trainer (python -m comfy_poe.training) on each model family's
tiny random folder (tests/diffusers_tiny.py), one process, for every method:

    OMP_NUM_THREADS=1 python benchmarks/diffusers_families.py --steps 4 [--families sdxl,sd3,flux]

Each row is one run of ``--steps`` steps at 16 px (8×8 latents, batch 2, rank-2 attention LoRA); the time per step
is the mean gap between the progress lines of steps 2..N (so loading and the first step's warm-up are left out).
Prints a markdown table.  The tiny models are for correctness, not speed: the numbers show the trainer's overhead
and the relative cost of the methods, not what a real SDXL / SD3 / Flux costs.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

METHODS = ("mapo", "dpo", "sft", "selma", "dual-process", "ddpo", "dag-kl", "dag-db")


def seconds_per_step(root: Path, family: str, method: str, steps: int) -> float:
    from diffusers_tiny import method_config

    from comfy_poe.training.launch import parse_config, run

    stamps = []

    def log(line, **_):
        if str(line).startswith("step "):
            stamps.append(time.perf_counter())

    cfg = method_config(family, method, f"bench_{family}_{method}", steps=steps)
    cfg["resume"] = False
    run(parse_config(cfg, root), log=log)
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--families", default="sdxl,sd3,flux")
    args = ap.parse_args(argv)
    import torch
    from diffusers_tiny import build_pairs, build_tiny_flux, build_tiny_sd3, build_tiny_sdxl

    from comfy_poe.selma.dataset import SkillDataset

    builders = {"sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_pairs(root / "pairs", n=4, size=16)
        data = SkillDataset(root / "skill")
        g = torch.Generator().manual_seed(5)
        for i in range(4):
            data.append(["a red square", "a blue circle"][i % 2], i, i, torch.rand(16, 16, 3, generator=g), True)
        print("| family | " + " | ".join(METHODS) + " |")
        print("|---" * (len(METHODS) + 1) + "|")
        for family in args.families.split(","):
            builders[family](root / family)
            cells = [f"{seconds_per_step(root, family, m, args.steps):.2f}" for m in METHODS]
            print(f"| {family} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
