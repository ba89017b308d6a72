"""A local diffusers model folder as an engine model for the training core: SD 1.x / 2.x and SDXL UNets,
SD3 and Flux transformers.

The trainers (:mod:`.alignment`) work on engine models: k-diffusion denoisers in variance-exploding (VE)
coordinates, ``model.denoise(x, sigma, conds) -> [x̂0 per conditioning]`` with x = x0 + σ·ε.

**UNet families** (:class:`DiffusersSD`).  A diffusers UNet2DConditionModel is a discrete-time VP model
ε̂(z_t, t) (or v̂) with z = x / √(1 + σ²) and t the index of σ among the training noise levels
σ_t = √((1 − ᾱ_t)/ᾱ_t) of its scheduler (Ho et al. 2020, Eq. 4; ComfyUI's ``model_sampling``).  So

    EPS:  x̂0 = x − σ·ε̂(x/√(1+σ²), t(σ))
    V:    x̂0 = x/(1+σ²) − σ/√(1+σ²) · v̂(x/√(1+σ²), t(σ))         (σ_data = 1, Salimans & Ho 2022)

with t(σ) the nearest training level in log σ (exact for the levels the trainers draw).  SDXL (Podell et al.
2023, §2.2) adds two text encoders (penultimate hidden states of CLIP-L and OpenCLIP-G concatenated; the
pooled, projected CLIP-G embedding) and the size / crop conditioning ``add_time_ids`` = (original H, W, crop
top, left, target H, W): the conditioning of an SDXL model is ``{"context", "pooled"}`` and the time ids are
(H, W, 0, 0, H, W) of the latent being denoised — what the SDXL pipeline uses by default and what MaPO's
reference ``compute_time_ids`` gives for uncropped pairs at the training resolution (mapo-t2i/mapo,
``utils.py``).

**Transformer families** (:class:`DiffusersFlow`): SD3Transformer2DModel and FluxTransformer2DModel are
rectified-flow (CONST) models, x_f = (1 − s)·x0 + s·ε, predicting the velocity v̂ ≈ ε − x0 (rectified
flow, Esser et al. 2024).  A flow state maps exactly onto VE coordinates with the same x0 (x = x_f/(1 − s),
σ = s/(1 − s); see ``experts/base.py``), so

    x̂0 = x_f − s·v̂(x_f, s),    x_f = x/(1 + σ),  s = σ/(1 + σ)

and the trainers' VE code works unchanged; the losses use the flow-matching target (``mapo.denoising_losses``
with ``const``).  Training levels: the scheduler's shifted flow times s = shift·u/(1 + (shift − 1)·u) at the
T = 1000 midpoints u = (t + ½)/T (FlowMatchEulerDiscreteScheduler's table without the σ = ∞ end), drawn
uniformly — see :func:`flow_training_sigmas`.  The rollout methods' DDPM chain runs on the same VE view of the
flow (:meth:`DiffusersFlow.chain_sigmas`); Dual-Process samples with the flow Euler step
(:meth:`DiffusersFlow.sampling_sigmas`).

The folder is diffusers' ``save_pretrained`` of a pipeline (safetensors weights only: pickle files are
refused); :func:`model_family` tells the family from ``model_index.json`` (or the sub-folders) before any
weight is read.

LoRA keys: UNet families use the kohya spelling ``lora_unet_<path with _>`` (:func:`kohya_unet_key`), which
ComfyUI's LoraLoader maps onto its UNet for SD1.x / SDXL checkpoints; transformer families use the diffusers
spelling ``transformer.<path>`` (:func:`diffusers_transformer_key`), which ComfyUI maps for SD3 and Flux
(``comfy/lora.py`` ``model_lora_keys_unet``).
"""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..experts.base import CONST, EPS, V_PREDICTION
from ..lora.formats import COMPONENT_KOHYA
from .mapo import ddpm_training_sigmas

PREDICTION_TYPES = {"epsilon": EPS, "v_prediction": V_PREDICTION}
# model_index.json _class_name -> family; the transformer class names tell SD3 and Flux folders apart without one
PIPELINE_FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
                     "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
TRANSFORMER_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
FAMILY_NAMES = {"sd": "SD 1.x / 2.x (StableDiffusionPipeline)", "sdxl": "SDXL (StableDiffusionXLPipeline)",
                "sd3": "SD3 / SD3.5 (StableDiffusion3Pipeline)", "flux": "Flux (FluxPipeline)"}
