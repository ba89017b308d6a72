"""Model-free discriminative experts: colour palette, image statistics, region constraints, proximity.

Each factory returns a :class:`DiscriminativeExpert` whose ``fn`` maps a batch to a (N,) tensor of
log-potentials r(x); the sampler multiplies the target by exp(weight * r(x)) (reference poe_smc.md,
"Target": the discriminative experts exp(γ_j r_j(x))). All are plain differentiable torch (usable
for gradient twisting), finite for any input in range, and evaluated per image of the batch.

Pixel judges receive ComfyUI IMAGE batches (N, H, W, C) in [0, 1] (C = 3 or 4; alpha is ignored);
latent judges receive the sampler's x0 prediction (N, C, H, W) in the model's latent coordinates.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from .base import LATENT, PIXEL, DiscriminativeExpert

# ITU-R BT.601 luma weights: what PIL's convert("L") uses, so "brightness" matches common tools.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
REGION_MODES = ("dark", "bright", "empty")
PROXIMITY_SPACES = (PIXEL, LATENT)
# Keeps HSV saturation's division finite (and its gradient bounded) on near-black pixels.
SATURATION_EPS = 1e-2

_HEX_COLOR = re.compile(r"#?([0-9a-fA-F]{6}|[0-9a-fA-F]{3})")


# --------------------------------------------------------------------------- parsing / checks


def _constant(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) detached copy: ComfyUI builds node inputs under inference_mode, and
    inference tensors cannot be saved for backward when a judge is differentiated (gradient twisting)."""
    with torch.inference_mode(False):
        return t.detach().clone()


def parse_hex_colors(text: str, name: str = "colors") -> torch.Tensor:
    """'#ff0000, #0f0 00aaff' -> (K, 3) float tensor in [0, 1]; separators: commas, spaces, newlines, ';'."""
    tokens = [t for t in re.split(r"[\s,;]+", str(text)) if t]
    if not tokens:
        raise ValueError(f"{name}: give at least one hex colour such as '#ff0000, #00ff00'")
    colors = []
    for token in tokens:
        match = _HEX_COLOR.fullmatch(token)
        if match is None:
            raise ValueError(f"{name}: {token!r} is not a hex colour; use #rrggbb or #rgb, e.g. '#ff0000, #0f0'")
        digits = match.group(1)
        if len(digits) == 3:
            digits = "".join(c * 2 for c in digits)
        colors.append([int(digits[i:i + 2], 16) / 255.0 for i in (0, 2, 4)])
    return torch.tensor(colors, dtype=torch.float32)


def _as_colors(colors, name: str) -> torch.Tensor:
    colors = parse_hex_colors(colors, name) if isinstance(colors, str) else torch.as_tensor(colors, dtype=torch.float32)
    if colors.ndim == 1 and colors.shape[0] == 3:
        colors = colors[None]
    if colors.ndim != 2 or colors.shape[1] != 3 or colors.shape[0] == 0:
        raise ValueError(f"{name}: expected (K, 3) RGB colours, got shape {tuple(colors.shape)}")
    if not torch.isfinite(colors).all() or colors.min() < 0 or colors.max() > 1:
        raise ValueError(f"{name}: colour components must lie in [0, 1]")
    return _constant(colors)


def _positive(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value


def _check_image(x: torch.Tensor, judge: str) -> torch.Tensor:
    """RGB part of an IMAGE batch, as float32 (or float64) for stable sums."""
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{judge}: expected an IMAGE batch (N, H, W, C) with C in 1/3/4, got {tuple(x.shape)}")
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:-1], 3)
    x = x[..., :3]
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _as_mask(mask, name: str = "mask") -> torch.Tensor:
    """(H, W) float mask in [0, 1]; a ComfyUI MASK batch of one (1, H, W) is accepted."""
    mask = torch.as_tensor(mask).detach().float()
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"{name}: expected one (H, W) mask, got shape {tuple(mask.shape)}")
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ValueError(f"{name}: values must lie in [0, 1]")
    if mask.sum() <= 0:
        raise ValueError(f"{name} is empty (all zero): it selects no pixels to constrain")
    return _constant(mask)


