"""Visual prompts drawn onto a VLM judge's copy of the images (Dual-Process, Luo et al. 2025, §4).

Controls that words express badly become pictures the judge can compare against: a palette strip
("do the colours match the palette at the bottom?"), red guide lines (horizon height, line weight)
and labelled points (relative depth: "is point A closer than point B?"). Every function maps IMAGE
tensors (N, H, W, C) in [0, 1] to a NEW tensor with torch ops (``torch.where``): the input is never
modified, and gradients still flow through every pixel that is not painted over.
"""
from __future__ import annotations

import functools
import re
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Overlay = Callable[[torch.Tensor], torch.Tensor]

NAMED_COLOURS = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 0.8, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0), "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0),
    "orange": (1.0, 0.5, 0.0), "purple": (0.5, 0.0, 0.5), "gray": (0.5, 0.5, 0.5), "grey": (0.5, 0.5, 0.5),
}
# 3×5 bitmap glyphs (rows top to bottom) for point labels.
GLYPHS = dict(zip(
    "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "111101101101111 010110010010111 111001111100111 111001111001111 101101111001001 111100111001111 "
    "111100111101111 111001001001001 111101111101111 111101111001111 010101111101101 110101110101110 "
    "011100100100011 110101101101110 111100110100111 111100110100100 011100101101011 101101111101101 "
    "111010010010111 001001001101010 101101110101101 100100100100111 101111111101101 110101101101101 "
    "010101101101010 110101110100100 010101101110011 110101110101101 011100010001110 111010010010010 "
    "101101101101111 101101101101010 101101111111101 101101010101101 101101010010010 111001010100111".split(),
))


def parse_colour(text: str) -> tuple[float, float, float]:
    """'#rrggbb', 'rrggbb' or a colour name → RGB in [0, 1]."""
    key = text.strip().lower()
    if key in NAMED_COLOURS:
        return NAMED_COLOURS[key]
    hexa = key.lstrip("#")
    if re.fullmatch(r"[0-9a-f]{6}", hexa):
        return tuple(int(hexa[i:i + 2], 16) / 255.0 for i in (0, 2, 4))
    raise ValueError(f"colour {text!r}: use #rrggbb or one of {', '.join(sorted(NAMED_COLOURS))}")


def paint(images: torch.Tensor, mask: torch.Tensor, colour) -> torch.Tensor:
    """New tensor with the (H, W) boolean ``mask`` painted in ``colour`` (RGB; an alpha channel is kept)."""
    colour = torch.as_tensor(colour, dtype=images.dtype, device=images.device)
    if images.shape[-1] == 4:
        colour = torch.cat([colour, images.new_ones(1)])
    return torch.where(mask.to(images.device)[None, :, :, None], colour, images)


def palette_strip(images: torch.Tensor, colours: Sequence, fraction: float = 0.12) -> torch.Tensor:
    """Equal-width blocks of ``colours`` across the bottom ``fraction`` of the image height."""
    if not colours:
        raise ValueError("palette strip: give at least one colour")
    _, h, w, _ = images.shape
    rows = max(1, round(h * fraction))
    out = images
    edges = [round(i * w / len(colours)) for i in range(len(colours) + 1)]
    for colour, left, right in zip(colours, edges[:-1], edges[1:]):
        mask = torch.zeros(h, w, dtype=torch.bool)
        mask[h - rows:, left:right] = True
        out = paint(out, mask, colour)
    return out


