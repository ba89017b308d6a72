"""Readable figures of the digits demo (PIL only): labelled sample grids and the one-page summary.

A grid has a title (task, method, key metrics) and a label under every cell — ``target/judged`` class,
green when the evaluator's verdict is on target, red when not — and its cells in the same order for every
method (:func:`display_order`), so two methods' grids compare cell by cell. The summary draws, per task,
one bar chart per metric with a bar per method.
"""
from __future__ import annotations

import math
import textwrap
from typing import Optional, Sequence

import torch

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
GOOD = (0, 120, 40)
BAD = (200, 30, 30)
MUTED = (110, 110, 110)
BAR = (70, 110, 180)
BAR_FK = (220, 120, 20)
BAR_REFERENCE = (150, 150, 150)


def font(size: int = 13):
    """Pillow's embedded scalable font (Pillow >= 10.1), else its small bitmap font."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def text_width(draw, text: str, fnt) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=fnt)
    return right - left


def display_order(key: Sequence[int], limit: int = 100) -> list[int]:
    """Indices of the cells to show: the first ``limit`` samples, stably sorted by ``key`` (target class,
    or judged class in task 1). Outputs are i.i.d. given their target, so every method's grid shows
    the same targets in the same cells (at the demo's defaults: row r = target r)."""
    first = list(range(min(limit, len(key))))
    return sorted(first, key=lambda i: key[i])


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) in [-1, 1] -> (N, H, W) uint8."""
    return ((x[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def labelled_grid(samples: torch.Tensor, labels: Sequence[str], ok: Sequence[Optional[bool]],
                  title: Sequence[str], columns: int = 10, scale: int = 5, pad: int = 4):
    """A PIL RGB image: title lines, then the samples (N, 1, H, W) in [-1, 1] in rows of ``columns``,
    each with its label below (green: ok, red: not ok, grey: None)."""
    from PIL import Image, ImageDraw

    n, _, h, w = samples.shape
    cell_w, cell_h = w * scale, h * scale
    label_font, title_font = font(11), font(13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_h = 14
    line_h = 18
    cols = max(1, min(columns, n))
    rows = max(1, math.ceil(n / cols))
    step_w = max(cell_w, max((text_width(probe, s, label_font) for s in labels), default=0)) + pad
    grid_w = cols * step_w + pad
    title_w = max((text_width(probe, s, title_font) for s in title), default=0) + 2 * pad
    width = max(grid_w, title_w)
    top = pad + line_h * len(title) + pad
    height = top + rows * (cell_h + label_h + pad) + pad
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for k, line in enumerate(title):
        draw.text((pad, pad + k * line_h), line, fill=INK if k == 0 else MUTED, font=title_font)
    pix = to_pixels(samples)
    x0 = (width - grid_w) // 2 + pad
    for i in range(n):
        r, c = divmod(i, cols)
        x = x0 + c * step_w
        y = top + r * (cell_h + label_h + pad)
        cell = Image.fromarray(pix[i].numpy(), mode="L").resize((cell_w, cell_h), Image.NEAREST)
        image.paste(cell.convert("RGB"), (x, y))
        colour = MUTED if ok[i] is None else GOOD if ok[i] else BAD
        tw = text_width(draw, labels[i], label_font)
        draw.text((x + (cell_w - tw) // 2, y + cell_h + 1), labels[i], fill=colour, font=label_font)
    return image


def _bar_colour(method: str):
    return BAR_REFERENCE if method == "reference" else BAR_FK if method.startswith("FK-SMC") else BAR


def summary_figure(rows: Sequence[dict], methods: Sequence[str], note: str = ""):
    """One PIL image: per task (``rows``: dicts with ``title`` and ``metrics`` = [(name, better, {method:
    value})], optional ``notes``: text for the row's empty panels) a row of bar charts, one bar per method;
    better is "higher" or "lower"."""
    from PIL import Image, ImageDraw

    pad, bar_h, gap = 8, 14, 4
    name_w, panel_w = 110, 200
    head_font, text_font, small_font = font(15), font(12), font(11)
    n_panels = max(len(r["metrics"]) for r in rows)
    panel_h = 20 + len(methods) * (bar_h + gap)
    row_h = 22 + panel_h + pad
    header = 2 * 20 + pad
    width = pad + name_w + n_panels * (panel_w + pad) + pad
    height = header + len(rows) * row_h + (18 if note else 0) + pad
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((pad, pad), "comfy-poe digits demo: every method at the same model-evaluation budget",
              fill=INK, font=head_font)
    draw.text((pad, pad + 20), "orange = FK-SMC (this pack), blue = baselines, grey = the conditional model "
              "sampled directly (what a perfect composition gives)", fill=MUTED, font=small_font)
    for r_index, row in enumerate(rows):
        y0 = header + r_index * row_h
        draw.text((pad, y0), row["title"], fill=INK, font=text_font)
        ybars = y0 + 22 + 20
        for m_index, method in enumerate(methods):
            y = ybars + m_index * (bar_h + gap)
            draw.text((pad, y), method, fill=INK, font=small_font)
        for p_index, (name, better, values) in enumerate(row["metrics"]):
            x0 = pad + name_w + p_index * (panel_w + pad)
            draw.text((x0, y0 + 22), f"{name} ({better} = better)", fill=MUTED, font=small_font)
            finite = [v for v in values.values() if v is not None and math.isfinite(v)]
            top = max(finite, default=1.0) or 1.0
            span = panel_w - 44
            for m_index, method in enumerate(methods):
                y = ybars + m_index * (bar_h + gap)
                value = values.get(method)
                if value is None or not math.isfinite(value):
                    draw.text((x0, y), "-", fill=MUTED, font=small_font)
                    continue
                length = max(1, round(span * value / top)) if value > 0 else 1
                draw.rectangle((x0, y + 1, x0 + length, y + bar_h - 1), fill=_bar_colour(method))
                text = f"{value:.0%}" if row.get("percent", {}).get(name) else f"{value:.2f}" if top < 10 else f"{value:.1f}"
                draw.text((x0 + length + 3, y), text, fill=INK, font=small_font)
        free = n_panels - len(row["metrics"])
        if free and row.get("notes"):  # explanations in the row's empty panels
            x0 = pad + name_w + len(row["metrics"]) * (panel_w + pad) + pad
            width_chars = max(20, (free * (panel_w + pad) - 2 * pad) // 6)
            lines = [line for text in row["notes"] for line in textwrap.wrap(text, width_chars)]
            for k, line in enumerate(lines[: (panel_h + 20) // 15]):
                draw.text((x0, y0 + 22 + k * 15), line, fill=MUTED, font=small_font)
    if note:
        draw.text((pad, height - pad - 16), note, fill=MUTED, font=small_font)
    return image
