"""Merge and inspect LoRA files.

  python -m comfy_poe.lora merge a.safetensors:1.0 b.safetensors:0.5 --method concat --out merged.safetensors
  python -m comfy_poe.lora inspect a.safetensors
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from ..fileio import atomic_write_text, check_output_file
from .describe import describe_lora, format_description
from .io import PICKLE_SUFFIXES, LoraFileError, check_overwrite, load_lora_file
from .merge import DTYPES, METHODS, LoraInput, MergeError, merge_loras, parse_block_weights, save_merge


LORA_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES


def parse_input_spec(spec: str) -> tuple[str, float]:
    """FILE[:WEIGHT] -> (path, weight).  A file that exists under the whole spec wins (names may contain
    ':'); a suffix after a LoRA file name (``a.safetensors:-x``, ``a.safetensors:nan``) must be a finite
    number, else LoraFileError("bad weight"); any other trailing ':x' stays part of the path."""
    if os.path.isfile(spec):
        return spec, 1.0
    path, sep, weight = spec.rpartition(":")
    if sep and path:
        try:
            value = float(weight)
        except ValueError:
            value = None
        if value is not None and math.isfinite(value):
            return path, value
        if value is not None or path.lower().endswith(LORA_SUFFIXES) or os.path.isfile(path):
            raise LoraFileError(f"{spec}: bad weight {weight!r} after ':' — write FILE:WEIGHT with a finite "
                                "number, e.g. a.safetensors:0.5 or a.safetensors:-1")
    return spec, 1.0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m comfy_poe.lora", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge LoRAs (any rank / key format) into one file")
    m.add_argument("inputs", nargs="+", metavar="FILE[:WEIGHT]", help="LoRA .safetensors, optional :weight")
    m.add_argument("--method", choices=METHODS, default="concat",
                   help="concat = exact (rank = sum of ranks); svd = exact sum compressed to --rank; "
                        "arithmetic/ties/dare/dare_ties = dense merges re-factorised to --rank")
    m.add_argument("--rank", type=_nonnegative_int, default=0, help="target rank for svd and dense methods (0 = sum of input ranks)")
    m.add_argument("--density", type=_density, default=0.5, help="fraction kept by ties / dare (0 < d <= 1)")
    m.add_argument("--seed", type=int, default=0, help="seed of dare's random drop")
    m.add_argument("--block-weights", default="", help="PATTERN=WEIGHT list, e.g. 'down_blocks_0=0.5,te1:=0'")
    m.add_argument("--format", dest="key_format", choices=("auto", "kohya", "native"), default="auto",
                   help="key spelling of the output (auto: one the inputs used that ComfyUI loads)")
    m.add_argument("--dtype", choices=tuple(DTYPES), default="fp16", help="storage dtype of the factors")
    m.add_argument("--out", required=True, help="output .safetensors path")
    m.add_argument("--force", action="store_true", help="overwrite --out even if comfy-poe did not write it")
    m.add_argument("--allow-nonfinite", action="store_true",
                   help="merge inputs whose factors or alphas hold NaN/inf (refused by default: the merge would be NaN)")
    m.add_argument("--strict", action="store_true", help="fail if any input key cannot be merged")
    m.add_argument("--report", default=None, help="write the text report here ('-' = stdout, default: stdout)")
    i = sub.add_parser("inspect", help="show keys, formats, ranks and size of LoRA files")
    i.add_argument("files", nargs="+")
    i.add_argument("--json", action="store_true", help="print JSON")
    return ap


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = sum of the input ranks), got {text}")
    return value


def _density(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def check_merge_args(args) -> None:
    """Every merge option that can be checked without reading a LoRA: refused before any work."""
    check_output_file(args.out, "--out")
    if not args.out.lower().endswith(".safetensors"):
        raise LoraFileError(f"--out must end in .safetensors, got {args.out}")
    check_overwrite(Path(args.out), args.force)
    if args.report and args.report != "-":
        check_output_file(args.report, "--report")
    parse_block_weights(args.block_weights)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            infos = [describe_lora(load_lora_file(f)) for f in args.files]
            print(json.dumps(infos, indent=2) if args.json else "\n\n".join(map(format_description, infos)))
            return 0
        check_merge_args(args)
        specs = [parse_input_spec(s) for s in args.inputs]  # every FILE:WEIGHT checked before any file is read
        inputs = [LoraInput.from_file(p, w, allow_nonfinite=args.allow_nonfinite) for p, w in specs]
        if args.strict and (skipped := {i.name: i.parsed.skipped for i in inputs if i.parsed.skipped}):
            raise MergeError("--strict: keys that cannot be merged: " + json.dumps(skipped, indent=1)[:2000])
        result = merge_loras(inputs, args.method, args.rank, seed=args.seed, density=args.density,
                             block_weights=args.block_weights, key_format=args.key_format, dtype=args.dtype)
        path = save_merge(result, args.out, overwrite=args.force)
        report = result.report() + f"\nwritten: {path}"
        if args.report and args.report != "-":
            atomic_write_text(args.report, report + "\n")
        else:
            print(report)
        return 0
    except (ValueError, OSError) as e:  # LoraFileError, MergeError, OutputPathError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
