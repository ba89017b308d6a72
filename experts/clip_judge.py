"""CLIP / SigLIP image-text score as a judge — the light-weight second judge family, same socket as VLM-Judge.

For image x and prompt t with unit embeddings f(x), g(t) and learned temperature τ (and bias b):

* CLIP:   s = τ · cos(f(x), g(t))   — the contrastive logit (CLIPScore up to scale);
* SigLIP: s = log σ(τ · cos(f(x), g(t)) + b)  — log-probability that image and text match;
* with negative prompts n_k (either family): s = log softmax_t([τ cos(f, g(t)), τ cos(f, g(n_1)), ...])
  — the prompt's log-probability against its alternatives, like VLM-Judge's yes/no normalisation.

The judge's log-potential is Σ_i w_i s_i. Pixels go through the same differentiable resize / crop /
normalise path as the VLMs (kornia), so gradients reach the image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .base import PIXEL, DiscriminativeExpert
from .vlm import check_model_folder, freeze, resolve_dtype, weight_files
from .vlm_families import size_value, normalise, resize

CLIP_MODEL_TYPES = ("clip", "siglip")


def parse_prompts(text: str) -> list[tuple[str, float]]:
    """One prompt per line, optionally ``prompt | weight``; blank lines and '#' comments skipped."""
    prompts = []
    for number, line in enumerate(str(text).splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        prompt, _, weight = line.partition("|")
        try:
            prompts.append((prompt.strip(), float(weight) if weight.strip() else 1.0))
        except ValueError:
            raise ValueError(f"prompts line {number}: weight {weight.strip()!r} is not a number") from None
    return prompts


def load_clip(folder, *, dtype="auto", device="cpu", allow_pickle: bool = False, trust_remote_code: bool = False):
    """(model, processor, model_type) of a local CLIP or SigLIP folder, frozen, after the same safety checks
    as :func:`~comfy_poe.experts.vlm.load_vlm`."""
    from transformers import AutoModel, AutoProcessor

    folder = Path(folder)
    config = check_model_folder(folder, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                allowed_model_types=CLIP_MODEL_TYPES, what="CLIP")
    safe, _ = weight_files(folder)
    model = AutoModel.from_pretrained(folder, dtype=resolve_dtype(dtype, config), local_files_only=True,
                                      use_safetensors=bool(safe), trust_remote_code=trust_remote_code)
    freeze(model).to(device)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    return model, processor, config["model_type"]


def clip_pixels(images_nchw: torch.Tensor, image_processor) -> torch.Tensor:
    """Differentiable CLIPImageProcessor / SiglipImageProcessor: resize (shortest edge, or to a fixed
    height × width), centre crop, normalise."""
    ip = image_processor
    size = ip.size
    short = size_value(size, "shortest_edge")
    x = images_nchw
    if short:
        h, w = x.shape[-2:]
        scale = short / min(h, w)
        x = resize(x, (max(short, round(h * scale)), max(short, round(w * scale))))
    else:
        x = resize(x, (size_value(size, "height"), size_value(size, "width")))
    if getattr(ip, "do_center_crop", False):
        ch, cw = size_value(ip.crop_size, "height"), size_value(ip.crop_size, "width")
        top, left = (x.shape[-2] - ch) // 2, (x.shape[-1] - cw) // 2
        x = x[..., top:top + ch, left:left + cw]
    return normalise(x, ip)


class CLIPJudge:
    """Image-text similarity judge; ``__call__`` maps IMAGE (N, H, W, C) in [0, 1] to (N,) log-potentials."""

    def __init__(self, model, processor, model_type: str, prompts: Sequence[tuple[str, float]],
                 negatives: Sequence[str] = (), *, batch_size: int = 16,
                 before_call: Optional[Callable[[], None]] = None):
        if not prompts:
            raise ValueError("a CLIP judge needs at least one prompt")
        if model_type not in CLIP_MODEL_TYPES:
            raise ValueError(f"CLIP judge: model_type must be one of {CLIP_MODEL_TYPES}, got {model_type!r}")
        self.model, self.processor, self.model_type = model, processor, model_type
        self.prompts = list(prompts)
        self.negatives = [n for n in negatives if n.strip()]
        self.batch_size = int(batch_size)
        self.before_call = before_call
        self._text = None

    def text_embeddings(self) -> torch.Tensor:
        """Unit embeddings of prompts then negatives, computed once."""
        device = next(self.model.parameters()).device
        if self._text is None or self._text.device != device:
            texts = [p for p, _ in self.prompts] + self.negatives
            max_length = self.model.config.text_config.max_position_embeddings
            # SigLIP was trained on text padded to its full length; CLIP pools at the end-of-text token
            padding = "max_length" if self.model_type == "siglip" else True
            tokens = self.processor.tokenizer(texts, padding=padding, max_length=max_length, truncation=True,
                                              return_tensors="pt")
            with torch.no_grad():
                features = self.model.get_text_features(**{k: v.to(device) for k, v in tokens.items()})
            features = getattr(features, "pooler_output", features)
            self._text = F.normalize(features.float(), dim=-1)
        return self._text

    def prompt_scores(self, images: torch.Tensor) -> torch.Tensor:
        """(P, N) score of every prompt for IMAGE tensors (N, H, W, C)."""
        if images.ndim != 4 or images.shape[-1] not in (3, 4):
            raise ValueError(f"images must be an IMAGE batch (N, H, W, C), got {tuple(images.shape)}")
        if self.before_call is not None:
            self.before_call()
        param = next(self.model.parameters())
        text = self.text_embeddings()
        scale = self.model.logit_scale.exp().float()
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            x = images[start:start + self.batch_size, ..., :3].permute(0, 3, 1, 2).to(param.device, torch.float32)
            pixels = clip_pixels(x, self.processor.image_processor).to(param.dtype)
            features = self.model.get_image_features(pixel_values=pixels)
            features = F.normalize(getattr(features, "pooler_output", features).float(), dim=-1)
            logits = scale * features @ text.T  # (n, P + K)
            p = len(self.prompts)
            if self.negatives:
                negatives = logits[:, p:]
                scores = torch.stack([
                    logits[:, i] - torch.logsumexp(torch.cat([logits[:, i:i + 1], negatives], dim=1), dim=1)
                    for i in range(p)
                ], dim=0)
            elif self.model_type == "siglip":
                scores = F.logsigmoid(logits[:, :p] + self.model.logit_bias.float()).T
            else:
                scores = logits[:, :p].T
            chunks.append(scores)
        return torch.cat(chunks, dim=1).to(images.device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        weights = torch.tensor([w for _, w in self.prompts], dtype=torch.float32, device=images.device)
        return (weights[:, None] * self.prompt_scores(images)).sum(0)

    def expert(self, weight: float = 1.0, name: str = "clip_judge") -> DiscriminativeExpert:
        info = {"model_type": self.model_type, "prompts": self.prompts, "negatives": self.negatives}
        return DiscriminativeExpert(self, weight=weight, space=PIXEL, differentiable=True, name=name, info=info)
