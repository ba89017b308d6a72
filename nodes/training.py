"""Dual-Process tuning nodes: a differentiable judge (VLM, CLIP, classifier…) tunes a LoRA on the model.

Thin ComfyUI layer over comfy_poe.training.  Why the set-up looks the way it does (see notes on ComfyUI):
ComfyUI loads checkpoints under inference mode, so base weights are inference tensors that autograd cannot
save.  Training therefore runs inside ``torch.inference_mode(False)``; on a ``model.clone()`` every layer
gets a weight wrapper — the LoRA adapter on targeted layers, a clone elsewhere — so the shared base model
is never modified and backward works; the VAE decoder is deep-copied for a differentiable decode.  The
training loop runs as a custom ``Sampler`` inside ``CFGGuider.sample`` so conditioning, CFG and model
loading follow ComfyUI's normal path.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time

import numpy as np
import torch

import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..lora.formats import check_finite
from ..lora.io import LoraFileError, atomic_write_safetensors, check_overwrite, load_lora_file, resolve_save_path
from ..training import (
    CheckpointStore, DualProcessConfig, Generator, LoopConfig, LoRAConfig, create_lora,
    enable_gradient_checkpointing, evaluate, render_curves, tune,
)
from ..training.dual_process import PIXEL_RANGES
from ..training.lora import TARGET_PRESETS
from ._types import PoEJudges

TRAINING_KEY = "comfy_poe.training"      # metadata key marking files written by these nodes
RUNS_FOLDER = "comfy_poe_training"       # checkpoints: <output>/comfy_poe_training/<run_name>/
RUN_PREFIX = "run: "
TARGET_OPTIONS = [*TARGET_PRESETS, "custom"]
PRECISIONS = ["auto", "off"]


def trainer_outputs(what: str, curves: str) -> list:
    """The four outputs every LoRA trainer node returns: model, lora, curves, report."""
    return [
        io.Model.Output(display_name="model", tooltip=f"The model with the {what} LoRA applied."),
        io.LoraModel.Output(display_name="lora", tooltip=f"The {what} LoRA (connect Save Trained LoRA)."),
        io.Image.Output(display_name="curves", tooltip=curves),
        io.String.Output(display_name="report"),
    ]


class TrainedLoRA(dict):
    """A LORA_MODEL (ComfyUI's plain dict of tensors) that also carries the safetensors metadata."""

    def __init__(self, tensors, metadata=None):
        super().__init__(tensors)
        self.metadata = dict(metadata or {})


# ----------------------------------------------------------------------------------------------- helpers
def parameterization_of(model_sampling) -> str:
    """"const" for flow (CONST) models, else "eps" (EPS, V_PREDICTION, X0 share VE coordinates)."""
    return "const" if isinstance(model_sampling, comfy.model_sampling.CONST) else "eps"


def runs_root() -> str:
    return os.path.join(folder_paths.get_output_directory(), RUNS_FOLDER)


def run_folder(run_name: str):
    try:
        return resolve_save_path(runs_root(), run_name, suffix="")
    except LoraFileError as e:
        raise ValueError(f"run_name: {e}") from None


def run_name_error(run_name) -> str | None:
    """validate_inputs helper: the message for a run_name that :func:`run_folder` refuses (None: fine,
    empty or linked)."""
    if run_name is None or not str(run_name).strip():
        return None
    try:
        run_folder(run_name)
    except ValueError as e:
        return str(e)
    return None


def prepare_trainable_patcher(model, network) -> "comfy.model_patcher.ModelPatcher":
    """A clone of ``model`` whose targeted layers carry the LoRA as weight wrappers and whose other
    weights are cloned on use (inference tensors cannot be saved for backward)."""
    mp = model.clone()
    dm = mp.model.diffusion_model
    modules = dict(dm.named_modules())
    adapters = dict(network.items())
    for path in adapters:
        if not hasattr(modules[path], "weight_function"):
            raise ValueError(f"layer diffusion_model.{path} is not a ComfyUI-managed layer; exclude it from targets")

    def clone(w):
        return w.clone()

    for name, m in dm.named_modules():
        if hasattr(m, "weight_function"):
            key = f"diffusion_model.{name}"
            if getattr(m, "weight", None) is not None:
                mp.add_weight_wrapper(f"{key}.weight", adapters.get(name, clone))
            if getattr(m, "bias", None) is not None:
                mp.add_weight_wrapper(f"{key}.bias", clone)
        else:  # parameters / buffers used outside comfy.ops (e.g. RMSNorm scales): normal-tensor copies
            for pname, p in m.named_parameters(recurse=False):
                if p.is_inference():
                    mp.add_object_patch(f"diffusion_model.{name}.{pname}".replace("..", "."),
                                        torch.nn.Parameter(p.detach().clone(), requires_grad=False))
            for bname, b in m.named_buffers(recurse=False):
                if b is not None and b.is_inference():
                    mp.add_object_patch(f"diffusion_model.{name}.{bname}".replace("..", "."), b.clone())
    return mp


def differentiable_decoder(vae, base_model):
    """x̂0 (model latent space) -> IMAGE-like (N, H, W, C) ≈ [0, 1], differentiable: a private copy of the VAE
    (made outside inference mode so its weights are normal tensors), unclamped (x + 1) / 2."""
    module = copy.deepcopy(vae.first_stage_model).requires_grad_(False).to(vae.device)
    dtype = vae.vae_dtype

    def decode(x0):
        z = base_model.process_latent_out(x0)
        if z.ndim != 4:
            raise ValueError("Dual-Process tuning supports image latents (N, C, H, W); video/audio VAEs are not supported")
        raw = module.decode(z.to(device=vae.device, dtype=dtype)).float()
        return ((raw + 1.0) / 2.0).movedim(1, -1)

    return decode, module


def curve_tensor(history, title, keys=("loss", "score", "grad_norm")) -> torch.Tensor:
    """The training curves (``keys`` of the history) as a one-image IMAGE batch."""
    img = render_curves(history, keys=keys, title=title)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


class DualProcessSampler(comfy.samplers.Sampler):
    """Runs the whole tuning loop where a sampler would run (the guider supplies the CFG'd denoiser)."""

    def __init__(self, run):
        self.run = run
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        def denoise(x, sigma):
            return model_wrap(x, sigma, **extra_args)

        self.result = self.run(denoise, sigmas, latent_image, model_wrap.inner_model)
        return latent_image


# ------------------------------------------------------------------------------------------------- nodes
class PoEDualProcessTune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEDualProcessTune",
            display_name="Dual-Process Tune (PoE)",
            category="poe/training",
            description="Tune a LoRA so the model's images answer the judges' questions better (Dual-Process, "
                        "Luo et al. 2025): one generator step with gradient, VAE decode, judge loss, AdamW.",
            inputs=[
                io.Model.Input("model", tooltip="Diffusion / flow model to tune (SD-like EPS or Flux-like flow)."),
                io.Vae.Input("vae", tooltip="VAE of the model; its decoder is copied to backpropagate through it."),
                io.Conditioning.Input("positive", tooltip="Prompt the images are generated from while tuning."),
                PoEJudges.Input("judges", tooltip="Differentiable judges (VLM Judge in dual_process mode = the paper's "
                                                  "loss; CLIP Judge; classifiers). Loss = −Σ strength·score."),
                io.Latent.Input("latent", tooltip="Empty latent: its size is the training image size and its batch "
                                                  "size the training batch (reference: batch 1)."),
                io.Int.Input("steps", default=100, min=1, max=100000, tooltip="Training steps (reference: 100)."),
                io.Int.Input("sampling_steps", default=1, min=1, max=200,
                             tooltip="Inference steps N of the model (Flux-schnell 1, SD ~20). Each training step "
                                     "starts at a random step i < N reached without gradient."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="simple",
                               tooltip="Noise schedule of the N sampling steps."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance while tuning (1 = off; needs negative when > 1)."),
                io.Float.Input("lr", default=5e-5, min=1e-7, max=1.0, step=1e-6, round=1e-7,
                               tooltip="AdamW learning rate (reference 5e-5)."),
                io.Int.Input("rank", default=16, min=1, max=512, tooltip="LoRA rank (reference 16)."),
                io.Float.Input("alpha", default=8.0, min=0.01, max=1024.0, step=0.5,
                               tooltip="LoRA alpha (reference 8; the update is scaled by alpha/rank)."),
                io.Float.Input("lora_scale", default=5.0, min=0.01, max=100.0, step=0.1,
                               tooltip="Adapter weight at training and in the outputs (reference 5, i.e. 2.5 "
                                       "effective with rank 16 / alpha 8). Folded into the saved file, so "
                                       "strength 1.0 in LoraLoader reproduces the tuned model."),
                io.Combo.Input("targets", options=TARGET_OPTIONS, default="attention+feedforward",
                               tooltip="Layers that get a LoRA: attention (q/k/v/out, qkv/proj in DiTs), "
                                       "feed-forward, both, or custom (regex below)."),
                io.String.Input("custom_targets", default="", tooltip="Regular expression on layer paths, used when "
                                                                     "targets = custom (e.g. 'attn2\\.to_(q|k|v)$')."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds the LoRA init, the noise pool and the random start steps."),
                io.Combo.Input("pixel_range", options=list(PIXEL_RANGES), default="minmax",
                               tooltip="How the decoded image is put in [0, 1] for the judges: minmax over the batch "
                                       "(reference; gradient everywhere) or clamp (as VAE Decode shows it)."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute activations in backward: much less memory, ~30% slower."),
                io.Combo.Input("precision", options=PRECISIONS, default="auto",
                               tooltip="auto: bf16 autocast where the GPU supports it; off: the model's own dtype."),
                io.Float.Input("grad_clip", default=1.0, min=0.0, max=1000.0, step=0.1,
                               tooltip="Max gradient norm (reference 1; 0 = no clipping)."),
                io.Int.Input("noise_pool", default=100, min=1, max=100000,
                             tooltip="Size of the fixed pool of training noises (reference 100)."),
                io.Int.Input("eval_images", default=2, min=0, max=64,
                             tooltip="Images sampled with and without the LoRA to report the judges' score "
                                     "before/after (0 = skip)."),
                io.String.Input("run_name", default="",
                                tooltip="Folder under output/comfy_poe_training for checkpoints (empty = none). "
                                        "An interrupted run keeps its last checkpoint and resumes from it."),
                io.Int.Input("checkpoint_every", default=25, min=0, max=100000,
                             tooltip="Write a checkpoint every k steps (0 = only at the end); needs run_name."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Continue from run_name's checkpoint when its settings match."),
                io.Conditioning.Input("negative", optional=True, tooltip="Negative prompt, used when cfg > 1."),
                io.LoraModel.Input("init_lora", optional=True,
                                   tooltip="Start from a trained LoRA (Load Trained LoRA) of the same rank/targets."),
            ],
            outputs=trainer_outputs("tuned", "Loss, judge score and gradient norm per step."),
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, targets, scheduler, pixel_range, precision, run_name=None):
        if (error := run_name_error(run_name)):
            return error
        if targets is not None and targets not in TARGET_OPTIONS:
            return f"targets must be one of {TARGET_OPTIONS}, got {targets!r}"
        if scheduler is not None and scheduler not in comfy.samplers.SCHEDULER_NAMES:
            return f"scheduler must be one of {comfy.samplers.SCHEDULER_NAMES}, got {scheduler!r}"
        if pixel_range is not None and pixel_range not in PIXEL_RANGES:
            return f"pixel_range must be one of {list(PIXEL_RANGES)}, got {pixel_range!r}"
        if precision is not None and precision not in PRECISIONS:
            return f"precision must be one of {PRECISIONS}, got {precision!r}"
        return True

    @classmethod
    def execute(cls, model, vae, positive, judges, latent, steps, sampling_steps, scheduler, cfg, lr, rank, alpha,
                lora_scale, targets, custom_targets, seed, pixel_range, gradient_checkpointing, precision,
                grad_clip, noise_pool, eval_images, run_name, checkpoint_every, resume, negative=None,
                init_lora=None) -> io.NodeOutput:
        if targets == "custom":
            if not custom_targets.strip():
                raise ValueError("custom_targets: write a regular expression (targets is 'custom')")
            targets = custom_targets.strip()
        if cfg != 1.0 and negative is None:
            raise ValueError("negative: connect a negative conditioning, or set cfg to 1")
        samples = latent["samples"]
        if samples.ndim != 4:
            raise ValueError(f"latent: expected an image latent (N, C, H, W), got shape {tuple(samples.shape)}")
        t0 = time.monotonic()
        lora_cfg = LoRAConfig(rank=rank, alpha=alpha, targets=targets, init="gaussian", scale=lora_scale)
        config = DualProcessConfig(
            loop=LoopConfig(steps=steps, lr=lr, grad_clip=grad_clip, seed=seed, checkpoint_every=checkpoint_every,
                            autocast="auto" if precision == "auto" else "off"),
            batch_size=samples.shape[0], noise_pool=noise_pool, train_scale=lora_scale, eval_scale=lora_scale,
            pixel_range=pixel_range)
        device = comfy.model_management.get_torch_device()
        export = lambda net: net.export_state_dict(prefix="diffusion_model.", scale=lora_scale)  # noqa: E731
        metadata = {TRAINING_KEY: json.dumps({
            "method": "dual_process", "steps": steps, "sampling_steps": sampling_steps, "scheduler": scheduler,
            "cfg": cfg, "lr": lr, "rank": rank, "alpha": alpha, "lora_scale": lora_scale, "targets": targets,
            "seed": seed, "pixel_range": pixel_range, "judges": [j.name for j in judges]}),
            "ss_network_dim": str(rank), "ss_network_alpha": str(alpha * lora_scale)}
        store = CheckpointStore(run_folder(run_name), export, metadata) if run_name.strip() else None
        pbar = comfy.utils.ProgressBar(steps)

        with torch.inference_mode(False), torch.enable_grad():
            dm = model.model.diffusion_model
            network = create_lora(dm, lora_cfg, seed=seed, dtype=torch.float32, device=device)
            if init_lora is not None:
                network.load_factors(init_lora, prefix="diffusion_model.", scale=lora_scale)
            mp = prepare_trainable_patcher(model, network)
            decode, vae_copy = differentiable_decoder(vae, mp.model)
            undo = enable_gradient_checkpointing(dm) if gradient_checkpointing else (lambda: None)
            model_sampling = mp.get_model_object("model_sampling")
            sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, sampling_steps).cpu()
            evaluation = {}

            def run(denoise, sigma_schedule, latent_image, base_model):
                gen = Generator(denoise, sigmas, tuple(latent_image.shape[1:]), parameterization_of(model_sampling),
                                decode=decode, latent=latent_image[:1], device=latent_image.device,
                                dtype=latent_image.dtype)
                if eval_images:
                    evaluation["before"] = evaluate(gen, judges, network, [0.0], range(eval_images), pixel_range)[0.0]
                result = tune(
                    gen, judges, network, config, checkpoints=store, resume=resume,
                    fingerprint={"lora": lora_cfg.fingerprint(), "cfg": cfg, "init_lora": init_lora is not None},
                    progress=lambda step, total, rec: pbar.update_absolute(step, total),
                    should_stop=lambda step: comfy.model_management.throw_exception_if_processing_interrupted())
                if eval_images:
                    evaluation["after"] = evaluate(gen, judges, network, [lora_scale], range(eval_images),
                                                   pixel_range)[lora_scale]
                return result

            mp.model.requires_grad_(False)
            comfy.model_management.load_models_gpu([mp], force_full_load=True)
            guider = comfy.samplers.CFGGuider(mp)
            guider.set_conds(positive, negative if negative is not None else positive)
            guider.set_cfg(cfg)
            sampler = DualProcessSampler(run)
            try:
                guider.sample(torch.zeros_like(samples), samples, sampler, sigmas, seed=seed)
            finally:
                undo()
                del vae_copy
            result = sampler.result
            lora_sd = TrainedLoRA(export(network), metadata)
        tuned, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0.0)
        report = training_report(result, network, evaluation, steps, time.monotonic() - t0, store)
        curves = curve_tensor(result.history, f"Dual-Process: {len(network.paths)} LoRA layers, rank {rank}")
        return io.NodeOutput(tuned, lora_sd, curves, report, ui=ui.PreviewText(report))


def window_mean(history, key, first: bool) -> float:
    values = [r[key] for r in history if key in r]
    if not values:
        return float("nan")
    k = max(1, len(values) // 10)
    part = values[:k] if first else values[-k:]
    return sum(part) / len(part)


def training_report(result, network, evaluation, steps, seconds, store) -> str:
    n_params = sum(p.numel() for p in network.named_lora_parameters().values())
    done = steps - result.resumed_from
    lines = [
        f"Dual-Process tuning: {steps} steps ({done} run now"
        + (f", resumed from step {result.resumed_from}" if result.resumed_from else "") + ")"
        + f" in {seconds:.1f} s ({seconds / max(done, 1):.2f} s/step)",
        f"LoRA: {len(network.paths)} layers, {n_params:,} parameters, rank {network.rank}, alpha {network.alpha}, "
        f"scale {network.scale}",
        f"loss  first 10%: {window_mean(result.history, 'loss', True):.4f}   last 10%: "
        f"{window_mean(result.history, 'loss', False):.4f}",
        f"score first 10%: {window_mean(result.history, 'score', True):.4f}   last 10%: "
        f"{window_mean(result.history, 'score', False):.4f}",
    ]
    if evaluation:
        before, after = evaluation["before"], evaluation["after"]
        lines.append(f"judge score on {before.numel()} sampled images: without LoRA {before.mean():.4f} -> "
                     f"with LoRA {after.mean():.4f}")
        if math.isfinite(float(after.mean())):
            lines.append(f"  (exp(score): {math.exp(min(0.0, float(before.mean()))):.4f} -> "
                         f"{math.exp(min(0.0, float(after.mean()))):.4f})")
    if store is not None:
        lines.append(f"checkpoint: {store.folder}")
    return "\n".join(lines)


class PoESaveTrainedLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoESaveTrainedLoRA",
            display_name="Save Trained LoRA (PoE)",
            category="poe/training",
            description="Write a trained LoRA to models/loras (atomically; LoraLoader loads it).",
            inputs=[
                io.LoraModel.Input("lora", tooltip="LoRA from Dual-Process Tune or Load Trained LoRA."),
                io.String.Input("save_name", default="comfy_poe/dual_process",
                                tooltip="File name inside models/loras (sub-folders allowed; '..' and absolute "
                                        "paths are refused; .safetensors is added)."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file. Off: only files these nodes wrote are replaced."),
            ],
            outputs=[io.String.Output(display_name="lora_name", tooltip="Name as LoraLoader lists it.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, save_name=None, overwrite=None):
        # checked when the prompt is queued, not after the training upstream has run
        if save_name is None:
            return True
        try:
            cls._target(save_name, bool(overwrite))
        except ValueError as e:
            return str(e)
        return True

    @staticmethod
    def _target(save_name: str, overwrite: bool):
        root = folder_paths.get_folder_paths("loras")[0]
        try:
            path = resolve_save_path(root, save_name)
            check_overwrite(path, overwrite, key=TRAINING_KEY, writer="trainer")
        except LoraFileError as e:
            raise ValueError(f"save_name: {e}") from None
        return root, path

    @classmethod
    def execute(cls, lora, save_name, overwrite) -> io.NodeOutput:
        root, path = cls._target(save_name, overwrite)
        tensors = {k: v for k, v in lora.items() if torch.is_tensor(v)}
        if not tensors:
            raise ValueError("lora: the LoRA has no tensors")
        for key, tensor in tensors.items():  # a diverged training must not leave a NaN LoRA in models/loras
            check_finite("lora: the trained LoRA", key, tensor,
                         hint="the training diverged; nothing was saved — lower lr or use its last good checkpoint")
        metadata = dict(getattr(lora, "metadata", {}) or {})
        metadata.setdefault(TRAINING_KEY, json.dumps({"method": "unknown"}))
        atomic_write_safetensors(path, tensors, metadata)
        name = os.path.relpath(path, os.path.realpath(root)).replace(os.sep, "/")
        return io.NodeOutput(name, ui=ui.PreviewText(f"saved {name} ({len(tensors)} tensors)"))


def trained_lora_options() -> list[str]:
    runs = []
    root = runs_root()
    if os.path.isdir(root):
        for dirpath, _, files in os.walk(root):
            if "lora.safetensors" in files:
                runs.append(RUN_PREFIX + os.path.relpath(dirpath, root).replace(os.sep, "/"))
    return sorted(runs) + folder_paths.get_filename_list("loras")


class PoELoadTrainedLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoELoadTrainedLoRA",
            display_name="Load Trained LoRA (PoE)",
            category="poe/training",
            description="Load a LoRA file or the last checkpoint of a training run as a LORA_MODEL (to continue "
                        "tuning with init_lora, to save, or to apply with LoraModelLoader).",
            inputs=[
                io.Combo.Input("lora_name", options=trained_lora_options(),
                               tooltip="'run: NAME' = the last good checkpoint of a run in output/comfy_poe_training; "
                                       "otherwise a .safetensors file in models/loras (pickle files are refused)."),
            ],
            outputs=[io.LoraModel.Output(display_name="lora"), io.String.Output(display_name="info")],
        )

    @classmethod
    def execute(cls, lora_name) -> io.NodeOutput:
        if lora_name.startswith(RUN_PREFIX):
            folder = run_folder(lora_name[len(RUN_PREFIX):])
            path = folder / "lora.safetensors"
        else:
            path = folder_paths.get_full_path("loras", lora_name)
            if path is None:
                raise ValueError(f"lora_name: {lora_name!r} is not in models/loras")
        try:
            data = load_lora_file(path)
        except LoraFileError as e:
            raise ValueError(f"lora_name: {e}") from None
        info = [f"{lora_name}: {len(data.tensors)} tensors, sha256 {data.sha256[:12]}"]
        if "comfy_poe.training_step" in data.metadata:
            info.append(f"checkpoint step {data.metadata['comfy_poe.training_step']}")
        if TRAINING_KEY in data.metadata:
            info.append(f"recipe {data.metadata[TRAINING_KEY]}")
        return io.NodeOutput(TrainedLoRA(data.tensors, data.metadata), "\n".join(info))


NODES = [PoEDualProcessTune, PoESaveTrainedLoRA, PoELoadTrainedLoRA]
