"""Tiny line charts rendered with PIL (no matplotlib): SMC diagnostics and training curves."""
from __future__ import annotations

import math

import numpy as np
import torch

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def plot_series(series: dict, title: str = "", width: int = 384, height: int = 192) -> torch.Tensor:
    """Draw named series (lists of floats; NaN/inf skipped) on one chart.

    Returns a ComfyUI IMAGE tensor (1, height, width, 3) in [0, 1]. Each series is scaled to its own
    min-max so traces of different units share the chart; the legend states each range.
    """
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 8, width - 8, 18, height - 8 - 12 * len(series)
    draw.rectangle([left, top, right, bottom], outline=(200, 200, 200))
    if title:
        draw.text((left, 2), title, fill=(0, 0, 0))
    for k, (name, values) in enumerate(series.items()):
        vals = [float(v) for v in values]
        finite = [v for v in vals if math.isfinite(v)]
        color = PALETTE[k % len(PALETTE)]
        label = f"{name}: " + (f"{min(finite):.3g} .. {max(finite):.3g}" if finite else "no data")
        draw.text((left, bottom + 2 + 12 * k), label, fill=color)
        if len(finite) < 2:
            continue
        lo, hi = min(finite), max(finite)
        span = hi - lo or 1.0
        pts = [
            (left + (right - left) * i / max(len(vals) - 1, 1), bottom - (bottom - top) * (v - lo) / span)
            for i, v in enumerate(vals) if math.isfinite(v)
        ]
        draw.line(pts, fill=color, width=2)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
