"""A local diffusers Stable Diffusion folder as an engine model for the training core.

The trainers (:mod:`.alignment`) work on engine models: k-diffusion denoisers in variance-exploding (VE)
coordinates, ``model.denoise(x, sigma, conds) -> [x̂0 per conditioning]`` with x = x0 + σ·ε.  A diffusers
UNet2DConditionModel is a discrete-time VP model ε̂(z_t, t) (or v̂) with z = x / √(1 + σ²) and t the index of
σ among the training noise levels σ_t = √((1 − ᾱ_t)/ᾱ_t) of its scheduler (Ho et al. 2020, Eq. 4; ComfyUI's
``model_sampling``).  So

    EPS:  x̂0 = x − σ·ε̂(x/√(1+σ²), t(σ))
    V:    x̂0 = x/(1+σ²) − σ/√(1+σ²) · v̂(x/√(1+σ²), t(σ))         (σ_data = 1, Salimans & Ho 2022)

with t(σ) the nearest training level in log σ (exact for the levels the trainers draw).  The folder layout is
diffusers' ``save_pretrained`` of a StableDiffusionPipeline: ``unet/ vae/ text_encoder/ tokenizer/ scheduler/``
(safetensors weights only: pickle files are refused).  SD 1.x / 2.x UNets (one CLIP text encoder) are supported;
SDXL (two text encoders, pooled embeddings and size conditioning) is refused with a clear error.

The LoRA sits on the UNet's own module paths (diffusers naming); :func:`kohya_unet_key` writes them as
``lora_unet_<path with _>``, the spelling ComfyUI's LoraLoader maps onto its UNet for SD1.x / SDXL checkpoints.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..experts.base import EPS, V_PREDICTION
from ..lora.formats import COMPONENT_KOHYA
from .mapo import ddpm_training_sigmas

PREDICTION_TYPES = {"epsilon": EPS, "v_prediction": V_PREDICTION}


def kohya_unet_key(path: str) -> str:
    """``down_blocks.0.attentions.0.proj_in`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    return COMPONENT_KOHYA["unet"] + path.replace(".", "_")


def scheduler_sigmas(config: dict) -> torch.Tensor:
    """Training noise levels σ_0..σ_{T−1} (increasing) of a DDPM-style scheduler config."""
    n = int(config.get("num_train_timesteps", 1000))
    schedule = config.get("beta_schedule", "linear")
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if config.get("trained_betas"):
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
    elif schedule == "scaled_linear":
        return ddpm_training_sigmas(n, start, end)
    elif schedule == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float64)
    else:
        raise ValueError(f"scheduler beta_schedule {schedule!r} is not supported (scaled_linear, linear or "
                         "trained_betas)")
    abar = torch.cumprod(1 - betas, 0)
    return ((1 - abar) / abar).sqrt()


class DiffusersSD(nn.Module):
    """UNet + VAE + CLIP text encoder of a diffusers SD folder, as an engine model (see module docstring)."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: dict):
        super().__init__()
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        prediction = scheduler_config.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type {prediction!r}: training supports epsilon and v_prediction")
        self.parameterization = PREDICTION_TYPES[prediction]
        self.register_buffer("train_sigmas", scheduler_sigmas(scheduler_config).float(), persistent=False)
        self.latent_scale = float(getattr(vae.config, "scaling_factor", 0.18215))
        for module in (unet, vae, text_encoder):
            module.requires_grad_(False)
            module.eval()

    def timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index of the nearest training level (in log σ) for each σ."""
        log_levels = self.train_sigmas.to(sigma.device).log()
        return (sigma.float().log().reshape(-1, 1) - log_levels.reshape(1, -1)).abs().argmin(dim=1)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, conds: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        z = x / torch.sqrt(1 + s**2)
        t = self.timesteps(sigma)
        dtype = self.unet.dtype
        out = []
        for cond in conds:
            cond = cond.to(device=x.device, dtype=dtype)
            if cond.shape[0] != x.shape[0]:
                cond = cond.expand(x.shape[0], *cond.shape[1:])
            pred = self.unet(z.to(dtype), t, encoder_hidden_states=cond).sample.to(x.dtype)
            if self.parameterization == EPS:
                out.append(x - s * pred)
            else:
                out.append(x / (1 + s**2) - s / torch.sqrt(1 + s**2) * pred)
        return out

    @torch.no_grad()
    def encode_prompt(self, text: str) -> torch.Tensor:
        """CLIP last hidden state (1, L, D) of a prompt padded to the tokenizer's max length (SD 1.x)."""
        ids = self.tokenizer([text], padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled VAE latents -> IMAGE (N, H, W, C) in [0, 1] (pixel rewards; differentiable for Dual-Process)."""
        pixels = self.vae.decode((latents / self.latent_scale).to(device=self.vae.device, dtype=self.vae.dtype)).sample
        return ((pixels.float() + 1) / 2).clamp(0, 1).movedim(1, -1)

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell along one side (2^(number of VAE blocks − 1))."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def sampling_sigmas(self, steps: int) -> torch.Tensor:
        """``steps`` DDPM transitions over evenly spaced training levels, highest first (k-diffusion order)."""
        n = self.train_sigmas.numel()
        index = torch.linspace(n - 1, 0, int(steps) + 1).round().long()
        return self.train_sigmas[index]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """IMAGE (N, H, W, C) in [0, 1] -> scaled VAE latents (the posterior mode, as ComfyUI's VAEEncode)."""
        pixels = images[..., :3].movedim(-1, 1).to(device=self.vae.device, dtype=self.vae.dtype) * 2 - 1
        return self.vae.encode(pixels).latent_dist.mode().float() * self.latent_scale


def load_diffusers_sd(folder: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32) -> DiffusersSD:
    """Load ``folder`` (a diffusers SD pipeline saved with save_pretrained); safetensors only, local files only."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    folder = Path(folder)
    missing = [sub for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (folder / sub).is_dir()]
    if missing:
        raise ValueError(f"diffusers model folder {str(folder)!r} lacks {', '.join(missing)} (expected the layout of "
                         "StableDiffusionPipeline.save_pretrained: unet/ vae/ text_encoder/ tokenizer/ scheduler/)")
    if (folder / "text_encoder_2").is_dir():
        raise ValueError(f"{folder} is an SDXL pipeline (text_encoder_2): the diffusers trainer supports SD 1.x / "
                         "2.x UNets for now")
    config_path = folder / "scheduler" / "scheduler_config.json"
    try:
        scheduler_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {config_path} ({e})") from None
    common = {"use_safetensors": True, "local_files_only": True}
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, **common)
    if getattr(unet.config, "addition_embed_type", None):
        raise ValueError(f"{folder}: UNet with addition_embed_type={unet.config.addition_embed_type!r} (SDXL-style "
                         "conditioning) is not supported by the diffusers trainer yet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, **common)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype, **common)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    return DiffusersSD(unet, vae, text_encoder, tokenizer, scheduler_config).to(device)
