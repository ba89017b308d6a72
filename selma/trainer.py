"""SELMA skill LoRA trainer: plain denoising loss on a self-generated skill dataset (Li et al. 2024, §3.3).

One LoRA per skill is trained on the (image, caption) pairs of a :class:`~.dataset.SkillDataset` with the
ordinary diffusion objective — the ε-prediction MSE of DDPM (Ho et al. 2020, Eq. 14) at a random noise level:

    x0 = encode(image),  c = encode(caption),  σ ~ U{σ_1..σ_T},  ε ~ N(0, I)
    x_σ = x0 + σ·ε                                  (EPS / variance-exploding coordinates, ComfyUI's k-diffusion σ)
    ε̂   = (x_σ − D(x_σ, σ, c)) / σ                 (the denoiser returns x̂0; this is its implied ε)
    L   = ‖ε̂ − ε‖²  (mean over the batch and latent entries)

For flow models (``parameterization="const"``): x_σ = (1 − σ)·x0 + σ·ε, v̂ = (x_σ − D)/σ, target v = ε − x0
(rectified-flow / SD3 objective).  The text encoder stays frozen: captions and images are encoded ONCE before
training (SELMA trains the UNet attention only).

The training core (``comfy_poe.training``) supplies the LoRA (:class:`LoRANetwork`), the seeded AdamW loop,
checkpoints and exact resume. Every random choice of step k (which pairs, which σ, which ε) comes from
``step_generator(seed, k)`` and an epoch permutation seeded by (seed, epoch), so an interrupted run resumed
from its checkpoint equals an uninterrupted one.

Presets (:data:`PRESETS`) — ``reference`` is the paper's SD1.x/2 setting; the others scale it down:

==========  ====  =====  ======  =====  ============  =============================================
preset      rank  alpha  lr      steps  batch (micro)  meant for
==========  ====  =====  ======  =====  ============  =============================================
reference   128   128    3e-4    5000   64 (8)        SELMA as published (≥ 24 GB GPU, hours)
small       32    32     1e-4    1500   16 (4)        12–16 GB GPUs, a few hundred images
tiny        8     8      1e-4    400    4 (1)         8 GB GPUs / quick trials
==========  ====  =====  ======  =====  ============  =============================================

``batch`` is the effective batch; it is processed in micro-batches of ``micro_batch`` rows whose gradients
are accumulated (the paper's batch 64 does not fit one SD1.5 forward on most GPUs). The smaller presets
lower lr with the batch (roughly √ of the batch ratio) because the gradient is noisier;
these are starting points, not tuned values.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..training.lora import LoRAConfig, LoRANetwork, create_lora
from ..training.loop import CheckpointStore, LoopConfig, StepOutput, TrainResult, step_generator, train
from .dataset import DatasetError, SkillDataset, load_png

PARAMETERIZATIONS = ("eps", "const")
Denoise = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass
class SkillTrainConfig:
    """Settings of one skill LoRA (defaults: the SELMA paper, SD1.x/2)."""

    rank: int = 128
    alpha: float = 128.0
    targets: str = "attention"          # UNet attention q/k/v/out (training.lora.TARGET_PRESETS)
    lr: float = 3e-4                    # constant, AdamW
    steps: int = 5000
    batch_size: int = 64                # effective batch per optimiser step
    micro_batch: int = 8                # rows per forward/backward (gradient accumulation); 0 = batch_size
    seed: int = 0
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    init: str = "kaiming"               # PEFT's default LoRA init (up = 0: the model starts unchanged)
    autocast: str = "off"
    checkpoint_every: int = 0
    eval_samples: int = 16              # fixed (pair, σ, ε) probes for the before/after loss; 0 = skip

    def validate(self) -> None:
        for name in ("rank", "steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if int(self.micro_batch) < 0:
            raise ValueError(f"micro_batch must be >= 0, got {self.micro_batch}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")

    @property
    def micro(self) -> int:
        return min(int(self.micro_batch) or int(self.batch_size), int(self.batch_size))

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(rank=self.rank, alpha=self.alpha, targets=self.targets, init=self.init, scale=1.0)

    def loop_config(self) -> LoopConfig:
        return LoopConfig(steps=self.steps, lr=self.lr, weight_decay=self.weight_decay, grad_clip=self.grad_clip,
                          seed=self.seed, checkpoint_every=self.checkpoint_every, autocast=self.autocast)


PRESETS: dict[str, SkillTrainConfig] = {
    "reference": SkillTrainConfig(),
    "small": SkillTrainConfig(rank=32, alpha=32.0, lr=1e-4, steps=1500, batch_size=16, micro_batch=4),
    "tiny": SkillTrainConfig(rank=8, alpha=8.0, lr=1e-4, steps=400, batch_size=4, micro_batch=1),
}


def preset_config(name: str = "reference", **overrides) -> SkillTrainConfig:
    """The named preset with some fields replaced (``None`` values are ignored)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {name!r}")
    config = replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
    config.validate()
    return config


