"""One trainable LoRA representation for UNet and DiT models (Hu et al. 2021, "LoRA", Eq. 3).

A targeted layer with weight W (out, in[, kh, kw]) computes with

    W' = W + s · (α / r) · up @ down          up (out, r),  down (r, in[, kh, kw])

where r is the rank, α the alpha and s the adapter weight ("LoRA scale", PEFT's ``scale`` /
ComfyUI's ``strength_model``).  The same :class:`LoRAAdapter` can be applied two ways, with the same
arithmetic:

* **forward hooks** on plain torch modules (tests, engine use): y = layer(x) + s·(α/r)·up(down(x));
* **weight wrappers** ``adapter(W) -> W'`` — the form ComfyUI's ``ModelPatcher.add_weight_wrapper``
  expects, applied per patcher so the shared base model is never modified.

Files are written in ComfyUI's native key format ``<prefix><module path>.lora_up.weight`` /
``.lora_down.weight`` / ``.alpha`` (read by ``comfy_poe.lora`` and by ComfyUI's LoraLoader, which computes
(alpha / r) · strength).  The adapter weight used when exporting is folded into the stored alpha, so a
file loaded at strength 1.0 reproduces the model as it was trained/evaluated.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------- targets
# Module-path patterns (matched with re.search against the full dotted path of an nn.Linear/nn.Conv2d).
# diffusers / ComfyUI-LDM attention (to_q…, add_*_proj, to_add_out), CLIP-style q/k/v/out_proj, and DiT
# naming: Flux/SD3 ``*attn.qkv`` / ``*attn.proj``; Flux single blocks fuse attention + MLP in linear1/2.
ATTENTION_PATTERN = (r"(^|\.)(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|"
                     r"q_proj|k_proj|v_proj|out_proj)$|attn\.(qkv|proj)$|single_blocks\.\d+\.(linear1|linear2)$")
FEEDFORWARD_PATTERN = (r"(^|\.)(ff|ff_context)\.net\.(0\.proj|2)$|(^|\.)mlp\.(fc1|fc2|0|2)$|_mlp\.(0|2)$|"
                       r"(^|\.)(proj_mlp|fc1|fc2)$")
TARGET_PRESETS = {
    "attention": ATTENTION_PATTERN,
    "feedforward": FEEDFORWARD_PATTERN,
    "attention+feedforward": f"(?:{ATTENTION_PATTERN})|(?:{FEEDFORWARD_PATTERN})",
}
INITS = ("gaussian", "kaiming")


def target_pattern(targets: str) -> re.Pattern:
    """Compiled pattern for a preset name (see TARGET_PRESETS) or a custom regular expression."""
    text = TARGET_PRESETS.get(str(targets).strip(), str(targets).strip())
    if not text:
        raise ValueError("targets is empty: use 'attention', 'feedforward', 'attention+feedforward' or a regex")
    try:
        return re.compile(text)
    except re.error as e:
        raise ValueError(f"targets {targets!r} is not a valid regular expression ({e})") from None


def find_targets(model: nn.Module, targets: str = "attention+feedforward",
                 exclude: Optional[str] = None) -> list[tuple[str, nn.Module]]:
    """(path, module) of every nn.Linear / ungrouped nn.Conv2d whose dotted path matches ``targets``
    (ComfyUI's ``comfy.ops`` layers subclass these, so the same search works inside ComfyUI)."""
    pattern = target_pattern(targets)
    skip = re.compile(exclude) if exclude else None
    found = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or module.weight is None:
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            continue
        if pattern.search(path) and not (skip and skip.search(path)):
            found.append((path, module))
    if not found:
        raise ValueError(f"targets {targets!r} match no Linear/Conv2d layer of this model "
                         "(try 'attention+feedforward' or a custom regex such as 'to_q$|to_v$')")
    return found


# --------------------------------------------------------------------------------------- adapter
class LoRAAdapter(nn.Module):
    """Low-rank update of one layer.  ``up`` is stored flat (out, r); ``down`` keeps the kernel dims."""

    def __init__(self, weight_shape: tuple[int, ...], rank: int, alpha: float, network: "LoRANetwork",
                 conv: Optional[dict] = None, dtype=torch.float32, device=None):
        super().__init__()
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.conv = conv  # stride / padding / dilation of a Conv2d target, None for Linear
        self.up = nn.Parameter(torch.zeros(self.weight_shape[0], self.rank, dtype=dtype, device=device))
        self.down = nn.Parameter(torch.zeros(self.rank, *self.weight_shape[1:], dtype=dtype, device=device))
        # A plain attribute (not a submodule): the network owns its adapters, not the other way round.
        self.__dict__["network"] = network

    def reset(self, init: str, generator: torch.Generator) -> None:
        """up = 0 (the model starts unchanged); down ~ N(0, 1/r²) ("gaussian", PEFT's init_lora_weights=
        "gaussian", used by Dual-Process) or Kaiming-uniform with a = √5 ("kaiming", PEFT's default)."""
        with torch.no_grad():
            self.up.zero_()
            if init == "gaussian":
                values = torch.randn(self.down.shape, generator=generator) / self.rank
            elif init == "kaiming":
                fan_in = math.prod(self.weight_shape[1:])
                bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=√5) on a (r, fan_in) matrix
                values = (torch.rand(self.down.shape, generator=generator) * 2 - 1) * bound
            else:
                raise ValueError(f"init must be one of {INITS}, got {init!r}")
            self.down.copy_(values.to(self.down))

    @property
    def factor(self) -> float:
        """s · α / r: the multiplier of up @ down at the network's current adapter weight."""
        return self.network.scale * self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """ΔW = s·(α/r)·up @ down, shaped like the layer's weight."""
        return (self.factor * (self.up @ self.down.flatten(1))).reshape(self.weight_shape)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:  # weight-wrapper form (ComfyUI)
        """W' = W + ΔW in W's dtype/device (differentiable in the factors)."""
        if self.network.scale == 0:
            return weight
        return weight + self.delta().to(device=weight.device, dtype=weight.dtype)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """s·(α/r)·up(down(x)) — the hook form, without building ΔW."""
        dtype = self.down.dtype
        if self.conv is None:
            h = F.linear(F.linear(x.to(dtype), self.down), self.up)
        else:
            h = F.conv2d(x.to(dtype), self.down, stride=self.conv["stride"], padding=self.conv["padding"],
                         dilation=self.conv["dilation"])
            h = F.conv2d(h, self.up[:, :, None, None])
        return (self.factor * h).to(x.dtype)

    def move_to(self, device=None) -> int:
        """ComfyUI's ModelPatcher moves weight functions with ``move_to`` (returns bytes moved)."""
        self.to(device=device)
        return sum(p.numel() * p.element_size() for p in self.parameters())


