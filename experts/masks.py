"""Region masks for regional experts: resize to the latent grid and feather (engine side, no ComfyUI)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def feather(mask: torch.Tensor, radius: float) -> torch.Tensor:
    """Soften a (…, H, W) mask with a separable Gaussian of standard deviation ``radius`` (latent pixels)."""
    if radius <= 0:
        return mask
    r = max(1, int(round(3 * radius)))
    t = torch.arange(-r, r + 1, dtype=mask.dtype, device=mask.device)
    kernel = torch.exp(-0.5 * (t / radius) ** 2)
    kernel = kernel / kernel.sum()
    shape = mask.shape
    m = mask.reshape(-1, 1, shape[-2], shape[-1])
    m = F.conv2d(F.pad(m, (r, r, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    m = F.conv2d(F.pad(m, (0, 0, r, r), mode="replicate"), kernel.view(1, 1, -1, 1))
    return m.reshape(shape).clamp(0.0, 1.0)


def prepare_mask(mask: torch.Tensor, latent_shape, feather_radius: float = 0.0) -> torch.Tensor:
    """A ComfyUI MASK ((H, W) or (B, H, W), any resolution) as a soft mask on the latent grid.

    Returns (B|1, 1, *spatial) for latents shaped (N, C, *spatial). Video latents (N, C, T, H, W): a single
    mask applies to every frame; a mask batch of k > 1 is one mask per frame (pixel frames or latent
    frames) and is resampled linearly in time onto the T latent frames (first and last frames kept, so
    k = T is exact and k = 4(T-1)+1 pixel frames of Wan / Hunyuan video map frame 4t onto latent frame t).
    Bilinear resizing keeps mask edges soft; feathering is in latent pixels.
    """
    mask = torch.as_tensor(mask, dtype=torch.float32)
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"a mask must be (H, W) or (B, H, W); got shape {tuple(mask.shape)}")
    spatial = tuple(latent_shape[2:])
    h, w = spatial[-2:]
    m = F.interpolate(mask[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    m = feather(m.clamp(0.0, 1.0), feather_radius)
    if len(spatial) == 3:  # (T, H, W)
        frames = spatial[0]
        if m.shape[0] == 1:  # same region in every frame
            return m[:, None].expand(1, 1, frames, h, w)
        if m.shape[0] != frames:  # per-frame masks, resampled in time
            if frames == 1:
                m = m[:1]
            else:
                k = m.shape[0]
                m = F.interpolate(m.reshape(k, h * w).T[None], size=frames, mode="linear", align_corners=True)
                m = m[0].T.reshape(frames, h, w)
        return m[None, None]
    return m[:, None]