# ------------------------------------------------------------------------------------------- data
@dataclass
class EncodedDataset:
    """Latents (N, C, h, w) and one encoded condition per pair (captions encoded once each)."""

    latents: torch.Tensor
    conds: list
    captions: list[str]

    def __len__(self) -> int:
        return self.latents.shape[0]


def default_collate(conds: list):
    """Batch per-pair conditions: tensors (1, …) are concatenated; dicts of tensors key by key."""
    first = conds[0]
    if torch.is_tensor(first):
        return torch.cat([c.reshape(1, *c.shape[1:]) if c.ndim else c.reshape(1) for c in conds])
    if isinstance(first, dict):
        return {k: default_collate([c[k] for c in conds]) for k in first}
    raise TypeError(f"cannot batch conditions of type {type(first).__name__}: pass a collate function")


def encode_pairs(pairs, encode_prompt: Callable[[str], Any], encode_image: Callable[[torch.Tensor], torch.Tensor],
                 *, check: Optional[Callable[[], None]] = None) -> EncodedDataset:
    """Encode every (image path | IMAGE tensor, caption) pair once; identical captions share one encoding.

    ``encode_image`` gets a (1, H, W, 3) float image in [0, 1] and returns a latent (1, C, h, w) in the
    model's own space; ``encode_prompt`` returns whatever the denoiser takes as condition (batched with
    ``collate``).
    """
    pairs = list(pairs)
    if not pairs:
        raise DatasetError("the dataset has no accepted images to train on")
    latents, conds, captions, cache = [], [], [], {}
    shape = None
    for image, caption in pairs:
        if check is not None:
            check()
        pixels = image if torch.is_tensor(image) else load_png(image)
        if pixels.ndim == 3:
            pixels = pixels[None]
        with torch.no_grad():
            latent = encode_image(pixels).detach()
        if shape is None:
            shape = tuple(latent.shape[1:])
        elif tuple(latent.shape[1:]) != shape:
            raise DatasetError(f"image {image} encodes to {tuple(latent.shape[1:])}, the first one to {shape}: "
                               "all images of a skill dataset must have the same size")
        if caption not in cache:
            with torch.no_grad():
                cache[caption] = encode_prompt(caption)
        latents.append(latent.float().cpu())
        conds.append(cache[caption])
        captions.append(caption)
    return EncodedDataset(torch.cat(latents), conds, captions)


def batch_indices(n: int, seed: int, step: int, batch: int) -> torch.Tensor:
    """Indices of step ``step``'s batch: epochs of seeded permutations read in order (every pair once per
    epoch), so the choice depends only on (seed, step)."""
    start = (step - 1) * batch
    out = []
    for pos in range(start, start + batch):
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=step_generator(seed, epoch, stream=11))
        out.append(int(perm[offset]))
    return torch.tensor(out, dtype=torch.long)


def noisy_and_target(x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, parameterization: str):
    """(x_σ, regression target of (x_σ − D)/σ) for EPS (target ε) or CONST / flow (target ε − x0)."""
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
    if parameterization == "eps":
        return x0 + s * noise, noise
    if parameterization == "const":
        return (1 - s) * x0 + s * noise, noise - x0
    raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")


def denoising_loss(denoise: Denoise, x0: torch.Tensor, cond, sigma: torch.Tensor, noise: torch.Tensor,
                   parameterization: str = "eps", reduce: bool = True) -> torch.Tensor:
    """‖(x_σ − D(x_σ, σ, c))/σ − target‖² (DDPM's ε-MSE, Ho et al. 2020 Eq. 14, in k-diffusion σ)."""
    x, target = noisy_and_target(x0, sigma, noise, parameterization)
    denoised = denoise(x, sigma, cond)
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
    err = ((x - denoised.float()) / s - target).pow(2)
    return err.mean() if reduce else err.flatten(1).mean(1)


