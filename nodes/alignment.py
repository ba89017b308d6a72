"""Alignment nodes: reward rollouts (DAG-KL, DAG-DB, DDPO) and preference pairs (MaPO, Diffusion-DPO, SFT).

Thin ComfyUI layer over comfy_poe.training.alignment.  Training inside ComfyUI reuses the Dual-Process node's
set-up (nodes/training.py): a ``model.clone()`` whose targeted layers carry the LoRA as weight wrappers and
whose other weights are cloned on use (checkpoint weights are inference tensors), everything inside
``torch.inference_mode(False)``, and the loop run as a custom ``Sampler`` inside ``CFGGuider.sample`` so that
model loading and conditioning follow ComfyUI's normal path.  The engine trainers call the model through
:class:`GuiderModel`, an engine view (``denoise(x, sigma, conds)``) of the guider's processed conditionings.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..experts.base import LATENT, PIXEL, evaluate_potentials
from ..training import CheckpointStore, LoopConfig, LoRAConfig, create_lora, enable_gradient_checkpointing
from ..training.alignment import (
    PreferenceConfig, PreferenceTrainer, RewardRolloutTrainer, RolloutConfig, check_rollout_method,
)
from ..training.lora import TARGET_PRESETS
from ..training.mapo import check_method
from ..training.preference import PreferencePairs, load_preference_folder, pairs_from_scores
from ..training.rewards import reward_function
from ..training.rollout import Policy
from ._types import PoEJudges
from .poe import in_latent_space
from .training import (
    PRECISIONS, TRAINING_KEY, DualProcessSampler, TrainedLoRA, curve_tensor, differentiable_decoder,
    prepare_trainable_patcher, run_folder, run_name_error, trainer_outputs, window_mean,
)

PoEPreferencePairs = io.Custom("POE_PREFERENCE_PAIRS")

ROLLOUT_OPTIONS = ["DAG-KL", "DAG-DB", "DDPO"]
PREFERENCE_OPTIONS = ["MaPO", "DPO", "SFT"]
TARGET_OPTIONS = list(TARGET_PRESETS)


# ----------------------------------------------------------------------------------------------- helpers
def preference_parameterization(model_sampling) -> str:
    """Denoising-loss target of a ComfyUI model: ε for EPS (and X0), v for V-prediction; flow models refused."""
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        raise ValueError("model: flow (rectified-flow / CONST) models are not supported by the alignment trainers "
                         "(they train DDPM chains / ε- or v-prediction losses); use an SD1.5 / SDXL-style model")
    if isinstance(model_sampling, comfy.model_sampling.V_PREDICTION):
        return "v_prediction"
    return "eps"


class GuiderModel:
    """Engine model (``denoise(x, sigma, conds) -> [x̂0 per conditioning]``, VE coordinates) over a CFGGuider
    during its ``sample`` call: ``conds`` are keys of the guider's processed conditionings (None = zeros)."""

    def __init__(self, guider: comfy.samplers.CFGGuider, parameterization: str):
        self.guider = guider
        self.parameterization = parameterization

    def denoise(self, x, sigma, conds):
        lists = [None if key is None else self.guider.conds[key] for key in conds]
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        return comfy.samplers.calc_cond_batch(self.guider.inner_model, lists, x, sigma, self.guider.model_options)


class WithoutLoRA:
    """The same engine model with the LoRA's adapter weight at 0: the Diffusion-DPO reference (the model before
    training) without holding a second copy of the weights."""

    def __init__(self, model, network):
        self.model, self.network = model, network
        self.parameterization = model.parameterization

    def denoise(self, x, sigma, conds):
        scale = self.network.scale
        self.network.scale = 0.0
        try:
            return self.model.denoise(x, sigma, conds)
        finally:
            self.network.scale = scale