def resize_mask(mask: torch.Tensor, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """(H, W) mask bilinearly resized to (height, width), on ``like``'s device and dtype."""
    mask = mask.to(device=like.device, dtype=like.dtype)
    if tuple(mask.shape) != (height, width):
        mask = F.interpolate(mask[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    return mask.clamp(0, 1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_p m_p v_p / Σ_p m_p per image; values (N, H, W), mask (H, W)."""
    return (values * mask).sum(dim=(1, 2)) / mask.sum().clamp_min(1e-12)


def luma(x: torch.Tensor) -> torch.Tensor:
    """BT.601 luma Y = 0.299 R + 0.587 G + 0.114 B of an RGB (..., 3) tensor."""
    return x @ torch.tensor(LUMA_WEIGHTS, dtype=x.dtype, device=x.device)


def hsv_saturation(x: torch.Tensor) -> torch.Tensor:
    """HSV saturation (max - min) / max per pixel, with max clamped >= 0 and SATURATION_EPS added."""
    top, bottom = x.max(dim=-1).values, x.min(dim=-1).values
    return (top - bottom) / (top.clamp_min(0) + SATURATION_EPS)


def image_statistics(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image brightness (mean luma), contrast (RMS contrast = std of luma), saturation (mean HSV S)."""
    x = _check_image(x, "image_statistics")
    y = luma(x).flatten(1)
    return {
        "brightness": y.mean(1),
        # population std via the mean square: finite gradient (sqrt of clamp) even on a flat image
        "contrast": ((y - y.mean(1, keepdim=True)) ** 2).mean(1).clamp_min(1e-12).sqrt(),
        "saturation": hsv_saturation(x).flatten(1).mean(1),
    }


# --------------------------------------------------------------------------- judges


def palette_judge(colors, weight: float = 1.0, sharpness: float = 20.0, name: str = "palette") -> DiscriminativeExpert:
    """Pixels should be drawn from a colour palette (pixel space).

    Each pixel x_p is scored under an equal-weight mixture of isotropic Gaussians at the palette colours
    c_1..c_K (variance 1 / (2·sharpness), normalising constant dropped):

        r(x) = mean_p log( (1/K) Σ_k exp(−sharpness · ‖x_p − c_k‖²) )  ≤ 0

    A soft nearest-colour assignment: smooth and differentiable everywhere, close to
    −sharpness · mean_p min_k ‖x_p − c_k‖² − log K when colours are well separated, so it is (near)
    maximal when every pixel sits on a palette colour. ``colors``: (K, 3) in [0, 1] or a hex string.
    """
    palette = _as_colors(colors, "colors")
    sharpness = _positive(sharpness, "sharpness")
    log_k = math.log(palette.shape[0])

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = _check_image(x, name)
        c = palette.to(device=x.device, dtype=x.dtype)
        sq = ((x[..., None, :] - c) ** 2).sum(-1)  # (N, H, W, K)
        return (torch.logsumexp(-sharpness * sq, dim=-1) - log_k).flatten(1).mean(1)

    info = {"colors": palette.tolist(), "sharpness": sharpness}
    return DiscriminativeExpert(fn, weight=float(weight), space=PIXEL, differentiable=True, name=name, info=info)


def statistics_judge(brightness: float | None = None, contrast: float | None = None,
                     saturation: float | None = None, tolerance: float = 0.1, weight: float = 1.0,
                     name: str = "image_statistics") -> DiscriminativeExpert:
    """Global image statistics near targets (pixel space).

        r(x) = Σ_{s given} −½ ((stat_s(x) − target_s) / tolerance)²

    brightness = mean BT.601 luma, contrast = RMS contrast (std of luma), saturation = mean HSV
    saturation, all in [0, 1] (see :func:`image_statistics`). A target of None is not constrained.
    """
    targets = {"brightness": brightness, "contrast": contrast, "saturation": saturation}
    targets = {k: float(v) for k, v in targets.items() if v is not None}
    if not targets:
        raise ValueError("statistics judge: set at least one target (brightness, contrast or saturation)")
    for key, value in targets.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{key} target must lie in [0, 1], got {value}")
    tolerance = _positive(tolerance, "tolerance")

    def fn(x: torch.Tensor) -> torch.Tensor:
        stats = image_statistics(_check_image(x, name))
        return sum(-0.5 * ((stats[k] - t) / tolerance) ** 2 for k, t in targets.items())

    info = {"targets": targets, "tolerance": tolerance}
    return DiscriminativeExpert(fn, weight=float(weight), space=PIXEL, differentiable=True, name=name, info=info)


def region_judge(mask, mode: str = "dark", weight: float = 1.0, tolerance: float = 0.1, fill_color=None,
                 name: str | None = None) -> DiscriminativeExpert:
    """A masked region should be dark, bright or empty (pixel space).

    m = ``mask`` bilinearly resized to the image, mean_m = mask-weighted mean over pixels, L = luma:
    - dark:   r = −mean_m( L_p² ) / (2·tolerance²)             (every pixel near black)
    - bright: r = −mean_m( (1 − L_p)² ) / (2·tolerance²)       (every pixel near white)
    - empty:  r = −mean_m( ‖x_p − f‖² ) / (2·tolerance²) with ``fill_color`` f, or without one
              r = −mean_m( ‖x_p − mean_m(x)‖² ) / (2·tolerance²) (flat: low colour variance).
    """
    if mode not in REGION_MODES:
        raise ValueError(f"mode must be one of {REGION_MODES}, got {mode!r}")
    base = _as_mask(mask)
    tolerance = _positive(tolerance, "tolerance")
    fill = None if fill_color is None else _as_colors(fill_color, "fill_color")[0]
    if fill is not None and mode != "empty":
        raise ValueError(f"fill_color only applies to mode 'empty', not {mode!r}")
    name = name or f"region_{mode}"

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = _check_image(x, name)
        m = resize_mask(base, x.shape[1], x.shape[2], x)
        if mode == "dark":
            dev = luma(x) ** 2
        elif mode == "bright":
            dev = (1 - luma(x)) ** 2
        else:
            if fill is not None:
                centre = fill.to(device=x.device, dtype=x.dtype)
            else:
                centre = (x * m[..., None]).sum(dim=(1, 2)) / m.sum().clamp_min(1e-12)
                centre = centre[:, None, None, :]
            dev = ((x - centre) ** 2).sum(-1)
        return -_masked_mean(dev, m) / (2 * tolerance**2)

    info = {"mode": mode, "tolerance": tolerance, "fill_color": None if fill is None else fill.tolist()}
    return DiscriminativeExpert(fn, weight=float(weight), space=PIXEL, differentiable=True, name=name, info=info)


def proximity_judge(reference, weight: float = 1.0, mask=None, space: str = PIXEL,
                    name: str = "proximity") -> DiscriminativeExpert:
    """Gaussian expert centred on a reference: the paper's graphics-engine / simulator expert.

        exp(weight · r(x)),  r(x) = −Σ_p m_p ‖x_p − c_p‖² / Σ_p m_p

    p runs over spatial positions, ‖·‖² sums over channels, m = ``mask`` bilinearly resized to the
    spatial size (all ones without a mask). So weight·r = −weight·mean‖x − c‖², i.e. a Gaussian
    N(c, 1/(2·weight)) on the masked positions, flat elsewhere.

    ``space="pixel"``: reference is an IMAGE (H, W, C) or (1 | N, H, W, C); ``space="latent"``: a latent
    (C, H, W) or (1 | N, C, H, W) in the sampler's latent coordinates, or a video latent (1 | N, C, T, H, W)
    (the mask then applies to every frame and r averages over frames). Shapes are checked at each call.
    """
    if space not in PROXIMITY_SPACES:
        raise ValueError(f"space must be one of {PROXIMITY_SPACES}, got {space!r}")
    ref = torch.as_tensor(reference).detach()
    if not ref.is_floating_point():
        raise ValueError(f"reference must be a float tensor, got {ref.dtype}")
    if ref.ndim == 3:
        ref = ref[None]
    if ref.ndim != 4 and not (space == LATENT and ref.ndim == 5):
        layout = "(N, H, W, C)" if space == PIXEL else "(N, C, H, W) or video (N, C, T, H, W)"
        raise ValueError(f"reference: expected a {space} batch {layout}, got shape {tuple(ref.shape)}")
    if not torch.isfinite(ref).all():
        raise ValueError("reference contains NaN or infinite values")
    ref = _constant(ref)
    base = None if mask is None else _as_mask(mask)
    channel_dim = -1 if space == PIXEL else 1

    def fn(x: torch.Tensor) -> torch.Tensor:
        if x.ndim != ref.ndim:
            raise ValueError(f"{name}: expected a {ref.ndim}-D {space} batch, got shape {tuple(x.shape)}")
        c = ref.to(device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
        if c.shape[1:] != x.shape[1:] or c.shape[0] not in (1, x.shape[0]):
            what = "image (N, H, W, C)" if space == PIXEL else "latent (N, C, H, W)"
            raise ValueError(
                f"{name}: reference {what} shape {tuple(c.shape)} does not match the samples {tuple(x.shape)}; "
                f"resize the reference to the generated size (batch 1 or {x.shape[0]})")
        sq = ((x - c) ** 2).sum(channel_dim)  # (N, H, W), video (N, T, H, W)
        if base is None:
            return sq.flatten(1).mean(1).neg()
        m = resize_mask(base, sq.shape[-2], sq.shape[-1], sq)
        if sq.ndim == 4:  # video: the same mask on every frame, mean over frames
            return torch.stack([_masked_mean(sq[:, t], m) for t in range(sq.shape[1])], 1).mean(1).neg()
        return _masked_mean(sq, m).neg()

    info = {"space": space, "masked": base is not None, "reference_shape": tuple(ref.shape)}
    return DiscriminativeExpert(fn, weight=float(weight), space=space, differentiable=True, name=name, info=info)
