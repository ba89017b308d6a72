"""Human-readable summary of a LoRA file: formats, components, ranks, alphas, conv layers, skipped keys."""
from __future__ import annotations

from collections import Counter

from .formats import dotted_path, nonfinite_count, parse_state_dict
from .io import LoraFileData


def describe_lora(data: LoraFileData, max_modules: int = 40) -> dict:
    """Structured summary (JSON-friendly) of a loaded LoRA file."""
    # a damaged file is still described: its NaN/inf tensors are listed instead of refused
    parsed = parse_state_dict(data.tensors, f"LoRA file '{data.path.name}'", allow_nonfinite=True)
    nonfinite = {k: n for k, t in data.tensors.items() if (n := nonfinite_count(t))}
    modules = parsed.modules.values()
    dtypes = Counter(str(t.dtype).replace("torch.", "") for t in data.tensors.values())
    return {
        "file": data.path.name,
        "size_bytes": data.size,
        "sha256": data.sha256,
        "keys": len(data.tensors),
        "modules": len(parsed.modules),
        "formats": dict(Counter(m.name.scheme for m in modules)),
        "components": dict(Counter(m.name.component for m in modules)),
        "ranks": dict(sorted(Counter(m.rank for m in modules).items())),
        "alphas": dict(Counter("none" if m.alpha is None else f"{m.alpha:g}" for m in modules)),
        "conv_modules": sum(1 for m in modules if m.down.ndim > 2),
        "dtypes": dict(dtypes),
        "parameters": sum(t.numel() for t in data.tensors.values()),
        "skipped": parsed.skipped,
        "nonfinite": nonfinite,
        "metadata": {k: v for k, v in data.metadata.items() if len(v) <= 200},
        "module_list": [{"key": m.name.key, "path": dotted_path(m.name), "rank": m.rank,
                         "shape": list(m.weight_shape), "alpha": m.alpha}
                        for m in list(modules)[:max_modules]],
    }


def format_description(info: dict) -> str:
    lines = [f"{info['file']}: {info['size_bytes'] / 2**20:.2f} MiB, {info['keys']} keys, "
             f"{info['modules']} LoRA modules, {info['parameters']:,} parameters",
             f"formats: {info['formats']}   components: {info['components']}",
             f"ranks: {info['ranks']}   alphas: {info['alphas']}   conv (LoCon) modules: {info['conv_modules']}",
             f"dtypes: {info['dtypes']}   sha256: {info['sha256'][:16]}"]
    if info.get("nonfinite"):
        lines.append(f"DAMAGED: {len(info['nonfinite'])} tensors hold NaN/inf values (a merge refuses this file):")
        lines += [f"    {k}: {n} values" for k, n in list(info["nonfinite"].items())[:30]]
    if info["skipped"]:
        lines.append(f"NOT LoRA factors ({len(info['skipped'])} keys, a merge would not include them):")
        lines += [f"    {k}: {why}" for k, why in list(info["skipped"].items())[:30]]
    ss = {k: v for k, v in info["metadata"].items() if k.startswith("ss_") or k.startswith("modelspec.")}
    if ss:
        lines.append("metadata: " + ", ".join(f"{k}={v}" for k, v in list(ss.items())[:20]))
    lines.append("modules:")
    lines += [f"  {m['key']}  rank {m['rank']}  shape {tuple(m['shape'])}  alpha {m['alpha']}"
              + (f"  ({m['path']})" if m["path"] and m["path"] not in m["key"] else "")
              for m in info["module_list"]]
    if info["modules"] > len(info["module_list"]):
        lines.append(f"  ... and {info['modules'] - len(info['module_list'])} more")
    return "\n".join(lines)