def image_key(image: torch.Tensor) -> str:
    """Content hash of one image (H, W, C): identifies an (augmented) pair image in the latent cache."""
    return hashlib.sha1(image.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def cached_encoder(vae, base_model, images: torch.Tensor, flip: bool, chunk: int = 8):
    """Encode every pair image (and its mirror image when ``flip``) once, before training, with ComfyUI's VAE:
    the trainer's joint augmentation (no crop) only ever shows these images, so training never loads the VAE
    between steps.  Returns ``encode(IMAGE) -> latents`` in model coordinates (normal tensors, not inference
    tensors); an unknown image is encoded on the fly."""
    variants = [images, images.flip(2)] if flip else [images]
    cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()  # the VAE's weights are inference tensors: no autograd here
    def encode_batch(batch):
        latent = vae.encode(batch[..., :3])
        return base_model.process_latent_in(latent.float()).clone().cpu()

    for variant in variants:
        for start in range(0, variant.shape[0], chunk):
            batch = variant[start:start + chunk]
            for image, latent in zip(batch, encode_batch(batch)):
                cache.setdefault(image_key(image), latent)

    def encode(batch: torch.Tensor) -> torch.Tensor:
        rows = []
        for image in batch:
            key = image_key(image)
            if key not in cache:
                cache[key] = encode_batch(image[None])[0]
            rows.append(cache[key])
        return torch.stack(rows).to(comfy.model_management.get_torch_device())

    return encode


def pixel_reward_decode(judges, vae, base_model, name: str = "vae"):
    """(decode, module) for the pixel judges of a reward (a private VAE copy, as Dual-Process), or (None, None)."""
    if not any(j.space == PIXEL for j in judges):
        return None, None
    if vae is None:
        pixel = [j.name for j in judges if j.space == PIXEL]
        raise ValueError(f"{name}: the pixel-space judges {pixel} need the VAE to decode the samples; connect it")
    return differentiable_decoder(vae, base_model)


def lora_outputs(model, network, scale: float, metadata: dict):
    export = network.export_state_dict(prefix="diffusion_model.", scale=scale)
    lora_sd = TrainedLoRA(export, metadata)
    tuned, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0.0)
    return tuned, lora_sd


def alignment_report(title: str, result, network, steps: int, seconds: float, store, keys: tuple[str, ...],
                     extra: list[str] = ()) -> str:
    n_params = sum(p.numel() for p in network.named_lora_parameters().values())
    done = steps - result.resumed_from
    lines = [
        f"{title}: {steps} steps ({done} run now"
        + (f", resumed from step {result.resumed_from}" if result.resumed_from else "") + ")"
        + f" in {seconds:.1f} s ({seconds / max(done, 1):.2f} s/step)",
        f"LoRA: {len(network.paths)} layers, {n_params:,} parameters, rank {network.rank}, alpha {network.alpha}",
    ]
    for key in keys:
        if any(key in r for r in result.history):
            lines.append(f"{key:<7} first 10%: {window_mean(result.history, key, True):.4f}   last 10%: "
                         f"{window_mean(result.history, key, False):.4f}")
    lines.extend(extra)
    if store is not None:
        lines.append(f"checkpoint: {store.folder}")
    return "\n".join(lines)


def _combo_error(**values) -> str | bool:
    """Check combo values (V3 combos are not checked by the server); linked inputs arrive as None."""
    allowed = {"method_rollout": ROLLOUT_OPTIONS, "method_preference": PREFERENCE_OPTIONS,
               "scheduler": list(comfy.samplers.SCHEDULER_NAMES), "targets": TARGET_OPTIONS, "precision": PRECISIONS}
    for name, value in values.items():
        options = allowed[name]
        if value is not None and value not in options:
            return f"{name.split('_')[0]} must be one of {options}, got {value!r}"
    return True


def _lora_inputs(rank: int, lr: float):
    return [
        io.Float.Input("lr", default=lr, min=1e-7, max=1.0, step=1e-6, round=1e-7, tooltip="AdamW learning rate."),
        io.Int.Input("rank", default=rank, min=1, max=512, tooltip="LoRA rank."),
        io.Float.Input("alpha", default=float(rank), min=0.01, max=1024.0, step=0.5,
                       tooltip="LoRA alpha (the update is scaled by alpha/rank; alpha = rank: scale 1)."),
        io.Combo.Input("targets", options=TARGET_OPTIONS, default="attention",
                       tooltip="Layers that get a LoRA: attention (q/k/v/out), feed-forward, or both."),
    ]


def _run_inputs(checkpoint_every: int):
    return [
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="Seeds the LoRA init and every random choice of every step (exact resume)."),
        io.Boolean.Input("gradient_checkpointing", default=True,
                         tooltip="Recompute activations in backward: much less memory, ~30% slower."),
        io.Combo.Input("precision", options=PRECISIONS, default="auto",
                       tooltip="auto: bf16 autocast where the GPU supports it; off: the model's own dtype."),
        io.String.Input("run_name", default="",
                        tooltip="Folder under output/comfy_poe_training for checkpoints (empty = none). An "
                                "interrupted run keeps its last checkpoint; queueing again resumes from it."),
        io.Int.Input("checkpoint_every", default=checkpoint_every, min=0, max=100000,
                     tooltip="Write a checkpoint every k steps (0 = only at the end); needs run_name."),
        io.Boolean.Input("resume", default=True,
                         tooltip="Continue from run_name's checkpoint when its settings match."),
    ]