FLOW_FAMILIES = ("sd3", "flux")
SD3_T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length
FLUX_TRAINING_GUIDANCE = 3.5  # Flux-dev's distilled guidance input while training (diffusers' Flux LoRA scripts)


def kohya_unet_key(path: str) -> str:
    """``down_blocks.0.attentions.0.proj_in`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    return COMPONENT_KOHYA["unet"] + path.replace(".", "_")


def diffusers_transformer_key(path: str) -> str:
    """``transformer_blocks.0.attn.to_q`` -> ``transformer.transformer_blocks.0.attn.to_q`` (diffusers LoRA)."""
    return "transformer." + path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} ({e})") from None


def _supported() -> str:
    return ", ".join(FAMILY_NAMES.values())


def model_family(folder: str | os.PathLike) -> str:
    """``sd`` | ``sdxl`` | ``sd3`` | ``flux`` for a diffusers pipeline folder, from ``model_index.json`` when
    present, else from its sub-folders; anything else is an error naming what was found."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"diffusers model folder {str(folder)!r} does not exist")
    index = folder / "model_index.json"
    if index.is_file():
        name = str(_read_json(index).get("_class_name", ""))
        if name not in PIPELINE_FAMILIES:
            raise ValueError(f"{folder} holds a {name or 'pipeline without _class_name'} (model_index.json); the "
                             f"diffusers trainer supports {_supported()}")
        return PIPELINE_FAMILIES[name]
    if (folder / "transformer").is_dir():
        name = str(_read_json(folder / "transformer" / "config.json").get("_class_name", ""))
        if name not in TRANSFORMER_FAMILIES:
            raise ValueError(f"{folder}/transformer is a {name or 'model without _class_name'}; the diffusers "
                             f"trainer supports {_supported()}")
        return TRANSFORMER_FAMILIES[name]
    if (folder / "unet").is_dir():
        config = folder / "unet" / "config.json"
        name = str(_read_json(config).get("_class_name", "UNet2DConditionModel")) if config.is_file() else ""
        if name and name != "UNet2DConditionModel":
            raise ValueError(f"{folder}/unet is a {name}; the diffusers trainer supports {_supported()}")
        return "sdxl" if (folder / "text_encoder_2").is_dir() else "sd"
    raise ValueError(f"{folder} is not a diffusers pipeline folder (no model_index.json, unet/ or transformer/); "
                     f"the diffusers trainer supports {_supported()}")


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


def flow_shift(config: dict) -> float:
    """The scheduler's static time shift (SD3: 3.0); 1 when the shift is resolution-dependent (Flux's
    ``use_dynamic_shifting``: diffusers' Flux training scripts then draw unshifted times)."""
    return 1.0 if config.get("use_dynamic_shifting") else float(config.get("shift", 1.0))


def shift_flow_time(u: torch.Tensor, shift: float) -> torch.Tensor:
    """s = shift·u / (1 + (shift − 1)·u) (the resolution-dependent time shift of Esser et al. 2024)."""
    return shift * u / (1 + (shift - 1) * u)


def flow_training_sigmas(config: dict) -> torch.Tensor:
    """Flow times s_0..s_{T−1} (increasing, in (0, 1)) the trainers draw uniformly: the shifted midpoints of
    T = ``num_train_timesteps`` equal steps.  Uniform over the scheduler's own (shifted) table rather than a
    logit-normal density: the shift already moves the mass toward high noise, and every trainer of the
    core (MaPO's T, the seeded discrete draws, SELMA's table) works on a discrete table of T levels."""
    n = int(config.get("num_train_timesteps", 1000))
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return shift_flow_time(u, flow_shift(config))


