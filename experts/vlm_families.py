"""Per-family differentiable pixel path for VLM judges: decoded image tensor → the model's pixel inputs.

A VLM's processor works on PIL images, which cuts the autograd graph. Here the same steps are torch /
kornia ops on a (N, 3, H, W) tensor in [0, 1] (Dual-Process, Luo et al. 2025, §3: "the VLM input is a
differentiable function of the decoded image"):

1. resize (kornia, antialiased) to the size the processor would produce — :meth:`FamilySpec.target_size`;
2. normalise with the processor's mean / std;
3. lay the pixels out the way the family's vision tower expects — :meth:`FamilySpec.layout`
   (Qwen-VL: flattened 14/16-pixel patches + ``image_grid_thw``; Idefics2/3 and SmolVLM:
   (N, 1, 3, S, S) + ``pixel_attention_mask``; LLaVA-OneVision: base image + any-res tiles + ``image_sizes``;
   LLaVA, Gemma 3, PaliGemma: (N, 3, S, S)).

Token layout (how many image tokens, where) is left to the real processor, called once per prompt on
a blank image of the target size; at the target size its ``pixel_values`` equal :meth:`FamilySpec.pixels`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import kornia
import torch


def size_value(size, key, default=None):
    """Read ``key`` from a transformers size (a dict or a SizeDict)."""
    if size is None:
        return default
    if isinstance(size, dict):
        value = size.get(key, default)
    else:
        value = getattr(size, key, default)
    return default if value is None else value


def mean_std(image_processor) -> tuple[list[float], list[float]]:
    mean = image_processor.image_mean if getattr(image_processor, "do_normalize", True) else [0.0, 0.0, 0.0]
    std = image_processor.image_std if getattr(image_processor, "do_normalize", True) else [1.0, 1.0, 1.0]
    mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(m) for m in mean]
    std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(s) for s in std]
    return mean, std


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bicubic resize of (N, C, H, W) (the processors resample with PIL bicubic)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return kornia.geometry.transform.resize(x, size, interpolation="bicubic", antialias=True, align_corners=False)


def normalise(x: torch.Tensor, image_processor) -> torch.Tensor:
    mean, std = mean_std(image_processor)
    x = x.contiguous()  # kornia < 0.7.1 views the input, which fails on permuted (NHWC -> NCHW) images
    return kornia.enhance.normalize(x, torch.tensor(mean, dtype=x.dtype, device=x.device),
                                    torch.tensor(std, dtype=x.dtype, device=x.device))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL target size: both sides multiples of ``factor``, area within [min_pixels, max_pixels],
    aspect ratio kept (the rule of Qwen2VLImageProcessor)."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qwen_patchify(x: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """(N, C, H, W) normalised → (N·gh·gw, C·T·P·P) patches in Qwen-VL's order (merge blocks contiguous).

    The still image is repeated ``temporal`` times along time, as the processor does for one frame.
    """
    n, c, h, w = x.shape
    gh, gw = h // patch, w // patch
    x = x.unsqueeze(1).expand(n, temporal, c, h, w)
    x = x.reshape(n, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(n * gh * gw, c * temporal * patch * patch)


def anyres_tiles(x: torch.Tensor, image_processor, tile: int) -> torch.Tensor:
    """LLaVA-OneVision any-resolution input for (N, C, S, S) in [0, 1]: [base image, tiles...] along dim 1.

    Tiles: fit into the best grid pin-point keeping aspect, pad with black centred, cut S×S tiles
    row-major (LlavaOnevisionImageProcessor.get_image_patches).
    """
    from transformers.image_processing_utils import select_best_resolution

    n, c, h, w = x.shape
    best_h, best_w = select_best_resolution((h, w), image_processor.image_grid_pinpoints)
    scale = min(best_w / w, best_h / h)
    new_h, new_w = min(math.ceil(h * scale), best_h), min(math.ceil(w * scale), best_w)
    fitted = resize(x, (new_h, new_w))
    pad_y, pad_x = (best_h - new_h) // 2, (best_w - new_w) // 2
    padded = torch.nn.functional.pad(fitted, (pad_x, best_w - new_w - pad_x, pad_y, best_h - new_h - pad_y))
    tiles = padded.reshape(n, c, best_h // tile, tile, best_w // tile, tile).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(n, -1, c, tile, tile)
    return torch.cat([resize(x, (tile, tile)).unsqueeze(1), tiles], dim=1)


@dataclass(frozen=True)
class FamilySpec:
    """How one VLM family turns an image tensor into model inputs.

    ``kind`` selects the pixel layout; ``processor_kwargs`` go to the processor's blank-image call
    (e.g. image splitting off, so one image is one tile); ``answer_token_type`` is the token_type_id
    of appended answer tokens (PaliGemma marks its suffix with 1).
    """

    name: str
    model_types: tuple[str, ...]
    kind: str
    processor_kwargs: dict = field(default_factory=dict)
    answer_token_type: int = 0
    uses_chat_template: bool = True

    def target_size(self, image_processor, height: int, width: int) -> tuple[int, int]:
        ip = image_processor
        if self.kind == "qwen":
            size = ip.size
            min_pixels = size_value(size, "shortest_edge", getattr(ip, "min_pixels", None) or 56 * 56)
            max_pixels = size_value(size, "longest_edge", getattr(ip, "max_pixels", None) or 28 * 28 * 1280)
            return smart_resize(height, width, ip.patch_size * ip.merge_size, min_pixels, max_pixels)
        if self.kind == "idefics3":
            s = size_value(ip.max_image_size, "longest_edge")
            return s, s
        if self.kind == "idefics2":
            s = size_value(ip.size, "shortest_edge")
            return s, s
        crop = getattr(ip, "crop_size", None) if getattr(ip, "do_center_crop", False) else None
        h = size_value(crop, "height") or size_value(ip.size, "height") or size_value(ip.size, "shortest_edge")
        w = size_value(crop, "width") or size_value(ip.size, "width") or size_value(ip.size, "shortest_edge")
        return h, w

    def pixels(self, images_nchw: torch.Tensor, image_processor, size: tuple[int, int]) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] → ``pixel_values`` for N images (one image per prompt), differentiably."""
        ip = image_processor
        x = resize(images_nchw, size)
        if self.kind == "llava_onevision":
            return normalise(anyres_tiles(x, ip, size[0]).flatten(0, 1), ip).unflatten(0, (x.shape[0], -1))
        x = normalise(x, ip)
        if self.kind == "qwen":
            return qwen_patchify(x, ip.patch_size, ip.merge_size, ip.temporal_patch_size)
        if self.kind in ("idefics3", "idefics2"):
            return x.unsqueeze(1)
        return x

    def expand_template(self, template: dict, n: int) -> dict:
        """Repeat the one-image processor output for a batch of n images (pixel_values excluded)."""
        out = {}
        for key, value in template.items():
            if key == "pixel_values" or not torch.is_tensor(value):
                continue
            out[key] = value.repeat(n, *([1] * (value.ndim - 1)))
        return out


FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec("qwen-vl", ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"), "qwen"),
        FamilySpec("idefics3", ("idefics3", "smolvlm"), "idefics3", {"do_image_splitting": False}),
        FamilySpec("idefics2", ("idefics2",), "idefics2", {"do_image_splitting": False}),
        FamilySpec("llava", ("llava",), "plain"),
        FamilySpec("llava-onevision", ("llava_onevision",), "llava_onevision"),
        FamilySpec("gemma3", ("gemma3",), "plain", {"do_pan_and_scan": False}),
        FamilySpec("paligemma", ("paligemma",), "plain", answer_token_type=1, uses_chat_template=False),
    )
}


def family_for_model_type(model_type: str) -> FamilySpec:
    for spec in FAMILIES.values():
        if model_type in spec.model_types:
            return spec
    supported = ", ".join(sorted(t for s in FAMILIES.values() for t in s.model_types))
    raise ValueError(f"VLM model_type {model_type!r} is not supported; supported model types: {supported}")