def draw(n: int, shape, sigmas: torch.Tensor, generator: torch.Generator):
    """σ drawn uniformly from the table (a random training timestep) and standard-normal noise."""
    sigma = sigmas[torch.randint(0, sigmas.numel(), (n,), generator=generator)]
    return sigma.float(), torch.randn((n, *shape), generator=generator)


def probe_loss(denoise: Denoise, data: EncodedDataset, sigmas: torch.Tensor, n: int, seed: int,
               parameterization: str, collate, device, micro: int) -> float:
    """Mean denoising loss on ``n`` fixed (pair, σ, ε) probes (seeded apart from training): before/after."""
    g = torch.Generator().manual_seed(int(seed) + 7_777_777)
    idx = torch.randint(0, len(data), (n,), generator=g)
    sigma, noise = draw(n, data.latents.shape[1:], sigmas, g)
    total = 0.0
    with torch.no_grad():
        for a in range(0, n, micro):
            sl = slice(a, a + micro)
            rows = idx[sl]
            cond = _to(collate([data.conds[int(i)] for i in rows]), device)
            total += float(denoising_loss(denoise, data.latents[rows].to(device), cond, sigma[sl].to(device),
                                          noise[sl].to(device), parameterization, reduce=False).sum())
    return total / n


def _to(cond, device):
    if torch.is_tensor(cond):
        return cond.to(device)
    if isinstance(cond, dict):
        return {k: _to(v, device) for k, v in cond.items()}
    return cond


# ------------------------------------------------------------------------------------------ training
@dataclass
class SkillTrainResult:
    network: LoRANetwork
    history: list[dict]
    steps_done: int
    resumed_from: int
    pairs: int
    captions: int
    loss_before: Optional[float] = None
    loss_after: Optional[float] = None
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    checkpoint: Optional[Path] = None

    def summary(self) -> str:
        lines = [f"SELMA skill LoRA: {self.pairs} pairs ({self.captions} captions), {self.steps_done} steps"
                 + (f" (resumed from {self.resumed_from})" if self.resumed_from else "")
                 + f" in {self.seconds:.1f} s; rank {self.network.rank}, alpha {self.network.alpha}, "
                   f"{len(self.network.paths)} layers"]
        if self.loss_before is not None:
            lines.append(f"denoising loss on fixed probes: {self.loss_before:.5f} -> {self.loss_after:.5f}")
        return "\n".join(lines)


def train_skill_lora(dataset, model: Optional[nn.Module], denoise: Denoise, encode_prompt, encode_image, *,
                     config: Optional[SkillTrainConfig] = None, sigmas: torch.Tensor,
                     parameterization: str = "eps", network: Optional[LoRANetwork] = None,
                     collate: Callable[[list], Any] = default_collate, device=None,
                     run_dir=None, resume: bool = True, export=None, metadata: Optional[dict] = None,
                     progress: Optional[Callable[[int, int, dict], None]] = None,
                     interrupt: Optional[Callable[[], None]] = None, shard: tuple[int, int] = (0, 1),
                     reduce_gradients=None, writer: bool = True) -> SkillTrainResult:
    """Train one skill LoRA with the plain denoising loss (see module docstring).

    dataset: a SkillDataset folder (its accepted pairs), a list of (image path | IMAGE, caption), or an
        :class:`EncodedDataset` from :func:`encode_pairs` (then the encoders are not called).
    model: the denoiser's nn.Module; a LoRA is created on it (``config``) and attached with forward hooks,
        unless ``network`` is given already applied (ComfyUI: weight wrappers on a patcher clone).
    denoise(x_σ, σ (N,), cond) -> x̂0: the frozen model (with the LoRA active) in k-diffusion coordinates.
    sigmas: the table of training noise levels; each row draws one uniformly (e.g. ComfyUI's
        model_sampling.sigmas = the 1000 DDPM timesteps).
    run_dir: checkpoint folder (resume when the settings match); progress(step, total, record);
        interrupt() is called before every step and may raise to stop (the last checkpoint stays valid).
    shard=(rank, world size), reduce_gradients, writer: data parallel (``python -m comfy_poe.training``): each
        rank trains on its contiguous block of every step's batch, the loop averages the gradients over ranks,
        only the writer rank saves checkpoints.
    """
    config = config or SkillTrainConfig()
    config.validate()
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten().cpu()
    sigmas = sigmas[sigmas > 0]
    if sigmas.numel() == 0:
        raise ValueError("sigmas: the noise-level table has no positive σ")
    t0 = time.monotonic()
    if isinstance(dataset, EncodedDataset):   # encoded by the caller (e.g. before the model is loaded)
        data = dataset
    else:
        pairs = SkillDataset(dataset, create=False).pairs() if isinstance(dataset, (str, Path)) else list(dataset)
        data = encode_pairs(pairs, encode_prompt, encode_image, check=interrupt)
    attached_here = network is None
    if network is None:
        if model is None:
            raise ValueError("train_skill_lora needs a model to put the LoRA on, or a ready network")
        network = create_lora(model, config.lora_config(), seed=config.seed, device=device).attach(model)
    try:
        return _train(network, data, denoise, config, sigmas, parameterization, collate, device, run_dir, resume,
                      export, metadata, progress, interrupt, t0, shard, reduce_gradients, writer)
    except BaseException:
        if attached_here:  # a failed / interrupted run leaves the model as it found it
            network.detach()
        raise