def _training_setup(rank, alpha, targets, seed, run_name, lr, steps, checkpoint_every, precision, recipe,
                    loop_defaults: LoopConfig):
    """LoRA on the model, loop settings, checkpoint store and recipe metadata shared by both trainers."""
    lora_cfg = LoRAConfig(rank=rank, alpha=alpha, targets=targets, init="gaussian", scale=1.0)
    loop = LoopConfig(steps=steps, lr=lr, weight_decay=loop_defaults.weight_decay, grad_clip=loop_defaults.grad_clip,
                      seed=seed, checkpoint_every=checkpoint_every, autocast="auto" if precision == "auto" else "off")
    metadata = {TRAINING_KEY: json.dumps({**recipe, "steps": steps, "lr": lr, "rank": rank, "alpha": alpha,
                                          "targets": targets, "seed": seed}),
                "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}
    export = lambda net: net.export_state_dict(prefix="diffusion_model.", scale=1.0)  # noqa: E731
    store = CheckpointStore(run_folder(run_name), export, metadata) if run_name.strip() else None
    return lora_cfg, loop, metadata, store


def _run_in_guider(mp, conds: dict, cfg: float, latent_shape, sigmas, seed, run):
    """Run ``run(guider)`` as the sampler of a CFGGuider on ``mp`` (loads the model the normal way)."""
    mp.model.requires_grad_(False)
    comfy.model_management.load_models_gpu([mp], force_full_load=True)
    guider = comfy.samplers.CFGGuider(mp)
    guider.inner_set_conds(conds)
    guider.set_cfg(cfg)
    sampler = DualProcessSampler(lambda denoise, sigma_schedule, latent_image, base_model: run(guider, latent_image))
    zeros = torch.zeros(latent_shape)
    guider.sample(zeros, zeros.clone(), sampler, sigmas, seed=seed)
    return sampler.result


# ------------------------------------------------------------------------------------------------- pairs
def resolve_input_folder(folder: str) -> str:
    """``folder`` inside ComfyUI's input directory (relative path; absolute paths and '..' escapes refused)."""
    text = str(folder or "").strip()
    if not text:
        raise ValueError("folder: give a folder inside ComfyUI's input directory (e.g. 'preferences/cats')")
    root = os.path.realpath(folder_paths.get_input_directory())
    if os.path.isabs(text):
        raise ValueError(f"folder: {text!r} is an absolute path; give a path relative to the input directory")
    path = os.path.realpath(os.path.join(root, text))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"folder: {text!r} leaves ComfyUI's input directory")
    if not os.path.isdir(path):
        raise ValueError(f"folder: {text!r} does not exist in ComfyUI's input directory ({root})")
    return path


def pairs_preview(pairs: PreferencePairs, limit: int = 8) -> torch.Tensor:
    """Chosen | rejected side by side for the first ``limit`` pairs."""
    n = min(limit, len(pairs))
    return torch.cat([pairs.chosen[:n, ..., :3], pairs.rejected[:n, ..., :3]], dim=2)


def pairs_info(pairs: PreferencePairs, source: str) -> str:
    h, w = pairs.chosen.shape[1:3]
    prompts = len(set(pairs.prompts))
    return f"{len(pairs)} preference pairs from {source}, {w}x{h} px, {prompts} distinct prompt(s)"


class PoEPreferencePairsFromFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEPreferencePairsFromFolder",
            display_name="Preference Pairs from Folder (PoE)",
            category="poe/training",
            description="Load preference pairs <folder>/<pair_id>/{prompt.txt, chosen.png, rejected.png} from "
                        "ComfyUI's input directory (every invalid pair is reported by its folder name).",
            inputs=[
                io.String.Input("folder", default="preferences",
                                tooltip="Folder inside ComfyUI's input directory holding one sub-folder per pair "
                                        "(prompt.txt, chosen.*, rejected.*; .png/.jpg/.jpeg/.webp)."),
                io.Int.Input("size", default=0, min=0, max=4096, step=8,
                             tooltip="Resize every pair to size×size (0 = the first pair's size; all pairs must "
                                     "then have it). The rejected image is always resized to the chosen one."),
                io.Int.Input("max_pairs", default=0, min=0, max=1000000,
                             tooltip="Use only the first N pairs (sorted by folder name; 0 = all)."),
            ],
            outputs=[PoEPreferencePairs.Output(display_name="pairs"),
                     io.Image.Output(display_name="preview", tooltip="chosen | rejected, first 8 pairs"),
                     io.String.Output(display_name="info")],
        )

    @classmethod
    def validate_inputs(cls, folder):
        if folder is None:
            return True
        try:
            resolve_input_folder(folder)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, folder, size, max_pairs):
        # re-read when the folder's files change
        try:
            path = resolve_input_folder(folder)
        except ValueError:
            return float("nan")
        stamp = []
        for dirpath, _, files in os.walk(path):
            stamp.extend((os.path.join(dirpath, f), os.path.getmtime(os.path.join(dirpath, f))) for f in sorted(files))
        return hashlib.sha1(repr((sorted(stamp), size, max_pairs)).encode()).hexdigest()

    @classmethod
    def execute(cls, folder, size, max_pairs) -> io.NodeOutput:
        path = resolve_input_folder(folder)
        try:
            pairs = load_preference_folder(path, size=size or None, max_pairs=max_pairs)
        except ValueError as e:
            raise ValueError(f"folder: {e}") from None
        info = pairs_info(pairs, f"folder {folder!r}")
        return io.NodeOutput(pairs, pairs_preview(pairs), info, ui=ui.PreviewText(info))