# --------------------------------------------------------------------------------------- network
class LoRANetwork(nn.Module):
    """All adapters of one model, addressed by module path; ``scale`` is the adapter weight s."""

    def __init__(self, rank: int, alpha: float, scale: float = 1.0, targets: str = "", init: str = "gaussian"):
        super().__init__()
        if int(rank) < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if not math.isfinite(float(alpha)) or float(alpha) <= 0:
            raise ValueError(f"alpha must be a positive number, got {alpha}")
        self.rank, self.alpha, self.scale = int(rank), float(alpha), float(scale)
        self.targets, self.init = targets, init
        self.paths: list[str] = []
        self.adapters = nn.ModuleList()
        self._hooks: list = []

    def add(self, path: str, layer: nn.Module, dtype=torch.float32, device=None) -> LoRAAdapter:
        conv = None
        if isinstance(layer, nn.Conv2d):
            conv = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}
            if isinstance(layer.padding, str):
                raise ValueError(f"{path}: Conv2d with padding={layer.padding!r} is not supported as a LoRA target")
        adapter = LoRAAdapter(tuple(layer.weight.shape), self.rank, self.alpha, self, conv, dtype,
                              device if device is not None else layer.weight.device)
        self.paths.append(path)
        self.adapters.append(adapter)
        return adapter

    def items(self) -> Iterable[tuple[str, LoRAAdapter]]:
        return zip(self.paths, self.adapters)

    def named_lora_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable parameters by stable name ``<path>.lora_up`` / ``<path>.lora_down``."""
        out = {}
        for path, adapter in self.items():
            out[f"{path}.lora_up"] = adapter.up
            out[f"{path}.lora_down"] = adapter.down
        return out

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Parameter groups the training loop clips on separate norms: one, the whole LoRA."""
        return [list(self.named_lora_parameters().values())]

    # -- application -----------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> "LoRANetwork":
        """Apply to a plain torch model with forward hooks (undo with :meth:`detach`)."""
        modules = dict(model.named_modules())
        self.detach()
        for path, adapter in self.items():
            if path not in modules:
                raise ValueError(f"LoRA module {path!r} is not a layer of this model")
            self._hooks.append(modules[path].register_forward_hook(
                lambda _m, args, out, a=adapter: out + a.branch(args[0]) if a.network.scale != 0 else out))
        return self

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def weight_wrappers(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """``{"<path>.weight": adapter}`` for ComfyUI's ``add_weight_wrapper`` (paths relative to the
        module the network was created on)."""
        return {f"{path}.weight": adapter for path, adapter in self.items()}

    # -- export / import -------------------------------------------------------------------------
    def export_state_dict(self, prefix: str = "", scale: Optional[float] = None,
                          dtype: Optional[torch.dtype] = None,
                          key_fn: Optional[Callable[[str], str]] = None) -> dict[str, torch.Tensor]:
        """ComfyUI-native LoRA state dict.  ``scale`` (default: the current adapter weight) is folded into
        the stored alpha, so loading the file at strength 1.0 reproduces ΔW at that weight.
        ``key_fn`` maps a module path to its key prefix (default ``prefix + path``)."""
        scale = self.scale if scale is None else float(scale)
        sd = {}
        for path, adapter in self.items():
            key = key_fn(path) if key_fn is not None else prefix + path
            up = adapter.up.detach()
            if adapter.conv is not None:
                up = up[:, :, None, None]
            down = adapter.down.detach()
            if dtype is not None:
                up, down = up.to(dtype), down.to(dtype)
            sd[f"{key}.lora_up.weight"] = up.cpu().contiguous()
            sd[f"{key}.lora_down.weight"] = down.cpu().contiguous()
            sd[f"{key}.alpha"] = torch.tensor(adapter.alpha * scale, dtype=torch.float32)
        return sd

    def load_factors(self, sd: dict[str, torch.Tensor], prefix: str = "", scale: float = 1.0,
                     strict: bool = True) -> list[str]:
        """Load factors from a native-format state dict written by :meth:`export_state_dict` at adapter
        weight ``scale`` (the stored alpha / scale becomes this network's α).  Returns missing paths."""
        missing = []
        for path, adapter in self.items():
            key = prefix + path
            if f"{key}.lora_up.weight" not in sd or f"{key}.lora_down.weight" not in sd:
                missing.append(path)
                continue
            up = sd[f"{key}.lora_up.weight"].reshape(adapter.up.shape[0], -1)
            down = sd[f"{key}.lora_down.weight"]
            if up.shape != adapter.up.shape or down.shape != adapter.down.shape:
                raise ValueError(f"LoRA module {key}: file has up {tuple(up.shape)} / down {tuple(down.shape)}, "
                                 f"the network needs {tuple(adapter.up.shape)} / {tuple(adapter.down.shape)} "
                                 "(different rank or model?)")
            with torch.no_grad():
                adapter.up.copy_(up.to(adapter.up))
                adapter.down.copy_(down.to(adapter.down))
            if f"{key}.alpha" in sd:
                adapter.alpha = float(sd[f"{key}.alpha"].float().item()) / float(scale)
        if strict and missing:
            raise ValueError(f"LoRA state lacks {len(missing)} module(s) of this network, e.g. {missing[:3]}")
        return missing


@dataclass
class LoRAConfig:
    """How to build a LoRA: Dual-Process defaults (rank 16, PEFT alpha 8, Gaussian init, attention +
    feed-forward targets)."""

    rank: int = 16
    alpha: float = 8.0
    targets: str = "attention+feedforward"
    exclude: Optional[str] = None
    init: str = "gaussian"
    scale: float = 1.0

    def fingerprint(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": self.targets, "exclude": self.exclude,
                "init": self.init}


def create_lora(model: nn.Module, config: LoRAConfig, seed: int = 0, dtype=torch.float32,
                device=None) -> LoRANetwork:
    """Build (not attach) a LoRA network over ``model``'s matching layers, seeded (CPU generator, so the
    initial factors do not depend on the device)."""
    if config.init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {config.init!r}")
    network = LoRANetwork(config.rank, config.alpha, config.scale, config.targets, config.init)
    generator = torch.Generator().manual_seed(int(seed))
    for path, layer in find_targets(model, config.targets, config.exclude):
        network.add(path, layer, dtype=dtype, device=device).reset(config.init, generator)
    return network
