"""SELMA nodes: skill prompts from a local LLM, and a resumable self-generated image dataset.

Thin ComfyUI layer over ``selma`` (engine). LLM folders live in models/LLM; prompt files and datasets are
written under ComfyUI's output folder (``output/selma/...``). The Skill LoRA Trainer node lives with the
training core; it reads the dataset folder this file writes.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
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
from ._types import PoEJudges
from .vlm import ManagedModel, _load_inputs, _subdirs, auto_dtype_name

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
    for base in folder_paths.get_folder_paths(LLM_FOLDER):
        root = os.path.realpath(base)
        path = os.path.realpath(os.path.join(root, name))
        if os.path.commonpath([root, path]) != root:
            raise ValueError(f"llm_name {name!r} points outside the models/LLM folder")
        if os.path.isdir(path):
            return path
    raise ValueError(f"llm_name {name!r}: no such folder in {folder_paths.get_folder_paths(LLM_FOLDER)}; "
                     "put a Hugging Face model folder (config.json, *.safetensors, tokenizer files) in models/LLM")


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


NODES = [SelmaSkillPrompts, SelmaSkillDataset]
