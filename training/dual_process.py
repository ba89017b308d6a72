"""Dual-Process tuning (Luo et al. 2025, "Dual-Process Image Generation", arXiv 2506.01955, §3):
a frozen judge's loss backpropagated through the decoder and one generator step into a LoRA.

Per training step k (reference code g-luo/dual_process, see shared/reference/dual_process.md):
  1. take noise k of a fixed, seeded pool;
  2. draw i ~ U{0..N-1} (N = inference steps) and, with the LoRA active and no gradient, run the sampler
     i steps from σ_0 to reach x_i (on-policy);
  3. one generator call WITH gradient: x̂0 = D_θ(x_i, σ_i)  (flow models: x̂0 = x_i − σ_i·v, which is what
     a k-diffusion denoiser returns for CONST models; EPS: x̂0 = x_i − σ_i·ε̂);
  4. decode x̂0 with gradient, rescale the judge's copy to [0, 1] (min-max over the batch, as the
     reference does before the VLM's normalisation), judge it (overlays live inside the judge);
  5. loss = −Σ_j w_j r_j(x̂0) averaged over the batch (for a VLM judge in ``dual_process`` mode r is the mean
     answer-token log-likelihood, so this is the paper's cross-entropy); AdamW + grad-norm clipping.

The sampler is Euler in k-diffusion form, x ← x + (σ' − σ)(x − D(x, σ))/σ, which is DDIM for EPS models and
the flow Euler step x ← x + (σ' − σ)·v for CONST models — one formula for both parameterisations.
Any differentiable :class:`~comfy_poe.experts.DiscriminativeExpert` (VLM, CLIP, classifier, palette,
brightness…) can be the judge.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..experts.base import PIXEL, DiscriminativeExpert, canonical_parameterization, evaluate_potentials, is_flow
from .lora import LoRANetwork
from .loop import CheckpointStore, LoopConfig, StepOutput, TrainResult, step_generator, train

PIXEL_RANGES = ("minmax", "clamp", "none")
NOISE_STREAM, STEP_STREAM = 1, 2


@dataclass
class Generator:
    """What the trainer needs from a diffusion / flow model.

    denoise:      (x, sigma (N,)) -> x̂0, k-diffusion convention, with the LoRA applied (the trainer only
                  changes the network's ``scale``); inside ComfyUI this is the guider (CFG included).
    sigmas:       inference schedule σ_0 > … > σ_N (usually σ_N = 0); N = len(sigmas) − 1 steps.
    latent_shape: shape of one latent (C, H, W).
    decode:       differentiable latent x̂0 -> IMAGE (N, H, W, C), roughly [0, 1]; needed by pixel judges.
    latent:       clean latent the noise is added to (model space, broadcastable; default zeros).
    """

    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    sigmas: torch.Tensor
    latent_shape: tuple
    parameterization: str = "eps"
    decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    latent: Optional[torch.Tensor] = None
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        self.parameterization = canonical_parameterization(self.parameterization)
        self.sigmas = torch.as_tensor(self.sigmas, dtype=torch.float32).flatten().cpu()
        if self.sigmas.numel() < 2:
            raise ValueError("sigmas: need at least 2 noise levels (one sampling step)")
        if not bool((self.sigmas[:-1] > self.sigmas[1:]).all()):
            raise ValueError("sigmas must be strictly decreasing")

    @property
    def n_steps(self) -> int:
        return self.sigmas.numel() - 1

    def noise_scaling(self, sigma: float, noise: torch.Tensor) -> torch.Tensor:
        """x at σ from noise (ComfyUI ``model_sampling.noise_scaling``): x0 + σε (EPS/V), σε + (1−σ)x0 (flow)."""
        latent = torch.zeros_like(noise) if self.latent is None else self.latent.to(noise)
        if is_flow(self.parameterization):
            return sigma * noise + (1.0 - sigma) * latent
        return latent + sigma * noise

    def sigma_batch(self, i: int, n: int) -> torch.Tensor:
        return torch.full((n,), float(self.sigmas[i]), device=self.device, dtype=self.dtype)


@dataclass
class DualProcessConfig:
    """Reference defaults: 100 steps, AdamW lr 5e-5, clip 1, batch 1, a pool of 100 noises, adapter
    weight 5 at train and eval time (with rank 16 / alpha 8 that is an effective scale of 2.5)."""

    loop: LoopConfig = field(default_factory=LoopConfig)
    batch_size: int = 1
    noise_pool: int = 100
    train_scale: float = 5.0
    eval_scale: float = 5.0
    pixel_range: str = "minmax"
    max_start_step: Optional[int] = None   # draw i from 0..min(N−1, this); None = 0..N−1

    def validate(self) -> None:
        self.loop.validate()
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if int(self.noise_pool) < 1:
            raise ValueError(f"noise_pool must be >= 1, got {self.noise_pool}")
        if self.pixel_range not in PIXEL_RANGES:
            raise ValueError(f"pixel_range must be one of {PIXEL_RANGES}, got {self.pixel_range!r}")
        if not math.isfinite(self.train_scale) or self.train_scale == 0:
            raise ValueError(f"train_scale (LoRA scale while training) must be a non-zero number, got {self.train_scale}")

    def fingerprint(self) -> dict:
        d = asdict(self)
        d.pop("loop")
        d.pop("eval_scale")
        return d


def to_judge_range(images: torch.Tensor, mode: str) -> torch.Tensor:
    """The judge's copy of decoded images: ``minmax`` rescales the whole batch to [0, 1] (reference; keeps a
    gradient on every pixel), ``clamp`` clips to [0, 1] (what ComfyUI's VAE Decode shows), ``none``."""
    if mode == "minmax":
        lo, hi = images.amin(), images.amax()
        return (images - lo) / (hi - lo).clamp_min(1e-6)
    if mode == "clamp":
        return images.clamp(0.0, 1.0)
    if mode == "none":
        return images
    raise ValueError(f"pixel_range must be one of {PIXEL_RANGES}, got {mode!r}")


def check_judges(judges: Sequence[DiscriminativeExpert], generator: Generator) -> list[DiscriminativeExpert]:
    judges = list(judges or [])
    if not judges:
        raise ValueError("judges: connect at least one differentiable judge (VLM Judge, CLIP Judge, classifier…)")
    for judge in judges:
        if not isinstance(judge, DiscriminativeExpert):
            raise TypeError(f"judges: expected DiscriminativeExpert objects, got {type(judge).__name__}")
        if not judge.differentiable:
            raise ValueError(f"judge {judge.name!r} is not differentiable (a black-box reward); Dual-Process tuning "
                             "backpropagates through the judge — use a differentiable judge")
        if judge.space == PIXEL and generator.decode is None:
            raise ValueError(f"judge {judge.name!r} scores pixels but no decoder (VAE) was given")
    return judges


def noise_batch(generator: Generator, seed: int, indices: Sequence[int]) -> torch.Tensor:
    """Noises of the fixed pool: noise k depends only on (seed, k) (CPU generator, device independent)."""
    rows = [torch.randn(tuple(generator.latent_shape), generator=step_generator(seed, int(k), NOISE_STREAM))
            for k in indices]
    return torch.stack(rows).to(device=generator.device, dtype=generator.dtype)


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """k-diffusion Euler: x + (σ' − σ)·(x − D)/σ (DDIM for EPS, flow Euler for CONST); σ' = 0 gives D."""
    if sigma_next == 0:
        return denoised
    return x + (sigma_next - sigma) * (x - denoised) / sigma


@torch.no_grad()
def sample_to(generator: Generator, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """x_i after ``steps`` Euler steps from σ_0 (no gradient; uses the model as currently adapted)."""
    sig = generator.sigmas
    x = generator.noise_scaling(float(sig[0]), noise)
    for j in range(int(steps)):
        d = generator.denoise(x, generator.sigma_batch(j, x.shape[0]))
        x = euler_step(x, d, float(sig[j]), float(sig[j + 1]))
    return x


def dual_process_step(generator: Generator, judges: Sequence[DiscriminativeExpert], config: DualProcessConfig,
                      step: int, shard: tuple[int, int] = (0, 1)) -> StepOutput:
    """Loss of training step ``step`` (1-based): on-policy x_i without gradient, one step with gradient.
    ``shard=(rank, world size)``: this data-parallel rank's contiguous block of the step's noises."""
    seed, b = config.loop.seed, int(config.batch_size)
    indices = [((step - 1) * b + j) % config.noise_pool for j in range(b)]
    rank, world = shard
    indices = indices[rank * b // world:(rank + 1) * b // world]
    b = len(indices)
    noise = noise_batch(generator, seed, indices)
    top = generator.n_steps - 1
    if config.max_start_step is not None:
        top = max(0, min(top, int(config.max_start_step)))
    i = int(torch.randint(0, top + 1, (1,), generator=step_generator(seed, step, STEP_STREAM)))
    x_i = sample_to(generator, noise, i)
    x0 = generator.denoise(x_i, generator.sigma_batch(i, b))
    decode = None
    if generator.decode is not None:
        decode = lambda z: to_judge_range(generator.decode(z), config.pixel_range)  # noqa: E731
    score = evaluate_potentials(judges, x0, decode=decode)
    loss = -score.mean()
    return StepOutput(loss, {"score": float(score.detach().mean()), "start_step": float(i)})


def tune(generator: Generator, judges: Sequence[DiscriminativeExpert], network: LoRANetwork,
         config: DualProcessConfig, *, checkpoints: Optional[CheckpointStore] = None, resume: bool = True,
         fingerprint: Optional[dict] = None, progress=None, should_stop=None, shard: tuple[int, int] = (0, 1),
         reduce_gradients=None, wrap_step=None) -> TrainResult:
    """Dual-Process tuning of ``network`` (already applied to the model behind ``generator.denoise``).
    The adapter weight is ``train_scale`` during training and ``eval_scale`` afterwards.
    ``shard`` / ``reduce_gradients``: data parallel (see :func:`dual_process_step` and the core loop);
    ``wrap_step(step_fn) -> step_fn``: e.g. record the loss and metrics averaged over the ranks."""
    config.validate()
    judges = check_judges(judges, generator)
    fp = {"dual_process": config.fingerprint(), "sigmas": [round(float(s), 6) for s in generator.sigmas],
          "parameterization": generator.parameterization, "latent_shape": list(generator.latent_shape),
          "judges": [j.name for j in judges], **(fingerprint or {})}
    network.scale = float(config.train_scale)
    try:
        step_fn = lambda step: dual_process_step(generator, judges, config, step, shard)  # noqa: E731
        if wrap_step is not None:
            step_fn = wrap_step(step_fn)
        return train(network, step_fn, config.loop,
                     checkpoints=checkpoints, resume=resume, fingerprint=fp, progress=progress,
                     should_stop=should_stop, reduce_gradients=reduce_gradients)
    finally:
        network.scale = float(config.eval_scale)


@torch.no_grad()
def sample(generator: Generator, noise: torch.Tensor) -> torch.Tensor:
    """Full Euler sampling from noise (the model as currently adapted)."""
    return sample_to(generator, noise, generator.n_steps)


@torch.no_grad()
def evaluate(generator: Generator, judges: Sequence[DiscriminativeExpert], network: Optional[LoRANetwork],
             scales: Sequence[float], seeds: Sequence[int], pixel_range: str = "clamp",
             batch_size: int = 4) -> dict[float, torch.Tensor]:
    """Judge scores of fully sampled images for each adapter weight in ``scales`` (0 = base model), one
    image per evaluation seed (noise = pool entry 0 of that seed).  The reference compares weight 0 vs 5."""
    judges = check_judges(judges, generator)
    noise = torch.cat([noise_batch(generator, s, [0]) for s in seeds])
    out = {}
    previous = network.scale if network is not None else None
    try:
        for scale in scales:
            if network is not None:
                network.scale = float(scale)
            scores = []
            for start in range(0, noise.shape[0], batch_size):
                x0 = sample(generator, noise[start:start + batch_size])
                decode = None
                if generator.decode is not None:
                    decode = lambda z: to_judge_range(generator.decode(z), pixel_range)  # noqa: E731
                scores.append(evaluate_potentials(judges, x0, decode=decode).float().cpu())
            out[float(scale)] = torch.cat(scores)
    finally:
        if network is not None:
            network.scale = previous
    return out
