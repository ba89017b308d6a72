"""Shipped weights of the digits models: atomic safetensors + JSON metadata, and loaders.

Each model NAME is two files in the weights folder: ``NAME.safetensors`` (the state dict; the UNet and the
MLP denoiser in fp16) and ``NAME.json`` (config, seed, training time, held-out metrics). Only safetensors
is read: no pickle.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch

from ..fileio import atomic_save_safetensors, atomic_write_text
from .models import (
    DigitsDenoiser, DigitsEvaluator, EDMUNet, MLPDenoiserNet, NoiseAwareClassifier, UNET_CONFIG, build_unet,
)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MODEL_NAMES = ("digits_unet", "digits_classifier", "digits_evaluator", "digits_mlp")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _model_path(name: str, folder, suffix: str) -> Path:
    if not _SAFE_NAME.match(name) or name.startswith("."):
        raise ValueError(f"model name {name!r} must be a plain file name (letters, digits, '_', '-', '.')")
    folder = Path(folder) if folder is not None else WEIGHTS_DIR
    return folder / f"{name}{suffix}"


def _write_metadata(name: str, folder, meta: dict) -> None:
    atomic_write_text(_model_path(name, folder, ".json"), json.dumps(meta, indent=2, sort_keys=True) + "\n")


def save_model(module: torch.nn.Module, name: str, metadata: dict, folder=None, dtype: Optional[torch.dtype] = None) -> Path:
    """Write NAME.safetensors (optionally cast floats to ``dtype``) and NAME.json atomically; returns the weights path."""
    state = {}
    for key, value in module.state_dict().items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        state[key] = value.contiguous()
    weights = _model_path(name, folder, ".safetensors")
    meta = dict(metadata, weights_file=weights.name, weights_dtype=str(dtype or torch.float32).replace("torch.", ""))
    atomic_save_safetensors(weights, state, {"name": name})
    meta["weights_bytes"] = weights.stat().st_size
    _write_metadata(name, folder, meta)
    return weights


def load_metadata(name: str, folder=None) -> dict:
    path = _model_path(name, folder, ".json")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: train the digits models with `python -m comfy_poe.digits.train --what all`"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _load_state(module: torch.nn.Module, name: str, folder, device, dtype) -> torch.nn.Module:
    from safetensors.torch import load_file

    path = _model_path(name, folder, ".safetensors")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: train the digits models with `python -m comfy_poe.digits.train --what all`"
        )
    state = load_file(str(path))
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    module.to(device=device, dtype=dtype)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_classifier(device="cpu", dtype: torch.dtype = torch.float32, folder=None) -> NoiseAwareClassifier:
    """The noise-aware guidance classifier p(y | x_σ) (eval mode, frozen)."""
    meta = load_metadata("digits_classifier", folder)
    return _load_state(NoiseAwareClassifier(**meta["config"]), "digits_classifier", folder, device, dtype)


def load_evaluator(device="cpu", dtype: torch.dtype = torch.float32, folder=None) -> DigitsEvaluator:
    """The held-out evaluator CNN (judging only; eval mode, frozen)."""
    meta = load_metadata("digits_evaluator", folder)
    return _load_state(DigitsEvaluator(**meta["config"]), "digits_evaluator", folder, device, dtype)


def load_unet_network(device="cpu", dtype: torch.dtype = torch.float32, folder=None) -> EDMUNet:
    meta = load_metadata("digits_unet", folder)
    config = dict(UNET_CONFIG, **meta["config"]["unet"])
    network = EDMUNet(build_unet(config), sigma_data=meta["config"]["sigma_data"])
    return _load_state(network, "digits_unet", folder, device, dtype)


def load_mlp_network(device="cpu", dtype: torch.dtype = torch.float32, folder=None) -> MLPDenoiserNet:
    meta = load_metadata("digits_mlp", folder)
    return _load_state(MLPDenoiserNet(**meta["config"]), "digits_mlp", folder, device, dtype)


def load_denoiser(device="cpu", dtype: torch.dtype = torch.float32, with_classifier: bool = True,
                  model: str = "unet", folder=None, max_batch: Optional[int] = None) -> DigitsDenoiser:
    """The class-conditional digits denoiser as an engine model (``parameterization="eps"``, ``denoise``).

    model: "unet" (default, the quality model) or "mlp" (the fast MLP denoiser, if shipped).
    with_classifier: attach the noise-aware classifier so that class-set conditionings (attribute experts
    p(x | y ∈ S)) work.
    """
    if model == "unet":
        network = load_unet_network(device, dtype, folder)
    elif model == "mlp":
        network = load_mlp_network(device, dtype, folder)
    else:
        raise ValueError(f"model must be 'unet' or 'mlp', got {model!r}")
    classifier = load_classifier(device, torch.float32, folder) if with_classifier else None
    return DigitsDenoiser(network, classifier=classifier, max_batch=max_batch)


def update_metadata(name: str, extra: dict, folder=None) -> dict:
    """Merge ``extra`` into NAME.json (atomically) — e.g. sample-quality numbers measured after training."""
    meta = load_metadata(name, folder)
    meta.update(extra)
    _write_metadata(name, folder, meta)
    return meta
