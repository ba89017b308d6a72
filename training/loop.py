"""Generic seeded LoRA training loop: AdamW + gradient-norm clipping, optional autocast, progress and
interruption callbacks, atomic checkpoints and exact resume, loss/score curves rendered with pillow.

Reproducibility without saving RNG state: every random choice of step ``k`` comes from its own generator
seeded with (seed, k) (:func:`step_generator`), so a run resumed from the checkpoint after step k makes the
same choices as an uninterrupted run.  The checkpoint holds the LoRA factors and the optimizer state
exactly (float32 safetensors, no pickle), so resume is bitwise identical on the same device.

Checkpoint folder layout (the JSON is the commit point — a crash at any moment leaves the previous
checkpoint valid):
  lora.safetensors           the LoRA as a ComfyUI-native file (usable as is)
  state-<step>.safetensors   trainable factors + optimizer moments
  state.json                 step, history, fingerprint, parameter order, optimizer hyper-parameters
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file

from ..lora.io import atomic_write_safetensors
from ..fileio import atomic_write_text
from .lora import LoRANetwork

STATE_JSON = "state.json"
LORA_FILE = "lora.safetensors"
FORMAT_VERSION = 1
AUTOCAST_MODES = ("off", "auto", "bf16", "fp16")


class TrainingInterrupted(RuntimeError):
    """Raised by a ``should_stop`` callback to end a run early (the last checkpoint stays valid)."""


@dataclass
class LoopConfig:
    """Optimiser and bookkeeping settings (Dual-Process defaults: AdamW 5e-5, no weight decay, clip 1)."""

    steps: int = 100
    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0        # max grad norm (per clip group, see TrainableSet.clip_groups); 0 disables
    seed: int = 0
    checkpoint_every: int = 0     # 0: only the final checkpoint (when a folder is given)
    autocast: str = "off"         # off | auto (bf16 on CUDA when supported) | bf16 | fp16

    def validate(self) -> None:
        if int(self.steps) < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip}")
        if self.autocast not in AUTOCAST_MODES:
            raise ValueError(f"autocast must be one of {AUTOCAST_MODES}, got {self.autocast!r}")

    def fingerprint(self) -> dict:
        """Settings that must match for a checkpoint to be resumed (steps may grow)."""
        d = asdict(self)
        for k in ("steps", "checkpoint_every"):
            d.pop(k)
        d["betas"] = list(d["betas"])
        return d


@dataclass
class StepOutput:
    loss: torch.Tensor              # scalar with grad
    metrics: dict = field(default_factory=dict)  # floats recorded in the history (e.g. score)


@dataclass
class TrainResult:
    network: LoRANetwork
    history: list[dict]
    steps_done: int
    resumed_from: int = 0
    checkpoint: Optional[Path] = None


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """CPU generator for step ``step`` of run ``seed`` (stream separates independent uses)."""
    mixed = (int(seed) * 1_000_003 + int(step) * 7_919 + int(stream) * 104_729) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def autocast_context(mode: str, device: torch.device):
    """torch.autocast for the requested mode, or a disabled one (CPU / unsupported)."""
    device = torch.device(device)
    dtype = None
    if mode == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            dtype = torch.bfloat16
    elif mode == "bf16":
        dtype = torch.bfloat16
    elif mode == "fp16":
        dtype = torch.float16
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------ checkpoints
def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


@dataclass
class Checkpoint:
    step: int
    history: list[dict]
    fingerprint: dict
    tensors: dict[str, torch.Tensor]
    meta: dict


class CheckpointStore:
    """A folder holding the latest checkpoint of one run (see module docstring).

    ``export`` turns the network into the LoRA file's state dict (the node adds the ``diffusion_model.``
    prefix and scale there); ``metadata`` goes into that file.
    """

    def __init__(self, folder: str | os.PathLike,
                 export: Optional[Callable[[LoRANetwork], dict]] = None,
                 metadata: Optional[dict[str, str]] = None, writer: bool = True):
        self.folder = Path(folder)
        self.export = export or (lambda net: net.export_state_dict())
        self.metadata = dict(metadata or {})
        self.writer = writer  # False: load only (data-parallel ranks other than 0 never write)

    @property
    def lora_path(self) -> Path:
        return self.folder / LORA_FILE

    def save(self, step: int, network: LoRANetwork, optimizer: torch.optim.Optimizer, history: list[dict],
             fingerprint: dict) -> Path:
        if not self.writer:
            return self.folder / STATE_JSON
        self.folder.mkdir(parents=True, exist_ok=True)
        names = list(network.named_lora_parameters())
        tensors = {f"param/{n}": p.detach().float() for n, p in network.named_lora_parameters().items()}
        by_name = dict(network.named_lora_parameters())
        for n in names:
            state = optimizer.state.get(by_name[n], {})
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"optim/{n}/{key}"] = value.detach().float() if value.is_floating_point() else value
        state_name = f"state-{step}.safetensors"
        atomic_write_safetensors(self.folder / state_name, tensors)
        atomic_write_safetensors(self.lora_path, self.export(network),
                                 metadata={**self.metadata, "comfy_poe.training_step": str(step)})
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
                  for g in optimizer.param_groups]
        meta = {"format": FORMAT_VERSION, "step": step, "state_file": state_name, "params": names,
                "param_groups": groups, "alphas": [a.alpha for a in network.adapters],
                "fingerprint": fingerprint, "history": history}
        _atomic_write_text(self.folder / STATE_JSON, json.dumps(meta, indent=1, default=float))
        for old in self.folder.glob("state-*.safetensors"):
            if old.name != state_name:
                old.unlink(missing_ok=True)
        return self.folder / STATE_JSON

    def load(self) -> Optional[Checkpoint]:
        path = self.folder / STATE_JSON
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            tensors = load_file(str(self.folder / meta["state_file"]))
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"training checkpoint in {self.folder} is unreadable ({e}); delete the folder "
                             "or turn resume off") from None
        return Checkpoint(int(meta["step"]), list(meta["history"]), meta["fingerprint"], tensors, meta)


def restore(checkpoint: Checkpoint, network: LoRANetwork, optimizer: torch.optim.Optimizer) -> None:
    """Load factors and optimizer moments of ``checkpoint`` into a freshly built network/optimizer."""
    params = network.named_lora_parameters()
    if list(params) != list(checkpoint.meta["params"]):
        raise ValueError("the checkpoint was made for other LoRA modules (targets or model changed)")
    for alpha, adapter in zip(checkpoint.meta.get("alphas", []), network.adapters):
        adapter.alpha = float(alpha)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(checkpoint.tensors[f"param/{name}"].to(p))
    for name, p in params.items():
        prefix = f"optim/{name}/"
        state = {k[len(prefix):]: v for k, v in checkpoint.tensors.items() if k.startswith(prefix)}
        if state:
            state = {k: (v.to(p.device) if k != "step" else v) for k, v in state.items()}
            optimizer.state[p] = state


# ------------------------------------------------------------------------------------------------ loop
def make_optimizer(network: LoRANetwork, config: LoopConfig) -> torch.optim.AdamW:
    # foreach=False keeps the update order identical between fresh and resumed runs.
    return torch.optim.AdamW(list(network.named_lora_parameters().values()), lr=config.lr,
                             betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay,
                             foreach=False)


def train(network: LoRANetwork, step_fn: Callable[[int], StepOutput], config: LoopConfig, *,
          checkpoints: Optional[CheckpointStore] = None, resume: bool = True,
          fingerprint: Optional[dict] = None,
          progress: Optional[Callable[[int, int, dict], None]] = None,
          should_stop: Optional[Callable[[int], None]] = None,
          reduce_gradients: Optional[Callable[[list[torch.Tensor]], None]] = None) -> TrainResult:
    """Run steps 1..config.steps of ``step_fn(step) -> StepOutput`` (loss with grad) on the LoRA.

    ``should_stop(step)`` is called before each step and may raise (e.g. ComfyUI's interruption or
    :class:`TrainingInterrupted`); ``progress(step, total, record)`` after each.  With a checkpoint store,
    a checkpoint is written every ``checkpoint_every`` steps and at the end; ``resume`` continues from
    a stored checkpoint whose fingerprint matches (a mismatch is an error naming the difference).
    ``reduce_gradients(grads)`` runs after backward, before clipping (data-parallel: average the gradients of
    all ranks in place, so every rank clips and steps on the same gradient).
    """
    config.validate()
    fingerprint = {"loop": config.fingerprint(), **(fingerprint or {})}
    optimizer = make_optimizer(network, config)
    params = list(network.named_lora_parameters().values())
    device = params[0].device
    history: list[dict] = []
    start = 0
    if checkpoints is not None and resume:
        ckpt = checkpoints.load()
        if ckpt is not None:
            if ckpt.fingerprint != json.loads(json.dumps(fingerprint, default=float)):
                diff = sorted(k for k in set(ckpt.fingerprint) | set(fingerprint)
                              if json.dumps(ckpt.fingerprint.get(k), default=float, sort_keys=True)
                              != json.dumps(fingerprint.get(k), default=float, sort_keys=True))
                raise ValueError(f"checkpoint in {checkpoints.folder} was made with other settings ({', '.join(diff)}); "
                                 "use another run name or turn resume off")
            if ckpt.step > config.steps:
                raise ValueError(f"checkpoint is at step {ckpt.step}, beyond steps={config.steps}")
            restore(ckpt, network, optimizer)
            history, start = ckpt.history, ckpt.step
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    network.train()
    for step in range(start + 1, config.steps + 1):
        if should_stop is not None:
            should_stop(step)
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(config.autocast, device):
            out = step_fn(step)
        loss = out.loss
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(f"training step {step}: the loss is {loss.item()} (lower lr, or check the judges)")
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            raise RuntimeError("the loss does not depend on the LoRA parameters: no gradient reached them "
                               "(is the LoRA applied to the model the step calls?)")
        if reduce_gradients is not None:
            for p in params:  # every rank must hand the same list to the collective
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in params]
            reduce_gradients(grads)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        if config.grad_clip > 0:
            # one norm per group: auxiliary modules (the GFlowNet flow network) must not scale the LoRA down
            for group in network.clip_groups():
                torch.nn.utils.clip_grad_norm_(group, config.grad_clip, foreach=False)
        optimizer.step()
        record = {"step": step, "loss": float(loss.detach()), "grad_norm": float(norm),
                  **{k: float(v) for k, v in out.metrics.items()}}
        history.append(record)
        if checkpoints is not None and ((config.checkpoint_every and step % config.checkpoint_every == 0)
                                        or step == config.steps):
            checkpoints.save(step, network, optimizer, history, fingerprint)
        if progress is not None:
            progress(step, config.steps, record)
    network.eval()
    return TrainResult(network, history, config.steps, start, checkpoints.folder if checkpoints else None)


# ---------------------------------------------------------------------------------------------- curves
def moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def render_curves(history: list[dict], keys: tuple[str, ...] = ("loss", "score"), width: int = 640,
                  panel_height: int = 200, title: str = ""):
    """PIL image with one panel per recorded key: raw values (light) and a moving average (dark),
    with min/max and first/last values printed.  Pillow only (no matplotlib)."""
    from PIL import Image, ImageDraw

    keys = tuple(k for k in keys if any(k in r for r in history)) or ("loss",)
    header = 18 if title else 0
    img = Image.new("RGB", (width, header + panel_height * len(keys)), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((6, 3), title, fill=(0, 0, 0))
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    margin_l, margin_r, margin_t, margin_b = 56, 12, 18, 20
    for p, key in enumerate(keys):
        top = header + p * panel_height
        steps = [r["step"] for r in history if key in r]
        values = [float(r[key]) for r in history if key in r]
        x0, x1 = margin_l, width - margin_r
        y0, y1 = top + margin_t, top + panel_height - margin_b
        draw.rectangle([x0, y0, x1, y1], outline=(160, 160, 160))
        if not values:
            draw.text((x0 + 4, y0 + 4), f"{key}: no data", fill=(0, 0, 0))
            continue
        lo, hi = min(values), max(values)
        span = hi - lo if hi > lo else 1.0
        s_lo, s_hi = steps[0], steps[-1]
        s_span = s_hi - s_lo if s_hi > s_lo else 1

        def xy(s, v):
            return (x0 + (s - s_lo) / s_span * (x1 - x0), y1 - (v - lo) / span * (y1 - y0))

        colour = colours[p % len(colours)]
        light = tuple(int(c + (255 - c) * 0.65) for c in colour)
        smooth = moving_average(values, max(1, len(values) // 10))
        for series, fill, w in ((values, light, 1), (smooth, colour, 2)):
            pts = [xy(s, v) for s, v in zip(steps, series)]
            if len(pts) > 1:
                draw.line(pts, fill=fill, width=w)
            else:
                draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=fill)
        draw.text((4, y0 - 2), f"{hi:.4g}", fill=(80, 80, 80))
        draw.text((4, y1 - 10), f"{lo:.4g}", fill=(80, 80, 80))
        draw.text((x0 + 4, top + 2), f"{key}: first {values[0]:.4g}  last {values[-1]:.4g}  "
                                     f"(avg first/last 10%: {smooth[min(len(smooth) - 1, max(0, len(values) // 10 - 1))]:.4g}"
                                     f" / {smooth[-1]:.4g})", fill=colour)
        draw.text((x0, y1 + 4), f"step {s_lo}", fill=(80, 80, 80))
        draw.text((x1 - 60, y1 + 4), f"step {s_hi}", fill=(80, 80, 80))
    return img


# ------------------------------------------------------------------------------------------- memory
def top_level_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The highest sub-modules that are not containers (children of the root, elements of the
    top-level ModuleLists / Sequentials): the units gradient checkpointing recomputes."""
    blocks = []
    for child in model.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)):
            blocks.extend(top_level_blocks(child))
        else:
            blocks.append(child)
    return blocks


def enable_gradient_checkpointing(model: torch.nn.Module) -> Callable[[], None]:
    """Recompute each top-level block in the backward pass instead of storing its activations
    (torch.utils.checkpoint, non-reentrant).  Returns a function that restores the original forwards."""
    import torch.utils.checkpoint as checkpoint

    patched = []
    for block in top_level_blocks(model):
        if "forward" in block.__dict__:  # already patched
            continue
        original = block.forward

        def forward(*args, _original=original, **kwargs):
            if not torch.is_grad_enabled():
                return _original(*args, **kwargs)
            return checkpoint.checkpoint(_original, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        patched.append(block)

    def undo():
        for block in patched:
            block.__dict__.pop("forward", None)

    return undo
