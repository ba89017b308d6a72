"""Command line: ``python -m comfy_poe.lora merge a.safetensors:1.0 b.safetensors:0.5 --method concat
--out merged.safetensors`` and ``python -m comfy_poe.lora inspect a.safetensors``."""
from __future__ import annotations

import argparse
import json
import sys

from .describe import describe_lora, format_description
from .io import LoraFileError, load_lora_file
from .merge import DTYPES, METHODS, LoraInput, MergeError, merge_loras, save_merge


def parse_input_spec(spec: str) -> tuple[str, float]:
    """``path[:weight]`` → (path, weight); a trailing ``:x`` that is not a number stays part of the path."""
    path, sep, weight = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return spec, 1.0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m comfy_poe.lora", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge LoRAs (any rank / key format) into one file")
    m.add_argument("inputs", nargs="+", metavar="FILE[:WEIGHT]", help="LoRA .safetensors, optional :weight")
    m.add_argument("--method", choices=METHODS, default="concat",
                   help="concat = exact (rank = sum of ranks); svd = exact sum compressed to --rank; "
                        "arithmetic/ties/dare/dare_ties = dense merges re-factorised to --rank")
    m.add_argument("--rank", type=int, default=0, help="target rank for svd and dense methods (0 = sum of input ranks)")
    m.add_argument("--density", type=float, default=0.5, help="fraction kept by ties / dare (0 < d <= 1)")
    m.add_argument("--seed", type=int, default=0, help="seed of dare's random drop")
    m.add_argument("--block-weights", default="", help="PATTERN=WEIGHT list, e.g. 'down_blocks_0=0.5,te1:=0'")
    m.add_argument("--format", dest="key_format", choices=("auto", "kohya", "native"), default="auto",
                   help="key spelling of the output (auto: one the inputs used that ComfyUI loads)")
    m.add_argument("--dtype", choices=tuple(DTYPES), default="fp16", help="storage dtype of the factors")
    m.add_argument("--out", required=True, help="output .safetensors path")
    m.add_argument("--force", action="store_true", help="overwrite --out even if comfy-poe did not write it")
    m.add_argument("--strict", action="store_true", help="fail if any input key cannot be merged")
    m.add_argument("--report", default=None, help="write the text report here ('-' = stdout, default: stdout)")
    i = sub.add_parser("inspect", help="show keys, formats, ranks and size of LoRA files")
    i.add_argument("files", nargs="+")
    i.add_argument("--json", action="store_true", help="print JSON")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            infos = [describe_lora(load_lora_file(f)) for f in args.files]
            print(json.dumps(infos, indent=2) if args.json else "\n\n".join(map(format_description, infos)))
            return 0
        if not args.out.lower().endswith(".safetensors"):
            raise LoraFileError(f"--out must end in .safetensors, got {args.out}")
        inputs = [LoraInput.from_file(p, w) for p, w in map(parse_input_spec, args.inputs)]
        if args.strict and (skipped := {i.name: i.parsed.skipped for i in inputs if i.parsed.skipped}):
            raise MergeError("--strict: keys that cannot be merged: " + json.dumps(skipped, indent=1)[:2000])
        result = merge_loras(inputs, args.method, args.rank, seed=args.seed, density=args.density,
                             block_weights=args.block_weights, key_format=args.key_format, dtype=args.dtype)
        path = save_merge(result, args.out, overwrite=args.force)
        report = result.report() + f"\nwritten: {path}"
        if args.report and args.report != "-":
            with open(args.report, "w", encoding="utf-8") as f:
                f.write(report + "\n")
        else:
            print(report)
        return 0
    except (LoraFileError, MergeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