def _train(network, data, denoise, config, sigmas, parameterization, collate, device, run_dir, resume, export,
           metadata, progress, interrupt, t0, shard=(0, 1), reduce_gradients=None, writer=True) -> SkillTrainResult:
    rank, world = shard
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} (the global batch) must be a multiple of the {world} "
                         "processes")
    mine = slice(rank * config.batch_size // world, (rank + 1) * config.batch_size // world)
    if device is None:
        device = next(iter(network.named_lora_parameters().values())).device
    micro = config.micro
    before = None
    if config.eval_samples:
        scale, network.scale = network.scale, 0.0
        before = probe_loss(denoise, data, sigmas, config.eval_samples, config.seed, parameterization, collate,
                            device, micro)
        network.scale = scale

    def step_fn(step: int) -> StepOutput:
        g = step_generator(config.seed, step)
        idx = batch_indices(len(data), config.seed, step, config.batch_size)
        sigma, noise = draw(len(idx), data.latents.shape[1:], sigmas, g)
        idx, sigma, noise = idx[mine], sigma[mine], noise[mine]  # this rank's rows (all of them on one process)
        parts = range(0, len(idx), micro)
        done = 0.0
        loss = None
        for k, a in enumerate(parts):
            sl = slice(a, a + micro)
            rows = idx[sl]
            cond = _to(collate([data.conds[int(i)] for i in rows]), device)
            part = denoising_loss(denoise, data.latents[rows].to(device), cond, sigma[sl].to(device),
                                  noise[sl].to(device), parameterization) * (len(rows) / len(idx))
            if k < len(parts) - 1:   # accumulate: backward now, keep only the value
                part.backward()
                done += float(part.detach())
            else:
                loss = part + done   # value = the whole batch's loss; gradient = the last micro-batch's
        return StepOutput(loss, {"sigma_mean": float(sigma.mean())})

    store = CheckpointStore(run_dir, export, metadata, writer=writer) if run_dir is not None else None
    fingerprint = {"selma": {**asdict(config), "parameterization": parameterization, "pairs": len(data),
                             "sigmas": [float(sigmas.min()), float(sigmas.max()), int(sigmas.numel())]}}
    for key in ("steps", "checkpoint_every", "eval_samples"):
        fingerprint["selma"].pop(key)
    result: TrainResult = train(network, step_fn, config.loop_config(), checkpoints=store, resume=resume,
                                fingerprint=fingerprint, progress=progress,
                                should_stop=(lambda step: interrupt()) if interrupt is not None else None,
                                reduce_gradients=reduce_gradients)
    after = None
    if config.eval_samples:
        after = probe_loss(denoise, data, sigmas, config.eval_samples, config.seed, parameterization, collate,
                           device, micro)
    return SkillTrainResult(network, result.history, result.steps_done, result.resumed_from, len(data),
                            len(set(data.captions)), before, after, time.monotonic() - t0, asdict(config),
                            result.checkpoint)