def _batched(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if t.shape[0] == n else t.expand(n, *t.shape[1:])


class DiffusersSD(nn.Module):
    """UNet + VAE + CLIP text encoder(s) of a diffusers SD 1.x / 2.x or SDXL folder, as an engine model (see
    module docstring).  SDXL: ``text_encoder_2`` / ``tokenizer_2`` are given and the conditioning is a dict."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: dict, text_encoder_2=None,
                 tokenizer_2=None):
        super().__init__()
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.family = "sdxl" if text_encoder_2 is not None else "sd"
        prediction = scheduler_config.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type {prediction!r}: training supports epsilon and v_prediction")
        self.parameterization = PREDICTION_TYPES[prediction]
        self.register_buffer("train_sigmas", scheduler_sigmas(scheduler_config).float(), persistent=False)
        self.latent_scale = float(getattr(vae.config, "scaling_factor", 0.18215))
        for module in (unet, vae, text_encoder, text_encoder_2):
            if module is not None:
                module.requires_grad_(False)
                module.eval()

    @property
    def denoiser(self) -> nn.Module:
        """The network the LoRA is attached to."""
        return self.unet

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    lora_key = staticmethod(kohya_unet_key)

    def timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index of the nearest training level (in log σ) for each σ."""
        log_levels = self.train_sigmas.to(sigma.device).log()
        return (sigma.float().log().reshape(-1, 1) - log_levels.reshape(1, -1)).abs().argmin(dim=1)

    def time_ids(self, latents: torch.Tensor) -> torch.Tensor:
        """SDXL size / crop conditioning (H, W, 0, 0, H, W) in pixels of the latents being denoised."""
        h, w = (int(d) * self.vae_factor for d in latents.shape[-2:])
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=latents.dtype, device=latents.device).expand(latents.shape[0], 6)

    def predict(self, z: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The UNet's raw prediction (ε or v) at the VP state z, timestep indices t, conditioning ``cond``."""
        dtype, n = self.unet.dtype, z.shape[0]
        if isinstance(cond, dict):  # SDXL
            added = {"text_embeds": _batched(cond["pooled"].to(device=z.device, dtype=dtype), n),
                     "time_ids": self.time_ids(z).to(dtype)}
            context = _batched(cond["context"].to(device=z.device, dtype=dtype), n)
            return self.unet(z.to(dtype), t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        context = _batched(cond.to(device=z.device, dtype=dtype), n)
        return self.unet(z.to(dtype), t, encoder_hidden_states=context).sample

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, conds: Sequence) -> list[torch.Tensor]:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        z = x / torch.sqrt(1 + s**2)
        t = self.timesteps(sigma)
        out = []
        for cond in conds:
            pred = self.predict(z, t, cond).to(x.dtype)
            if self.parameterization == EPS:
                out.append(x - s * pred)
            else:
                out.append(x / (1 + s**2) - s / torch.sqrt(1 + s**2) * pred)
        return out

    @torch.no_grad()
    def encode_prompt(self, text: str):
        """SD 1.x: CLIP last hidden state (1, L, D) of the prompt padded to the tokenizer's max length.
        SDXL: {"context": penultimate hidden states of both encoders concatenated (1, L, D1 + D2), "pooled": the
        second encoder's projected embedding (1, P)} (diffusers' SDXL pipeline and MaPO's ``encode_prompt``)."""
        ids = _token_ids(self.tokenizer, text).to(self.text_encoder.device)
        if self.text_encoder_2 is None:
            return self.text_encoder(ids)[0]
        first = self.text_encoder(ids, output_hidden_states=True)
        second = self.text_encoder_2(_token_ids(self.tokenizer_2, text).to(self.text_encoder_2.device),
                                     output_hidden_states=True)
        context = torch.cat([first.hidden_states[-2], second.hidden_states[-2].to(first.hidden_states[-2])], dim=-1)
        return {"context": context, "pooled": second.text_embeds.reshape(1, -1)}

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

    def chain_sigmas(self, steps: int, latent_size=None) -> torch.Tensor:
        """The rollout methods' DDPM chain levels (:meth:`sampling_sigmas`; the size matters for Flux only)."""
        return self.sampling_sigmas(steps)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """IMAGE (N, H, W, C) in [0, 1] -> scaled VAE latents (the posterior mode, as ComfyUI's VAEEncode)."""
        pixels = images[..., :3].movedim(-1, 1).to(device=self.vae.device, dtype=self.vae.dtype) * 2 - 1
        return self.vae.encode(pixels).latent_dist.mode().float() * self.latent_scale


def _token_ids(tokenizer, text: str, max_length: int | None = None) -> torch.Tensor:
    return tokenizer([text], padding="max_length", truncation=True,
                     max_length=max_length or tokenizer.model_max_length, return_tensors="pt").input_ids


def pack_flux_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2·W/2, 4C): Flux's 2×2 patch sequence (diffusers ``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_flux_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_flux_latents` for latents of ``height`` × ``width``."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def flux_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """(H/2·W/2, 3) positions (0, row, column) of the packed latent tokens (Flux's rotary embedding ids)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def flux_position_ids(text_length: int, height: int, width: int, batch: int, device, dtype):
    """(txt_ids, img_ids) for FluxTransformer2DModel: (S, 3) each, or (B, S, 3) on diffusers < 0.31, whose
    transformer concatenates them along a batch axis (0.31 dropped the axis and deprecates it)."""
    txt_ids = torch.zeros(text_length, 3, device=device, dtype=dtype)
    img_ids = flux_image_ids(height, width, device, dtype)
    if _diffusers_release() < (0, 31):
        return txt_ids.expand(batch, -1, -1), img_ids.expand(batch, -1, -1)
    return txt_ids, img_ids