class PoEPreferencePairsFromJudge(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEPreferencePairsFromJudge",
            display_name="Preference Pairs from Judge (PoE)",
            category="poe/training",
            description="Score generated images with judges; per prompt the best image becomes 'chosen' and the "
                        "worst 'rejected' (groups whose scores tie are skipped).",
            inputs=[
                io.Image.Input("images", tooltip="IMAGE batch: images_per_prompt consecutive images per prompt "
                                                 "(e.g. a KSampler batch per prompt, batched together)."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="One prompt per line, in the order of the image groups; a single line is "
                                        "shared by every group."),
                PoEJudges.Input("judges", tooltip="Judges that rank the images (Σ weight·score); pixel judges see the "
                                                  "images, latent judges their VAE encoding."),
                io.Int.Input("images_per_prompt", default=4, min=2, max=4096,
                             tooltip="Size of each group of consecutive images (one group per prompt)."),
                io.Float.Input("min_gap", default=0.0, min=0.0, max=1e9, step=0.01,
                               tooltip="Keep a group's pair only when best − worst score exceeds this."),
                io.Vae.Input("vae", optional=True, tooltip="Needed only for latent-space judges (encodes the images)."),
            ],
            outputs=[PoEPreferencePairs.Output(display_name="pairs"),
                     io.Image.Output(display_name="preview", tooltip="chosen | rejected, first 8 pairs"),
                     io.String.Output(display_name="info")],
        )

    @classmethod
    def execute(cls, images, prompts, judges, images_per_prompt, min_gap, vae=None) -> io.NodeOutput:
        n, k = images.shape[0], int(images_per_prompt)
        if n % k:
            raise ValueError(f"images: {n} images are not a whole number of groups of images_per_prompt={k}")
        groups = n // k
        lines = [line.strip() for line in str(prompts).splitlines() if line.strip()]
        if len(lines) == 1:
            lines = lines * groups
        if len(lines) != groups:
            raise ValueError(f"prompts: {len(lines)} prompt lines for {groups} groups of {k} images "
                             "(give one line per group, or a single line for all)")
        judges = list(judges or [])
        if not judges:
            raise ValueError("judges: connect at least one judge")
        noisy = [j.name for j in judges if j.noisy]
        if noisy:
            raise ValueError(f"judges: noise-aware judges {noisy} score noisy latents, not finished images")
        x0 = images
        if any(j.space == LATENT for j in judges):
            if vae is None:
                raise ValueError("vae: latent-space judges need the VAE to encode the images; connect it")
            x0 = vae.encode(images[..., :3]).float()
        scores = evaluate_potentials(judges, x0, decode=lambda _: images)
        per_image = [lines[i // k] for i in range(n)]
        try:
            pairs = pairs_from_scores(images, scores.cpu(), per_image, min_gap=min_gap,
                                      groups=[i // k for i in range(n)])
        except ValueError as e:
            raise ValueError(f"images: {e}") from None
        info = pairs_info(pairs, f"{groups} group(s) ranked by {[j.name for j in judges]}")
        return io.NodeOutput(pairs, pairs_preview(pairs), info, ui=ui.PreviewText(info))


# ----------------------------------------------------------------------------------------------- trainers
class PoEPreferenceTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEPreferenceTrainer",
            display_name="Preference Trainer (PoE)",
            category="poe/training",
            description="Train a LoRA on preference pairs: MaPO (Hong et al. 2024, no reference model), "
                        "Diffusion-DPO (reference = the model without the LoRA) or SFT on the chosen images.",
            inputs=[
                io.Model.Input("model", tooltip="Diffusion model to train (EPS or V-prediction, e.g. SD1.5 / SDXL)."),
                io.Clip.Input("clip", tooltip="Text encoder: each pair's prompt is encoded with it."),
                io.Vae.Input("vae", tooltip="VAE: the pair images are encoded once before training."),
                PoEPreferencePairs.Input("pairs", tooltip="Preference pairs (from Folder / from Judge)."),
                io.Combo.Input("method", options=PREFERENCE_OPTIONS, default="MaPO",
                               tooltip="MaPO: margin + chosen likelihood, no reference (least memory). DPO: "
                                       "Diffusion-DPO against the untrained model. SFT: fine-tune on chosen only."),
                io.Int.Input("steps", default=200, min=1, max=1000000, tooltip="Training steps (one minibatch each)."),
                io.Int.Input("batch_size", default=4, min=1, max=1024, tooltip="Pairs per training step."),
                *_lora_inputs(8, 1e-4),
                io.Float.Input("beta_mapo", default=0.1, min=1e-6, max=1e4, step=0.01,
                               tooltip="MaPO β: weight of the margin term (reference 0.1)."),
                io.Float.Input("beta_dpo", default=5000.0, min=1e-3, max=1e7, step=100.0,
                               tooltip="Diffusion-DPO β (reference 5000 for SD1.5, 2500 for SDXL)."),
                io.Boolean.Input("flip", default=True,
                                 tooltip="Random horizontal flip, the same for both images of a pair."),
                *_run_inputs(50),
            ],
            outputs=trainer_outputs("trained", "Loss, reward / margin and gradient norm per step."),
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, method, targets, precision, run_name=None):
        return run_name_error(run_name) or _combo_error(method_preference=method, targets=targets, precision=precision)

    @classmethod
    def execute(cls, model, clip, vae, pairs, method, steps, batch_size, lr, rank, alpha, targets, beta_mapo,
                beta_dpo, flip, seed, gradient_checkpointing, precision, run_name, checkpoint_every,
                resume) -> io.NodeOutput:
        if not isinstance(pairs, PreferencePairs):
            raise ValueError("pairs: connect Preference Pairs from Folder or from Judge")
        method_key = check_method(method)
        t0 = time.monotonic()
        defaults = PreferenceConfig().loop
        lora_cfg, loop, metadata, store = _training_setup(
            rank, alpha, targets, seed, run_name, lr, steps, checkpoint_every, precision,
            {"method": method_key, "pairs": len(pairs), "beta_mapo": beta_mapo, "beta_dpo": beta_dpo}, defaults)
        config = PreferenceConfig(method=method_key, loop=loop, batch_size=batch_size, beta_mapo=beta_mapo,
                                  beta_dpo=beta_dpo, flip=flip)
        model_sampling = model.get_model_object("model_sampling")
        parameterization = preference_parameterization(model_sampling)
        keys = {prompt: f"poe_pref_{i}" for i, prompt in enumerate(dict.fromkeys(pairs.prompts))}
        conds = {key: clip.encode_from_tokens_scheduled(clip.tokenize(prompt)) for prompt, key in keys.items()}
        pbar = comfy.utils.ProgressBar(steps)
        device = comfy.model_management.get_torch_device()
        margins = {}

        with torch.inference_mode(False), torch.enable_grad():
            dm = model.model.diffusion_model
            network = create_lora(dm, lora_cfg, seed=seed, dtype=torch.float32, device=device)
            mp = prepare_trainable_patcher(model, network)
            encode = cached_encoder(vae, mp.model, torch.cat([pairs.chosen, pairs.rejected]), flip)
            train_sigmas = model_sampling.sigmas.detach().float().cpu().clone()
            latent_shape = (1,) + tuple(encode(pairs.chosen[:1]).shape[1:])
            undo = enable_gradient_checkpointing(dm) if gradient_checkpointing else (lambda: None)

            def run(guider, latent_image):
                engine = GuiderModel(guider, parameterization)
                trainer = PreferenceTrainer(engine, pairs, encode, keys.__getitem__, network, config, train_sigmas,
                                            reference=WithoutLoRA(engine, network), parameterization=parameterization)
                margins["before"] = trainer.margin(pairs.subset(range(min(len(pairs), 8))), draws=1, seed=seed)
                result = trainer.train(
                    checkpoints=store, resume=resume, fingerprint={"lora": lora_cfg.fingerprint(), "node": "preference"},
                    progress=lambda step, total, rec: pbar.update_absolute(step, total),
                    should_stop=lambda step: comfy.model_management.throw_exception_if_processing_interrupted())
                margins["after"] = trainer.margin(pairs.subset(range(min(len(pairs), 8))), draws=1, seed=seed)
                return result

            try:
                result = _run_in_guider(mp, conds, 1.0, latent_shape, model_sampling.sigmas[-1:].float().cpu(), seed, run)
            finally:
                undo()
            tuned, lora_sd = lora_outputs(model, network, 1.0, metadata)
        extra = [f"chosen-vs-rejected margin mean(L_rej − L_cho) on {min(len(pairs), 8)} pairs: "
                 f"{margins['before']:.5f} -> {margins['after']:.5f}"]
        report = alignment_report(f"{method} preference training on {len(pairs)} pairs", result, network, steps,
                                  time.monotonic() - t0, store, ("loss", "margin", "loss_w", "loss_l"), extra)
        curves = curve_tensor(result.history, f"{method}: {len(network.paths)} LoRA layers, rank {rank}",
                              keys=("loss", "margin", "grad_norm"))
        return io.NodeOutput(tuned, lora_sd, curves, report, ui=ui.PreviewText(report))


class PoERewardRolloutTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoERewardRolloutTrainer",
            display_name="Reward Rollout Trainer (PoE)",
            category="poe/training",
            description="Train a LoRA from a reward on the model's own DDPM samples: DAG-KL / DAG-DB (GFlowNet "
                        "diffusion alignment, Zhang et al. 2024: samples ∝ exp(β·reward), keeps diversity) or DDPO.",
            inputs=[
                io.Model.Input("model", tooltip="Diffusion model to train (EPS or V-prediction, e.g. SD1.5 / SDXL)."),
                io.Conditioning.Input("positive", tooltip="Prompt the training samples are generated from."),
                io.Conditioning.Input("negative", tooltip="Negative / unconditional prompt for CFG (used when cfg > 1)."),
                PoEJudges.Input("judges", tooltip="The reward: Σ weight·score of these judges on the final samples "
                                                  "(black-box: any judge works, no gradient needed)."),
                io.Latent.Input("latent", tooltip="Empty latent: its size is the training image size (batch ignored)."),
                io.Combo.Input("method", options=ROLLOUT_OPTIONS, default="DAG-KL",
                               tooltip="DAG-KL (the paper's best), DAG-DB (detailed balance), DDPO (baseline)."),
                io.Int.Input("steps", default=100, min=1, max=1000000,
                             tooltip="Training steps; each samples `trajectories` fresh chains and updates once."),
                io.Int.Input("trajectories", default=8, min=2, max=1024,
                             tooltip="DDPM chains sampled per training step (DAG-KL / DDPO compare them: >= 2)."),
                io.Int.Input("rollout_steps", default=20, min=1, max=1000, tooltip="DDPM steps of each chain."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="normal",
                               tooltip="Noise schedule of the chains."),
                io.Float.Input("cfg", default=4.5, min=1.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance of the sampling policy (reference 4.5; 1 = off)."),
                io.Float.Input("timestep_fraction", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="Share of each chain's transitions trained on per step (cost ∝ this)."),
                *_lora_inputs(4, 3e-4),
                io.Float.Input("reward_beta", default=100.0, min=0.0, max=1e6, step=1.0,
                               tooltip="β_max of the GFlowNet target exp(β·reward), annealed linearly over the "
                                       "first half (reference 100; scale it to your reward's range). Unused by DDPO."),
                io.Float.Input("proximal", default=1.0, min=0.0, max=1e4, step=0.1,
                               tooltip="DAG: weight of the proximal term keeping ε̂ near the sampled one (reference 1)."),
                *_run_inputs(25),
                io.Vae.Input("vae", optional=True, tooltip="Needed for pixel-space judges (decodes the samples)."),
            ],
            outputs=trainer_outputs("trained", "Loss, reward / margin and gradient norm per step."),
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, method, scheduler, targets, precision, run_name=None):
        return run_name_error(run_name) or _combo_error(method_rollout=method, scheduler=scheduler, targets=targets,
                                                        precision=precision)

    @classmethod
    def execute(cls, model, positive, negative, judges, latent, method, steps, trajectories, rollout_steps,
                scheduler, cfg, timestep_fraction, lr, rank, alpha, targets, reward_beta, proximal, seed,
                gradient_checkpointing, precision, run_name, checkpoint_every, resume, vae=None) -> io.NodeOutput:
        method_key = check_rollout_method(method)
        judges = list(judges or [])
        if not judges:
            raise ValueError("judges: connect at least one judge as the reward")
        samples = latent["samples"]
        if samples.ndim != 4:
            raise ValueError(f"latent: expected an image latent (N, C, H, W), got shape {tuple(samples.shape)}")
        model_sampling = model.get_model_object("model_sampling")
        parameterization = preference_parameterization(model_sampling)
        t0 = time.monotonic()
        defaults = RolloutConfig().loop
        lora_cfg, loop, metadata, store = _training_setup(
            rank, alpha, targets, seed, run_name, lr, steps, checkpoint_every, precision,
            {"method": method_key, "trajectories": trajectories, "rollout_steps": rollout_steps,
             "scheduler": scheduler, "cfg": cfg, "timestep_fraction": timestep_fraction, "reward_beta": reward_beta,
             "judges": [j.name for j in judges]}, defaults)
        config = RolloutConfig(method=method_key, loop=loop, batch_size=trajectories,
                               timestep_fraction=timestep_fraction, reward_exp=reward_beta, unetreg=proximal)
        sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, rollout_steps).cpu()
        pbar = comfy.utils.ProgressBar(steps)
        device = comfy.model_management.get_torch_device()

        with torch.inference_mode(False), torch.enable_grad():
            dm = model.model.diffusion_model
            network = create_lora(dm, lora_cfg, seed=seed, dtype=torch.float32, device=device)
            mp = prepare_trainable_patcher(model, network)
            decode, vae_copy = pixel_reward_decode(judges, vae, mp.model)
            reward = reward_function([in_latent_space(j, mp.model) for j in judges], decode)
            undo = enable_gradient_checkpointing(dm) if gradient_checkpointing else (lambda: None)

            def run(guider, latent_image):
                engine = GuiderModel(guider, parameterization)
                policy = Policy(engine, sigmas, tuple(samples.shape[1:]), cfg=cfg, negative="negative",
                                parameterization=parameterization, device=latent_image.device)
                trainer = RewardRolloutTrainer(policy, ["positive"], reward, network, config)
                return trainer.train(
                    checkpoints=store, resume=resume,
                    fingerprint={"lora": lora_cfg.fingerprint(), "node": "reward_rollout",
                                 "judges": [j.name for j in judges], "latent": list(samples.shape[1:])},
                    progress=lambda step, total, rec: pbar.update_absolute(step, total),
                    should_stop=lambda step: comfy.model_management.throw_exception_if_processing_interrupted())

            try:
                result = _run_in_guider(mp, {"positive": positive, "negative": negative}, cfg,
                                        (1,) + tuple(samples.shape[1:]), sigmas, seed, run)
            finally:
                undo()
                del vae_copy
            tuned, lora_sd = lora_outputs(model, network, 1.0, metadata)
        report = alignment_report(f"{method} reward training, {trajectories} trajectories/step", result, network,
                                  steps, time.monotonic() - t0, store, ("loss", "reward", "reward_std"),
                                  [f"trajectories sampled: {steps * trajectories}"])
        curves = curve_tensor(result.history, f"{method}: {len(network.paths)} LoRA layers, rank {rank}",
                              keys=("loss", "reward", "grad_norm"))
        return io.NodeOutput(tuned, lora_sd, curves, report, ui=ui.PreviewText(report))


NODES = [PoEPreferencePairsFromFolder, PoEPreferencePairsFromJudge, PoEPreferenceTrainer, PoERewardRolloutTrainer]
