"""SELMA nodes: skill prompts from a local LLM, a resumable self-generated image dataset, and the skill
LoRA trainer (plain denoising loss on that dataset).

Thin ComfyUI layer over ``selma`` (engine). LLM folders live in models/LLM; prompt files and datasets are
written under ComfyUI's output folder (``output/selma/...``). The trainer reuses the training core's
ComfyUI set-up (nodes/training.py: LoRA as weight wrappers on a patcher clone, inference_mode(False),
checkpoints in output/comfy_poe_training/<run_name>); save its LoRA with Save Trained LoRA (PoE).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

import comfy.conds
import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths
import latent_preview
from comfy_api.latest import io, ui

from ..lora.io import LoraFileError, resolve_save_path
from ..selma.dataset import SkillDataset, build_dataset
from ..selma.presets import CUSTOM, PresetError, list_presets, load_preset, override
from ..selma.prompts import (LLMGenerator, causal_lm_model_types, generate_skill_prompts, load_llm,
                             read_prompt_file, save_prompts)
from ..selma.rouge import DEFAULT_THRESHOLD
from ..selma.trainer import PRESETS, encode_pairs, preset_config, train_skill_lora
from ..training import create_lora, enable_gradient_checkpointing
from .training import (PRECISIONS, TRAINING_KEY, TrainedLoRA, curve_tensor, parameterization_of,
                       prepare_trainable_patcher, run_folder, run_name_error, trainer_outputs)
from ._types import PoEJudges
from .vlm import ManagedModel, _load_inputs, _subdirs, auto_dtype_name, resolve_folder_in

LLM_FOLDER = "LLM"
OUTPUT_SUBDIR = "selma"
CATEGORY = "poe/selma"

folder_paths.add_model_folder_path(LLM_FOLDER, os.path.join(folder_paths.models_dir, "LLM"))


def user_preset_dirs() -> list[str]:
    """Where users keep their own / edited skill presets (same name = replaces the shipped one)."""
    return [os.path.join(folder_paths.get_user_directory(), "comfy_poe", "selma_presets")]


def llm_folders() -> list[str]:
    """Text-generation model folders (config.json with a causal-LM model_type, or custom code) under
    every models/LLM path, one or two levels deep."""
    import json

    causal = causal_lm_model_types()
    names = set()
    for base in folder_paths.get_folder_paths(LLM_FOLDER):
        if not os.path.isdir(base):
            continue
        for folder in _subdirs(base, depth=2):
            try:
                with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
                    config = json.load(f)
            except (OSError, ValueError):
                continue
            if config.get("model_type") in causal or "auto_map" in config:
                names.add(os.path.relpath(folder, base).replace(os.sep, "/"))
    return sorted(names)


def resolve_llm_folder(name: str) -> str:
    return resolve_folder_in(LLM_FOLDER, "llm_name", name, "; put a Hugging Face model folder (config.json, "
                             "*.safetensors, tokenizer files) in models/LLM")


def output_path(input_name: str, name: str) -> Path:
    """A path for ``name`` (sub-folders allowed) inside output/selma; absolute paths and '..' are refused."""
    root = os.path.join(folder_paths.get_output_directory(), OUTPUT_SUBDIR)
    try:
        return resolve_save_path(root, name, suffix="")
    except LoraFileError as exc:
        raise ValueError(f"{input_name}: {str(exc).replace('the LoRA folder', 'output/selma')}") from None


def resolve_skill(skill: str, description: str, rules: str, examples: str, max_words: int):
    if skill == CUSTOM:
        return override(None, description, rules, examples, max_words=max_words or None)
    if skill not in list_presets(user_preset_dirs()):
        raise ValueError(f"skill: unknown preset {skill!r}; choose one of {list_presets(user_preset_dirs())} "
                         f"or {CUSTOM!r}")
    preset = load_preset(skill, user_preset_dirs())
    return override(preset, description, rules, examples, max_words=max_words or None)


class SelmaSkillPrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoESelmaSkillPrompts",
            display_name="SELMA Skill Prompts (PoE)",
            category=CATEGORY,
            description="A local instruction LLM writes image prompts for one skill (SELMA / Self-Instruct): "
                        "3 in-context examples from the growing pool, ROUGE-L deduplication against the whole "
                        "pool, skill rules. Saves <save_name>.txt/.jsonl under output/selma.",
            inputs=[
                io.Combo.Input("llm_name", options=llm_folders(),
                               tooltip="A text-generation model folder (config.json + *.safetensors + tokenizer) "
                                       "inside models/LLM, e.g. Qwen2.5-1.5B-Instruct."),
                io.Combo.Input("skill", options=[*list_presets(user_preset_dirs()), CUSTOM], default="count",
                               tooltip="Built-in skill preset (editable JSON in selma/presets, or your own in "
                                       "user/comfy_poe/selma_presets), or 'custom' to use the fields below only."),
                io.String.Input("description", multiline=True, default="",
                                tooltip="Skill description. Empty: the preset's. Required for 'custom'."),
                io.String.Input("rules", multiline=True, default="",
                                tooltip="One rule per line for the LLM. Empty: the preset's rules."),
                io.String.Input("examples", multiline=True, default="",
                                tooltip="Seed example prompts, one per line (SELMA uses 3). Empty: the preset's."),
                io.Int.Input("count", default=100, min=1, max=100000,
                             tooltip="How many prompts to collect (SELMA: 1000 per skill)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seeds the choice of in-context examples and the LLM's token sampling."),
                io.Int.Input("max_words", default=0, min=0, max=500,
                             tooltip="Prompts must have fewer words than this. 0: the preset's (30; 50 for "
                                     "long prompts)."),
                io.Float.Input("rouge_threshold", default=DEFAULT_THRESHOLD, min=0.0, max=1.0, step=0.01,
                               tooltip="A prompt whose ROUGE-L F1 with any pool prompt is above this is a "
                                       "near-duplicate and dropped (SELMA: 0.8)."),
                io.Int.Input("max_attempts", default=0, min=0, max=1000000,
                             tooltip="Stop after this many LLM requests even if count is not reached. "
                                     "0: 10 + 4 × count."),
                io.Float.Input("temperature", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="Sampling temperature (SELMA: 1.0). 0 = greedy."),
                io.Int.Input("max_new_tokens", default=768, min=16, max=8192,
                             tooltip="Longest LLM answer per request, in tokens."),
                io.String.Input("save_name", default="",
                                tooltip="File name under output/selma (sub-folders allowed); .txt and .jsonl are "
                                        "written. Empty: prompts/<skill>_<seed>."),
                *_load_inputs(),
            ],
            outputs=[
                io.String.Output(display_name="prompts", tooltip="All prompts, one per line (for Skill Dataset)."),
                io.String.Output(display_name="prompt_list", is_output_list=True,
                                 tooltip="The prompts as a list (downstream nodes run once per prompt)."),
                io.String.Output(display_name="file_path", tooltip="The saved .txt file."),
            ],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, save_name=None, skill=None, description=None, rules=None, examples=None):
        # widgets are known before the prompt runs (linked inputs arrive as None and are checked in execute)
        try:
            if save_name is not None and save_name.strip():
                output_path("save_name", save_name)
            if None not in (skill, description, rules, examples):
                resolve_skill(skill, description, rules, examples, 0)
        except PresetError as exc:
            return f"skill: {exc}"
        except ValueError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, llm_name, skill, description, rules, examples, count, seed, max_words, rouge_threshold,
                max_attempts, temperature, max_new_tokens, save_name, dtype, trust_remote_code,
                allow_pickle) -> io.NodeOutput:
        try:
            preset = resolve_skill(skill, description, rules, examples, max_words)
        except PresetError as exc:
            raise ValueError(f"skill: {exc}") from None
        path = output_path("save_name", save_name.strip() or f"prompts/{preset.name}_{seed}")
        offload = comfy.model_management.unet_offload_device()
        bundle = load_llm(resolve_llm_folder(llm_name), device=offload,
                          dtype=auto_dtype_name(dtype, comfy.model_management.get_torch_device()),
                          trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        managed = ManagedModel(bundle.model, bundle)
        llm = LLMGenerator(bundle, seed=seed, max_new_tokens=max_new_tokens, temperature=temperature,
                           before_call=managed.load,
                           check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted)
        bar = comfy.utils.ProgressBar(count)
        run = generate_skill_prompts(preset, llm, count, seed=seed, threshold=rouge_threshold,
                                     max_attempts=max_attempts or None,
                                     progress=lambda done, total: bar.update_absolute(done, total))
        txt, _ = save_prompts(run, path)
        text = "\n".join(run.prompts)
        shown = "\n".join(run.prompts[:20]) + ("\n…" if len(run.prompts) > 20 else "")
        return io.NodeOutput(text, run.prompts, str(txt), ui=ui.PreviewText(f"{run.summary()}\n{txt}\n\n{shown}"))


# --------------------------------------------------------------------------------------- dataset


def collect_prompts(prompts: str, prompts_file: str) -> list[str]:
    found = [line.strip() for line in str(prompts or "").splitlines() if line.strip()]
    if str(prompts_file or "").strip():
        path = Path(prompts_file.strip()).expanduser()
        if not path.is_absolute():
            path = Path(folder_paths.get_output_directory()) / path
        if path.suffix not in (".txt", ".jsonl"):
            raise ValueError(f"prompts_file {str(path)!r}: expected a .txt (one prompt per line) or .jsonl file")
        try:
            found += read_prompt_file(path)
        except FileNotFoundError as exc:
            raise ValueError(f"prompts_file: {exc}") from None
    if not found:
        raise ValueError("prompts: write one prompt per line or give a prompts_file (e.g. SELMA Skill Prompts' "
                         "file_path)")
    return found


def comfy_image_generator(model, clip, vae, negative: str, steps: int, cfg: float, sampler_name: str,
                          scheduler: str, width: int, height: int):
    """``generate_images(prompts, seeds)`` with ComfyUI's own text encoding, sampler and VAE. Consecutive
    items with the same prompt share one sampler call; every item gets its own seeded noise."""
    negative_cond = clip.encode_from_tokens_scheduled(clip.tokenize(negative))
    cache: dict[str, list] = {}

    def positive(prompt):
        if prompt not in cache:
            cache.clear()
            cache[prompt] = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        return cache[prompt]

    def sample_group(prompt, seeds):
        latent = torch.zeros([len(seeds), 4, height // 8, width // 8], device="cpu")
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = torch.cat([comfy.sample.prepare_noise(latent[:1], s) for s in seeds])
        callback = latent_preview.prepare_callback(model, steps)
        samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive(prompt),
                                      negative_cond, latent, denoise=1.0, callback=callback, seed=seeds[0])
        images = vae.decode(samples)
        return images.reshape(-1, *images.shape[-3:])

    def generate_images(prompts, seeds):
        out, start = [], 0
        for i in range(1, len(prompts) + 1):
            if i == len(prompts) or prompts[i] != prompts[start]:
                out.append(sample_group(prompts[start], seeds[start:i]))
                start = i
        return torch.cat(out).float().cpu()

    return generate_images


def preview_images(dataset: SkillDataset, new_records, limit: int = 16) -> torch.Tensor:
    records = [r for r in new_records if r.accepted][:limit] or dataset.accepted[:limit]
    images = [dataset.load_image(r) for r in records]
    images = [im for im in images if im.shape == images[0].shape] if images else []
    return torch.stack(images) if images else torch.zeros(1, 64, 64, 3)


class SelmaSkillDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoESelmaSkillDataset",
            display_name="SELMA Skill Dataset (PoE)",
            category=CATEGORY,
            description="Generate images for skill prompts with the model itself (SELMA) into a reusable dataset "
                        "folder output/selma/<dataset_name> (manifest.jsonl + images/*.png + captions). "
                        "Resumable: prompts already done are skipped. Optional judges keep only images scoring "
                        "≥ threshold.",
            inputs=[
                io.Model.Input("model", tooltip="The text-to-image model to improve (it generates its own data)."),
                io.Clip.Input("clip", tooltip="Its text encoder."),
                io.Vae.Input("vae", tooltip="Its VAE (decodes the images that are saved)."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="Prompts, one per line (connect SELMA Skill Prompts' 'prompts')."),
                io.String.Input("prompts_file", default="",
                                tooltip="Optional .txt/.jsonl prompts file (absolute, or relative to the output "
                                        "folder); added after the prompts above."),
                io.String.Input("dataset_name", default="count",
                                tooltip="Dataset folder under output/selma. An existing dataset is extended and "
                                        "resumed: finished (prompt, image) pairs are skipped."),
                io.Int.Input("images_per_prompt", default=1, min=1, max=64,
                             tooltip="Images per prompt (SELMA: 1)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Base seed; each image's noise seed is derived from (seed, prompt, index), "
                                     "so a resumed run gives the same images."),
                io.Int.Input("steps", default=25, min=1, max=10000, tooltip="Sampling steps."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, tooltip="Classifier-free guidance."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="Sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="Noise schedule."),
                io.Int.Input("width", default=512, min=16, max=8192, step=8, tooltip="Image width (SD1.x: 512)."),
                io.Int.Input("height", default=512, min=16, max=8192, step=8, tooltip="Image height."),
                io.Int.Input("batch_size", default=4, min=1, max=256,
                             tooltip="Images generated (and judged) per step; images of one prompt share a "
                                     "sampler call."),
                io.String.Input("negative", multiline=True, default="",
                                tooltip="Negative prompt for every image."),
                io.Float.Input("threshold", default=-0.69, min=-1000.0, max=1000.0, step=0.01,
                               tooltip="With judges: keep an image only if its judge score is ≥ this "
                                       "(VLM yes/no judge: log p(yes); -0.69 ≈ p 0.5). Scores are stored."),
                io.Boolean.Input("filter_images", default=True,
                                 tooltip="With judges: on = drop images below threshold; off = keep all and only "
                                         "store the scores."),
                PoEJudges.Input("judges", optional=True,
                                tooltip="Optional pixel judges (VLM Judge / CLIP Judge) that score each image."),
            ],
            outputs=[
                io.String.Output(display_name="dataset_path", tooltip="The dataset folder (for the LoRA trainer)."),
                io.Image.Output(display_name="preview", tooltip="Images kept in this run (or the first ones)."),
                io.String.Output(display_name="report"),
            ],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, dataset_name=None):
        if dataset_name is not None:
            try:
                output_path("dataset_name", dataset_name)
            except ValueError as exc:
                return str(exc)
        return True

    @classmethod
    def execute(cls, model, clip, vae, prompts, prompts_file, dataset_name, images_per_prompt, seed, steps, cfg,
                sampler_name, scheduler, width, height, batch_size, negative, threshold, filter_images,
                judges=None) -> io.NodeOutput:
        if sampler_name not in comfy.samplers.KSampler.SAMPLERS:
            raise ValueError(f"sampler_name: unknown sampler {sampler_name!r}")
        if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
            raise ValueError(f"scheduler: unknown scheduler {scheduler!r}")
        prompt_list = collect_prompts(prompts, prompts_file)
        root = output_path("dataset_name", dataset_name)
        generate = comfy_image_generator(model, clip, vae, negative, steps, cfg, sampler_name, scheduler, width,
                                         height)
        use_threshold = threshold if (judges and filter_images) else None
        settings = {"steps": steps, "cfg": cfg, "sampler": sampler_name, "scheduler": scheduler,
                    "width": width, "height": height, "negative": negative}
        report = build_dataset(root, prompt_list, generate, seed=seed, images_per_prompt=images_per_prompt,
                               judges=judges or (), threshold=use_threshold, batch_size=batch_size,
                               settings=settings)
        dataset = SkillDataset(root, create=False)
        text = (f"{report.summary()}\ndataset: {len(dataset.accepted)} images kept of {len(dataset.records)} "
                f"generated in total")
        return io.NodeOutput(str(root), preview_images(dataset, report.new_records), text,
                             ui=ui.PreviewText(text))


# --------------------------------------------------------------------------------------- trainer


def resolve_dataset_path(dataset_path: str) -> Path:
    """The dataset folder: an absolute path (Skill Dataset's ``dataset_path`` output) or a name under
    output/selma."""
    text = str(dataset_path or "").strip()
    if not text:
        raise ValueError("dataset_path: connect SELMA Skill Dataset's dataset_path or write a dataset folder")
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = output_path("dataset_path", text)
    if not (path / "manifest.jsonl").is_file():
        raise ValueError(f"dataset_path: {str(path)!r} is not a SELMA skill dataset (no manifest.jsonl); "
                         "build one with SELMA Skill Dataset")
    return path


def comfy_encoders(base_model, clip, vae):
    """(encode_prompt, encode_image, collate) for the frozen text encoder and VAE of a ComfyUI model.

    A condition is the dict of model inputs ComfyUI's sampler would pass to ``apply_model`` (``c_crossattn``
    and, for SDXL-like models, the ``y`` vector from the pooled output and the image size)."""
    size = {}

    def encode_image(pixels):
        size["height"], size["width"] = int(pixels.shape[1]), int(pixels.shape[2])
        latent = vae.encode(pixels[..., :3])
        return base_model.process_latent_in(latent.float()).cpu()

    def encode_prompt(caption):
        cond, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
        extra = base_model.extra_conds(cross_attn=cond, pooled_output=pooled, device="cpu",
                                       width=size.get("width", 512), height=size.get("height", 512))
        return {k: v.cond.float().cpu() for k, v in extra.items() if k in ("c_crossattn", "y")}

    def collate(conds):
        out = {}
        for key in conds[0]:
            items = [c[key] for c in conds]
            if key == "c_crossattn":   # long prompts: repeat to a common token length, as ComfyUI batches
                out[key] = comfy.conds.CONDCrossAttn(items[0]).concat([comfy.conds.CONDCrossAttn(c) for c in items[1:]])
            else:
                out[key] = torch.cat(items)
        return out

    return encode_prompt, encode_image, collate


class SelmaSkillLoRATrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoESelmaSkillLoRATrainer",
            display_name="SELMA Skill LoRA Trainer (PoE)",
            category=CATEGORY,
            description="Train one skill LoRA on a SELMA skill dataset with the plain denoising loss (ε-MSE at "
                        "a random timestep; text encoder frozen; LoRA on UNet attention q/k/v/out). Presets: "
                        "reference = the paper (rank 128, lr 3e-4, batch 64, 5000 steps), small, tiny.",
            inputs=[
                io.Model.Input("model", tooltip="The model that generated the dataset (SD1.x/2/SDXL-like UNet or "
                                                "a flow model); it stays frozen, only the LoRA trains."),
                io.Clip.Input("clip", tooltip="Its text encoder (frozen; captions are encoded once)."),
                io.Vae.Input("vae", tooltip="Its VAE (images are encoded to latents once)."),
                io.String.Input("dataset_path", default="",
                                tooltip="Connect SELMA Skill Dataset's dataset_path, or write a dataset name under "
                                        "output/selma (or an absolute folder)."),
                io.Combo.Input("preset", options=list(PRESETS), default="small",
                               tooltip="reference: the SELMA paper (rank 128, alpha 128, lr 3e-4, batch 64 as 8×8 "
                                       "micro-batches, 5000 steps; big GPU). small: rank 32, lr 1e-4, batch 16 "
                                       "(4×4), 1500 steps. tiny: rank 8, lr 1e-4, batch 4 (4×1), 400 steps."),
                io.Int.Input("steps", default=0, min=0, max=1000000,
                             tooltip="Training steps; 0 = the preset's."),
                io.Float.Input("lr", default=0.0, min=0.0, max=1.0, step=1e-5, round=1e-7,
                               tooltip="Constant AdamW learning rate; 0 = the preset's."),
                io.Int.Input("rank", default=0, min=0, max=1024,
                             tooltip="LoRA rank (alpha = rank, as in the paper); 0 = the preset's."),
                io.Int.Input("batch_size", default=0, min=0, max=1024,
                             tooltip="Effective batch per step (gradients of micro-batches are accumulated); "
                                     "0 = the preset's."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds the LoRA init and every batch / timestep / noise choice."),
                io.String.Input("run_name", default="",
                                tooltip="Checkpoint folder under output/comfy_poe_training (empty = none). An "
                                        "interrupted run resumes from its last checkpoint."),
                io.Int.Input("checkpoint_every", default=250, min=0, max=1000000,
                             tooltip="Write a checkpoint every k steps (0 = only at the end); needs run_name."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute activations in backward: much less memory, ~30% slower."),
                io.Combo.Input("precision", options=PRECISIONS, default="auto",
                               tooltip="auto: bf16 autocast where the GPU supports it; off: the model's own dtype."),
            ],
            outputs=trainer_outputs("skill", "Denoising loss and gradient norm per step."),
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, preset, precision, run_name=None):
        if (error := run_name_error(run_name)):
            return error
        if preset is not None and preset not in PRESETS:
            return f"preset must be one of {list(PRESETS)}, got {preset!r}"
        if precision is not None and precision not in PRECISIONS:
            return f"precision must be one of {PRECISIONS}, got {precision!r}"
        return True

    @classmethod
    def execute(cls, model, clip, vae, dataset_path, preset, steps, lr, rank, batch_size, seed, run_name,
                checkpoint_every, gradient_checkpointing, precision) -> io.NodeOutput:
        root = resolve_dataset_path(dataset_path)
        config = preset_config(preset, steps=steps or None, lr=lr or None, rank=rank or None,
                               alpha=float(rank) if rank else None, batch_size=batch_size or None, seed=seed,
                               checkpoint_every=checkpoint_every, autocast="auto" if precision == "auto" else "off",
                               eval_samples=min(8, PRESETS[preset].eval_samples))
        t0 = time.monotonic()
        interrupt = comfy.model_management.throw_exception_if_processing_interrupted
        encode_prompt, encode_image, collate = comfy_encoders(model.model, clip, vae)
        try:
            pairs = SkillDataset(root, create=False).pairs()
            data = encode_pairs(pairs, encode_prompt, encode_image, check=interrupt)  # before the UNet is loaded
        except ValueError as exc:
            raise ValueError(f"dataset_path: {exc}") from None
        metadata = {TRAINING_KEY: json.dumps({"method": "selma_skill", "dataset": root.name, "pairs": len(data),
                                              "preset": preset, **{k: getattr(config, k) for k in (
                                                  "rank", "alpha", "lr", "steps", "batch_size", "targets", "seed")}}),
                    "ss_network_dim": str(config.rank), "ss_network_alpha": str(config.alpha)}
        export = lambda net: net.export_state_dict(prefix="diffusion_model.")  # noqa: E731
        device = comfy.model_management.get_torch_device()
        pbar = comfy.utils.ProgressBar(config.steps)
        with torch.inference_mode(False), torch.enable_grad():
            dm = model.model.diffusion_model
            network = create_lora(dm, config.lora_config(), seed=seed, dtype=torch.float32, device=device)
            mp = prepare_trainable_patcher(model, network)
            mp.model.requires_grad_(False)
            model_sampling = mp.get_model_object("model_sampling")
            comfy.model_management.load_models_gpu([mp], force_full_load=True)
            base = mp.model
            undo = enable_gradient_checkpointing(dm) if gradient_checkpointing else (lambda: None)
            try:
                result = train_skill_lora(
                    data, None, lambda x, sigma, cond: base.apply_model(x, sigma, **cond), None, None,
                    config=config, sigmas=model_sampling.sigmas.detach().float().cpu(),
                    parameterization=parameterization_of(model_sampling), network=network, collate=collate,
                    device=device, run_dir=run_folder(run_name) if run_name.strip() else None, export=export,
                    metadata=metadata, progress=lambda step, total, rec: pbar.update_absolute(step, total),
                    interrupt=interrupt)
            finally:
                undo()
            lora_sd = TrainedLoRA(export(network), metadata)
        tuned, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0.0)
        report = (f"{result.summary()}\ndataset: {root}\npreset {preset}: lr {config.lr}, batch {config.batch_size} "
                  f"(micro-batches of {config.micro}), targets {config.targets}; total {time.monotonic() - t0:.1f} s"
                  + (f"\ncheckpoint: {result.checkpoint}" if result.checkpoint else ""))
        curves = curve_tensor(result.history, f"SELMA skill LoRA ({root.name}): {len(network.paths)} layers, "
                                              f"rank {config.rank}")
        return io.NodeOutput(tuned, lora_sd, curves, report, ui=ui.PreviewText(report))


NODES = [SelmaSkillPrompts, SelmaSkillDataset, SelmaSkillLoRATrainer]