@functools.lru_cache(maxsize=None)
def _diffusers_release() -> tuple:  # cached: asked on every Flux forward pass
    import diffusers
    from packaging.version import Version

    return Version(diffusers.__version__).release[:2]


class DiffusersFlow(nn.Module):
    """Transformer + VAE + text encoders of a diffusers SD3 or Flux folder, as an engine model in VE
    coordinates (see module docstring); ``denoise_flow`` is the same model in its own flow coordinates."""

    def __init__(self, family: str, transformer, vae, text_encoders: Sequence, tokenizers: Sequence,
                 scheduler_config: dict):
        super().__init__()
        if family not in FLOW_FAMILIES:
            raise ValueError(f"DiffusersFlow: family must be one of {FLOW_FAMILIES}, got {family!r}")
        self.family, self.transformer, self.vae = family, transformer, vae
        self.text_encoders = nn.ModuleList([m for m in text_encoders if m is not None])
        self.encoder_slots = [m is not None for m in text_encoders]  # SD3 may leave out the T5 encoder
        self.tokenizers = list(tokenizers)
        self.parameterization = CONST
        flow = flow_training_sigmas(scheduler_config)  # float64: 1 − s near s = 1 needs the digits
        self.register_buffer("flow_sigmas", flow.float(), persistent=False)
        self.register_buffer("train_sigmas", (flow / (1 - flow)).float(), persistent=False)
        self.latent_scale = float(getattr(vae.config, "scaling_factor", 1.0))
        self.latent_shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.scheduler_config = dict(scheduler_config)
        for module in (transformer, vae, *self.text_encoders):
            module.requires_grad_(False)
            module.eval()

    lora_key = staticmethod(diffusers_transformer_key)

    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    @property
    def latent_channels(self) -> int:
        channels = int(self.transformer.config.in_channels)
        return channels // 4 if self.family == "flux" else channels  # Flux's input is the packed 2×2 patch

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def flow_times(self, u: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        """Times u in [0, 1] shifted as the scheduler samples: SD3's static shift, or Flux's resolution-dependent
        one, μ linear in the packed sequence length (FluxPipeline's ``calculate_shift``), s = e^μ/(e^μ + 1/u − 1)."""
        config = self.scheduler_config
        if not config.get("use_dynamic_shifting"):
            return shift_flow_time(u, flow_shift(config))
        tokens = (latent_size[0] // 2) * (latent_size[1] // 2)
        base_len, max_len = int(config.get("base_image_seq_len", 256)), int(config.get("max_image_seq_len", 4096))
        base, top = float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15))
        mu = base + (top - base) * (tokens - base_len) / (max_len - base_len)
        return shift_flow_time(u, math.exp(mu))

    def sampling_sigmas(self, steps: int, latent_size: tuple[int, int]) -> torch.Tensor:
        """``steps`` + 1 flow times from 1 to 0 (k-diffusion order) for Euler sampling (Dual-Process)."""
        return self.flow_times(torch.linspace(1, 0, int(steps) + 1, dtype=torch.float64), latent_size).float()

    def chain_sigmas(self, steps: int, latent_size: tuple[int, int]) -> torch.Tensor:
        """VE levels σ = s/(1 − s) of a ``steps``-transition DDPM chain (the rollout methods), over the shifted
        times from the highest to the lowest training midpoint (s = 1 and 0 are σ = ∞ and 0, which a DDPM chain
        cannot hold).  The chain's VP state z = x/√(1 + σ²) is the flow state rescaled, x_f/√((1 − s)² + s²),
        so DDPM transitions (η = 1) on the flow's x̂0 follow the flow's own noise path and have exact Gaussian
        log-probabilities (one of the SDEs with the flow's marginals, as Flow-GRPO's is; Liu et al. 2025)."""
        n = int(self.scheduler_config.get("num_train_timesteps", 1000))
        u = torch.linspace(1 - 0.5 / n, 0.5 / n, int(steps) + 1, dtype=torch.float64)
        s = self.flow_times(u, latent_size)
        return (s / (1 - s)).float()

    def velocity(self, x: torch.Tensor, s: torch.Tensor, cond: dict) -> torch.Tensor:
        """v̂(x_f, s | cond) of the transformer (x_f latents (B, C, H, W), s flow times (B,))."""
        dtype, n = self.transformer.dtype, x.shape[0]
        context = _batched(cond["context"].to(device=x.device, dtype=dtype), n)
        pooled = _batched(cond["pooled"].to(device=x.device, dtype=dtype), n)
        if self.family == "sd3":
            return self.transformer(hidden_states=x.to(dtype), encoder_hidden_states=context,
                                    pooled_projections=pooled, timestep=(s * 1000).to(dtype)).sample
        h, w = x.shape[-2:]
        guidance = (torch.full((n,), FLUX_TRAINING_GUIDANCE, device=x.device, dtype=dtype)
                    if self.transformer.config.guidance_embeds else None)
        txt_ids, img_ids = flux_position_ids(context.shape[1], h, w, n, x.device, dtype)
        tokens = self.transformer(hidden_states=pack_flux_latents(x.to(dtype)), encoder_hidden_states=context,
                                  pooled_projections=pooled, timestep=s.to(dtype), guidance=guidance,
                                  txt_ids=txt_ids, img_ids=img_ids).sample
        return unpack_flux_latents(tokens, h, w)

    def denoise_flow(self, x: torch.Tensor, s: torch.Tensor, conds: Sequence) -> list[torch.Tensor]:
        """x̂0 = x_f − s·v̂ in flow coordinates (k-diffusion's CONST denoiser)."""
        if x.shape[-2] % 2 or x.shape[-1] % 2:  # SD3's patch embedding and Flux's packing take 2×2 latent patches
            raise ValueError(f"{self.family}: latents {x.shape[-2]}×{x.shape[-1]} must have even sides (images a "
                             f"multiple of {2 * self.vae_factor} pixels)")
        s = torch.as_tensor(s, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        view = s.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return [x - view * self.velocity(x, s, cond).to(x.dtype) for cond in conds]

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, conds: Sequence) -> list[torch.Tensor]:
        """VE coordinates (x = x0 + σ·ε): x_f = x/(1 + σ), s = σ/(1 + σ), same x̂0."""
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        view = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return self.denoise_flow(x / (1 + view), sigma / (1 + sigma), conds)

    @torch.no_grad()
    def encode_prompt(self, text: str) -> dict:
        """{"context" (1, L, D), "pooled" (1, P)} as diffusers' pipelines build them.
        SD3: CLIP-L and CLIP-G penultimate hidden states concatenated, zero-padded to the T5 width, then the T5
        states (zeros when the folder has no text_encoder_3) along the sequence; pooled = both projected CLIP
        embeddings.  Flux: context = T5 last hidden state, pooled = CLIP-L's pooled output."""
        encoders = iter(self.text_encoders)
        slots = [next(encoders) if present else None for present in self.encoder_slots]
        if self.family == "flux":
            clip, t5 = slots
            pooled = clip(_token_ids(self.tokenizers[0], text).to(clip.device)).pooler_output
            context = t5(_token_ids(self.tokenizers[1], text).to(t5.device))[0]
            return {"context": context, "pooled": pooled.reshape(1, -1)}
        clip_l, clip_g, t5 = slots
        hidden, pooled = [], []
        for encoder, tokenizer in ((clip_l, self.tokenizers[0]), (clip_g, self.tokenizers[1])):
            out = encoder(_token_ids(tokenizer, text).to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds.reshape(1, -1))
        clip_context = torch.cat(hidden, dim=-1)
        width = int(self.transformer.config.joint_attention_dim)
        if t5 is not None:  # at most the pipeline's default max_sequence_length of 256 T5 tokens
            ids = _token_ids(self.tokenizers[2], text, min(SD3_T5_TOKENS, self.tokenizers[2].model_max_length))
            t5_context = t5(ids.to(t5.device))[0]
        else:  # the pipeline's zeros for a missing T5
            t5_context = clip_context.new_zeros(1, SD3_T5_TOKENS, width)
        clip_context = torch.nn.functional.pad(clip_context, (0, width - clip_context.shape[-1]))
        return {"context": torch.cat([clip_context, t5_context.to(clip_context)], dim=-2),
                "pooled": torch.cat(pooled, dim=-1)}

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents / self.latent_scale + self.latent_shift
        pixels = self.vae.decode(latents.to(device=self.vae.device, dtype=self.vae.dtype)).sample
        return ((pixels.float() + 1) / 2).clamp(0, 1).movedim(1, -1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images[..., :3].movedim(-1, 1).to(device=self.vae.device, dtype=self.vae.dtype) * 2 - 1
        return (self.vae.encode(pixels).latent_dist.mode().float() - self.latent_shift) * self.latent_scale


def _need(folder: Path, subs: Sequence[str], layout: str) -> None:
    missing = [sub for sub in subs if not (folder / sub).is_dir()]
    if missing:
        raise ValueError(f"diffusers model folder {str(folder)!r} lacks {', '.join(missing)} (expected the layout of "
                         f"{layout}.save_pretrained: {' '.join(s + '/' for s in subs)})")


SAFETENSORS_LOCAL = {"use_safetensors": True, "local_files_only": True}


def load_diffusers_sd(folder: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32) -> DiffusersSD:
    """Load ``folder`` (a diffusers SD 1.x / 2.x or SDXL pipeline saved with save_pretrained); safetensors only,
    local files only."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    family = model_family(folder)
    if family not in ("sd", "sdxl"):
        raise ValueError(f"{folder} is a {FAMILY_NAMES[family]} folder: load it with load_diffusers_model")
    subs = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    if family == "sdxl":
        subs[3:3] = ["text_encoder_2", "tokenizer_2"]
    _need(folder, subs, "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, **SAFETENSORS_LOCAL)
    addition = getattr(unet.config, "addition_embed_type", None)
    if family == "sd" and addition:
        raise ValueError(f"{folder}: UNet with addition_embed_type={addition!r} but one text encoder; an SDXL folder "
                         "needs text_encoder_2/ and tokenizer_2/")
    if family == "sdxl" and addition != "text_time":
        raise ValueError(f"{folder}: an SDXL UNet needs addition_embed_type='text_time' (pooled text and size "
                         f"conditioning), this one has {addition!r}")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, **SAFETENSORS_LOCAL)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype, **SAFETENSORS_LOCAL)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    second = {}
    if family == "sdxl":
        second = {"text_encoder_2": CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2",
                                                                                torch_dtype=dtype, **SAFETENSORS_LOCAL),
                  "tokenizer_2": AutoTokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True)}
    return DiffusersSD(unet, vae, text_encoder, tokenizer, scheduler_config, **second).to(device)


def load_diffusers_flow(folder: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32) -> DiffusersFlow:
    """Load a diffusers SD3 (StableDiffusion3Pipeline; text_encoder_3 optional) or Flux (FluxPipeline) folder."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    folder = Path(folder)
    family = model_family(folder)
    if family not in FLOW_FAMILIES:
        raise ValueError(f"{folder} is a {FAMILY_NAMES[family]} folder: load it with load_diffusers_model")
    if family == "sd3":  # CLIP-L, CLIP-G (both projected), T5 (optional)
        from diffusers import SD3Transformer2DModel as Transformer
        classes = [CLIPTextModelWithProjection, CLIPTextModelWithProjection, T5EncoderModel]
    else:  # CLIP-L (pooled), T5
        from diffusers import FluxTransformer2DModel as Transformer
        classes = [CLIPTextModel, T5EncoderModel]
    _need(folder, ["transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"],
          "StableDiffusion3Pipeline" if family == "sd3" else "FluxPipeline")
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json")
    transformer = Transformer.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype, **SAFETENSORS_LOCAL)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, **SAFETENSORS_LOCAL)
    encoders, tokenizers = [], []
    for i, cls in enumerate(classes):
        suffix = "" if i == 0 else f"_{i + 1}"
        if not (folder / f"text_encoder{suffix}").is_dir():  # only SD3's T5 may be absent (_need checks)
            encoders.append(None)
            tokenizers.append(None)
            continue
        encoders.append(cls.from_pretrained(folder / f"text_encoder{suffix}", torch_dtype=dtype, **SAFETENSORS_LOCAL))
        tokenizers.append(AutoTokenizer.from_pretrained(folder / f"tokenizer{suffix}", local_files_only=True))
    return DiffusersFlow(family, transformer, vae, encoders, tokenizers, scheduler_config).to(device)


def load_diffusers_model(folder: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32):
    """The engine model of any supported diffusers folder (:func:`model_family` picks the loader)."""
    if model_family(folder) in FLOW_FAMILIES:
        return load_diffusers_flow(folder, device, dtype)
    return load_diffusers_sd(folder, device, dtype)