def guide_lines(images: torch.Tensor, horizontal: Sequence[float] = (), vertical: Sequence[float] = (),
                thickness: int = 0, colour=(1.0, 0.0, 0.0)) -> torch.Tensor:
    """Lines at fractions of the height (horizontal, from the top) and width (vertical, from the left)."""
    _, h, w, _ = images.shape
    thickness = thickness or max(1, round(min(h, w) / 128))
    mask = torch.zeros(h, w, dtype=torch.bool)
    for f in horizontal:
        y = min(h - 1, max(0, round(float(f) * (h - 1))))
        mask[max(0, y - thickness // 2): y - thickness // 2 + thickness, :] = True
    for f in vertical:
        x = min(w - 1, max(0, round(float(f) * (w - 1))))
        mask[:, max(0, x - thickness // 2): x - thickness // 2 + thickness] = True
    return paint(images, mask, colour)


def glyph_mask(label: str, scale: int) -> torch.Tensor:
    """(5·scale, (4·len − 1)·scale) boolean bitmap of ``label`` (letters and digits)."""
    columns = []
    for i, char in enumerate(label.upper()):
        if char not in GLYPHS:
            raise ValueError(f"point label {label!r}: only letters and digits can be drawn")
        if i:
            columns.append(torch.zeros(5, 1, dtype=torch.bool))
        bits = torch.tensor([c == "1" for c in GLYPHS[char]]).reshape(5, 3)
        columns.append(bits)
    bitmap = torch.cat(columns, dim=1)
    return bitmap.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def labelled_points(images: torch.Tensor, points: Sequence[tuple[float, float, str]], radius: int = 0,
                    colour=(1.0, 0.0, 0.0)) -> torch.Tensor:
    """Filled dots at (x, y) fractions, each with its label in white on a black box beside it."""
    _, h, w, _ = images.shape
    radius = radius or max(2, round(min(h, w) / 64))
    scale = max(1, radius // 2)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    out = images
    for x_frac, y_frac, label in points:
        cx, cy = float(x_frac) * (w - 1), float(y_frac) * (h - 1)
        out = paint(out, (xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2, colour)
        text = glyph_mask(label, scale)
        box = F.pad(text, (scale, scale, scale, scale))
        top = int(min(max(0, round(cy - box.shape[0] / 2)), h - box.shape[0]))
        left = int(min(max(0, round(cx + radius + scale)), w - box.shape[1]))
        if top < 0 or left < 0:
            raise ValueError(f"point label {label!r} does not fit into a {w}x{h} image")
        region = torch.zeros(h, w, dtype=torch.bool)
        region[top:top + box.shape[0], left:left + box.shape[1]] = True
        out = paint(out, region, (0.0, 0.0, 0.0))
        glyph = torch.zeros(h, w, dtype=torch.bool)
        glyph[top:top + box.shape[0], left:left + box.shape[1]] = box
        out = paint(out, glyph, (1.0, 1.0, 1.0))
    return out


def apply_overlays(images: torch.Tensor, overlays: Sequence[Overlay]) -> torch.Tensor:
    """The judge's view: overlays applied in order (the caller's tensor is untouched)."""
    for overlay in overlays:
        images = overlay(images)
    return images


def parse_visual_prompt(text: str) -> list[Overlay]:
    """Overlays from a small text format, one directive per line (or separated by ';'):

    ``palette: #ff0000 #00aa00 blue`` · ``hline: 0.33 0.66`` · ``vline: 0.5`` ·
    ``point: A 0.25 0.6`` (label, x and y as fractions of width and height).
    """
    overlays: list[Overlay] = []
    points: list[tuple[float, float, str]] = []
    for raw in re.split(r"[;\n]", str(text or "")):
        line = raw.strip()
        if not line or line.startswith("#") and ":" not in line:
            continue
        kind, _, args = line.partition(":")
        kind, values = kind.strip().lower(), args.split()
        try:
            if kind == "palette":
                overlays.append(functools.partial(palette_strip, colours=[parse_colour(v) for v in values]))
            elif kind in ("hline", "hlines"):
                overlays.append(functools.partial(guide_lines, horizontal=[float(v) for v in values]))
            elif kind in ("vline", "vlines"):
                overlays.append(functools.partial(guide_lines, vertical=[float(v) for v in values]))
            elif kind == "point" and len(values) == 3:
                points.append((float(values[1]), float(values[2]), values[0]))
            else:
                raise ValueError("unknown directive")
        except ValueError as exc:
            raise ValueError(
                f"visual prompt line {line!r}: {exc}; use 'palette: #rrggbb ...', 'hline: 0.5', 'vline: 0.5' "
                "or 'point: A 0.25 0.6'"
            ) from None
    if points:
        overlays.append(functools.partial(labelled_points, points=points))
    return overlays
