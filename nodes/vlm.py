"""VLM-Judge nodes: local vision-language models (and CLIP / SigLIP) as scores, sampling potentials, rankers.

Thin ComfyUI layer over experts.vlm / vlm_judge / clip_judge: model folders live in models/vlm (also
models/LLM); loaded models are wrapped in a ModelPatcher so ComfyUI's memory manager moves them to the
GPU for each use and offloads them with everything else.
"""
from __future__ import annotations

import json
import os

import torch

import comfy.model_management
import comfy.model_patcher
import folder_paths
from comfy_api.latest import io, ui

from ._types import PoEJudges
from ..experts import PIXEL, evaluate_potentials
from ..experts.clip_judge import CLIP_MODEL_TYPES, CLIPJudge, load_clip, parse_prompts
from ..experts.overlays import parse_visual_prompt
from ..experts.vlm import check_model_folder, load_vlm
from ..experts.vlm_judge import SCORING_MODES, VLMJudge, VLMView, parse_questions

VLM_FOLDER = "vlm"
VLMModel = io.Custom("VLM_MODEL")
CLIPJudgeModel = io.Custom("POE_CLIP_MODEL")
DTYPE_OPTIONS = ["auto", "bfloat16", "float16", "float32"]

for _name in ("vlm", "LLM"):
    folder_paths.add_model_folder_path(VLM_FOLDER, os.path.join(folder_paths.models_dir, _name))


def model_folders(clip: bool) -> list[str]:
    """Model folders (one or two levels deep, with a config.json) under every models/vlm path;
    ``clip`` selects CLIP / SigLIP dual encoders, otherwise everything else."""
    names = set()
    for base in folder_paths.get_folder_paths(VLM_FOLDER):
        if not os.path.isdir(base):
            continue
        for config in [os.path.join(d, "config.json") for d in _subdirs(base, depth=2)]:
            try:
                with open(config, encoding="utf-8") as f:
                    model_type = json.load(f).get("model_type")
            except (OSError, ValueError):
                continue
            if (model_type in CLIP_MODEL_TYPES) == clip:
                names.add(os.path.relpath(os.path.dirname(config), base).replace(os.sep, "/"))
    return sorted(names)


def _subdirs(base: str, depth: int) -> list[str]:
    found = []
    for entry in sorted(os.scandir(base), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):
            if os.path.isfile(os.path.join(entry.path, "config.json")):
                found.append(entry.path)
            elif depth > 1:
                found.extend(_subdirs(entry.path, depth - 1))
    return found


def resolve_folder_in(folder_name: str, input_name: str, name: str, hint: str = "") -> str:
    """Absolute path of model folder ``name`` under ComfyUI's ``models/<folder_name>`` paths; names that escape
    them are refused; errors name ``input_name``."""
    for base in folder_paths.get_folder_paths(folder_name):
        root = os.path.realpath(base)
        path = os.path.realpath(os.path.join(root, name))
        if os.path.commonpath([root, path]) != root:
            raise ValueError(f"{input_name} {name!r} points outside the models/{folder_name} folder")
        if os.path.isdir(path):
            return path
    raise ValueError(f"{input_name} {name!r}: no such folder in {folder_paths.get_folder_paths(folder_name)}{hint}")


def resolve_model_folder(name: str) -> str:
    """Absolute path of a listed VLM folder (the model_name input)."""
    return resolve_folder_in(VLM_FOLDER, "model_name", name)


def folder_problem(model_name, trust_remote_code, allow_pickle, **check) -> str | None:
    """Queue-time check of a model folder input: the reason it would be refused when the node runs
    (missing config or weights, pickle-only weights, custom code, wrong family), or None. Reads only
    config.json and the file list, so it costs nothing at queue time."""
    if model_name is None:  # linked or not sent: checked when the node runs
        return None
    try:
        check_model_folder(resolve_model_folder(model_name), allow_pickle=bool(allow_pickle),
                           trust_remote_code=bool(trust_remote_code), **check)
    except ValueError as e:  # VLMFolderError included
        return f"model_name: {e}"
    return None


def auto_dtype_name(dtype: str, device) -> str:
    """'auto' → bfloat16 (float16 without bf16 support) on an accelerator, float32 on CPU."""
    if dtype != "auto":
        return dtype
    if comfy.model_management.is_device_cpu(device):
        return "float32"
    return "bfloat16" if comfy.model_management.should_use_bf16(device) else "float16"


class ModuleHolder(torch.nn.Module):
    """Plain nn.Module around a transformers model: ModelPatcher sets ``.device``, a read-only HF property."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner


class ManagedModel:
    """A frozen model plus the ModelPatcher that lets ComfyUI load / offload it; ``load()`` before use."""

    def __init__(self, model: torch.nn.Module, payload):
        self.payload = payload
        self.patcher = comfy.model_patcher.ModelPatcher(
            ModuleHolder(model), load_device=comfy.model_management.get_torch_device(),
            offload_device=comfy.model_management.unet_offload_device(),
        )

    def load(self) -> None:
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)


def _load_inputs():
    return [
        io.Combo.Input("dtype", options=DTYPE_OPTIONS, default="auto",
                       tooltip="Weight precision. auto: bfloat16 (or float16) on GPU, float32 on CPU."),
        io.Boolean.Input("trust_remote_code", default=False,
                         tooltip="Allow the folder's own Python code (auto_map). Off: such folders are refused. "
                                 "Only switch on for sources you trust."),
        io.Boolean.Input("allow_pickle", default=False,
                         tooltip="Allow pickle weights (.bin/.pt/.ckpt) when the folder has no .safetensors. "
                                 "Pickles can run arbitrary code; off by default."),
    ]


def _chain(judges, expert) -> list:
    return list(judges or []) + [expert]


class PoEVLMLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEVLMLoader",
            display_name="VLM Loader (PoE)",
            category="poe/judges",
            description="Load a local vision-language model folder (Qwen2/2.5/3-VL, SmolVLM, Idefics2/3, LLaVA, "
                        "LLaVA-OneVision, Gemma 3, PaliGemma) from models/vlm or models/LLM.",
            inputs=[
                io.Combo.Input("model_name", options=model_folders(clip=False),
                               tooltip="A Hugging Face model folder (config.json + *.safetensors + processor files) "
                                       "inside models/vlm or models/LLM."),
                *_load_inputs(),
            ],
            outputs=[VLMModel.Output(display_name="vlm")],
        )

    @classmethod
    def validate_inputs(cls, model_name=None, trust_remote_code=None, allow_pickle=None):
        return folder_problem(model_name, trust_remote_code, allow_pickle) or True

    @classmethod
    def execute(cls, model_name, dtype, trust_remote_code, allow_pickle) -> io.NodeOutput:
        offload = comfy.model_management.unet_offload_device()
        bundle = load_vlm(resolve_model_folder(model_name), device=offload,
                          dtype=auto_dtype_name(dtype, comfy.model_management.get_torch_device()),
                          trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        return io.NodeOutput(ManagedModel(bundle.model, bundle))


class PoEVLMJudge(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEVLMJudge",
            display_name="VLM Judge (PoE)",
            category="poe/judges",
            description="Turn yes/no questions into a judge: log p(wanted answer | image, question), weighted and "
                        "summed. Plugs into the SMC sampler, VLM Score (best-of-N) and the trainers.",
            inputs=[
                VLMModel.Input("vlm", tooltip="Model from VLM Loader."),
                io.String.Input("questions", multiline=True, default="Is this a high quality photo? | Yes | 1.0",
                                tooltip="One question per line: question | answer | weight | alternative. "
                                        "Answer defaults to Yes, weight to 1; the alternative (No for Yes) is what "
                                        "the answer is normalised against in yes_no mode."),
                io.Combo.Input("mode", options=list(SCORING_MODES), default=SCORING_MODES[0],
                               tooltip="yes_no: log-probability of the answer normalised against its alternative "
                                       "(≤ 0, VQAScore-like). dual_process: mean answer-token log-likelihood "
                                       "(the Dual-Process tuning loss, negated)."),
                io.Float.Input("weight", default=1.0, min=-100.0, max=100.0, step=0.05,
                               tooltip="Weight of this judge in the product of experts (its log-potential is "
                                       "multiplied by it)."),
                io.String.Input("visual_prompt", multiline=True, default="",
                                tooltip="Drawn on the judge's copy only: 'palette: #ff0000 #00aa00', 'hline: 0.5', "
                                        "'vline: 0.33', 'point: A 0.25 0.6' (one per line)."),
                io.Int.Input("batch_size", default=4, min=1, max=256,
                             tooltip="Images per VLM forward pass; lower it if memory runs out."),
                PoEJudges.Input("judges", optional=True,
                                tooltip="Judges to chain with (this judge is appended to the list)."),
            ],
            outputs=[PoEJudges.Output(display_name="judges")],
        )

    @classmethod
    def validate_inputs(cls, questions=None, visual_prompt=None):
        # widgets are known when the prompt is queued (None when linked: then checked in execute)
        try:
            if questions is not None and not parse_questions(questions):
                return "questions: write at least one question, e.g. 'Is there a red car? | Yes | 2'"
            if visual_prompt is not None:
                parse_visual_prompt(visual_prompt)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, vlm, questions, mode, weight, visual_prompt, batch_size, judges=None) -> io.NodeOutput:
        judge = VLMJudge(vlm.payload, parse_questions(questions), mode, overlays=parse_visual_prompt(visual_prompt),
                         batch_size=batch_size, before_call=vlm.load)
        return io.NodeOutput(_chain(judges, judge.expert(weight, name=f"vlm:{vlm.payload.folder.name}")))


class PoECLIPJudge(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoECLIPJudge",
            display_name="CLIP Judge (PoE)",
            category="poe/judges",
            description="A CLIP or SigLIP folder (transformers format, in models/vlm) as a judge: image-text "
                        "similarity of each prompt, optionally normalised against negative prompts.",
            inputs=[
                io.Combo.Input("model_name", options=model_folders(clip=True),
                               tooltip="A CLIP / SigLIP Hugging Face folder inside models/vlm or models/LLM."),
                io.String.Input("prompts", multiline=True, default="a high quality photo | 1.0",
                                tooltip="One prompt per line, optionally 'prompt | weight'."),
                io.String.Input("negatives", multiline=True, default="",
                                tooltip="Optional alternatives, one per line: each prompt's score becomes its "
                                        "log-probability against them (softmax over prompt + negatives)."),
                io.Float.Input("weight", default=1.0, min=-100.0, max=100.0, step=0.05,
                               tooltip="Weight of this judge in the product of experts."),
                *_load_inputs(),
                PoEJudges.Input("judges", optional=True, tooltip="Judges to chain with."),
            ],
            outputs=[PoEJudges.Output(display_name="judges")],
        )

    @classmethod
    def validate_inputs(cls, prompts=None, model_name=None, trust_remote_code=None, allow_pickle=None):
        try:
            if prompts is not None and not parse_prompts(prompts):
                return "prompts: write at least one prompt, e.g. 'a high quality photo | 1.0'"
        except ValueError as e:
            return str(e)
        return folder_problem(model_name, trust_remote_code, allow_pickle, allowed_model_types=CLIP_MODEL_TYPES,
                              what="CLIP") or True

    @classmethod
    def execute(cls, model_name, prompts, negatives, weight, dtype, trust_remote_code, allow_pickle,
                judges=None) -> io.NodeOutput:
        prompt_list = parse_prompts(prompts)
        if not prompt_list:
            raise ValueError("prompts: write at least one prompt")
        model, processor, model_type = load_clip(
            resolve_model_folder(model_name), device=comfy.model_management.unet_offload_device(),
            dtype=auto_dtype_name(dtype, comfy.model_management.get_torch_device()),
            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        managed = ManagedModel(model, None)
        judge = CLIPJudge(model, processor, model_type, prompt_list, negatives.splitlines(), before_call=managed.load)
        return io.NodeOutput(_chain(judges, judge.expert(weight, name=f"{model_type}:{model_name}")))


def score_images(images: torch.Tensor, judges) -> tuple[torch.Tensor, torch.Tensor]:
    """(total (N,), per-judge weighted scores (J, N)) of an IMAGE batch."""
    if not judges:
        raise ValueError("judges: connect at least one judge (VLM Judge or CLIP Judge)")
    for judge in judges:
        if judge.space != PIXEL:
            raise ValueError(f"judge {judge.name!r} scores latents, not images; VLM Score needs pixel judges")
    with torch.no_grad():
        parts = torch.stack([evaluate_potentials([j], images, decode=lambda x: x) for j in judges])
    return parts.sum(0), parts


class PoEVLMScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEVLMScore",
            display_name="VLM Score / Rank (PoE)",
            category="poe/judges",
            description="Score an image batch with judges and sort it best-first; top_k gives best-of-N in one node.",
            inputs=[
                io.Image.Input("images", tooltip="Batch of images to score (e.g. VAE Decode of a batch)."),
                PoEJudges.Input("judges", tooltip="Judges from VLM Judge / CLIP Judge (chained)."),
                io.Int.Input("top_k", default=1, min=1, max=4096,
                             tooltip="How many of the best images go to the top_k output."),
            ],
            outputs=[
                io.Image.Output(display_name="sorted"),
                io.Image.Output(display_name="top_k"),
                io.String.Output(display_name="report"),
                io.Float.Output(display_name="scores", is_output_list=True),
            ],
        )

    @classmethod
    def execute(cls, images, judges, top_k) -> io.NodeOutput:
        total, parts = score_images(images, judges)
        order = torch.argsort(-total.cpu(), stable=True)
        lines = [f"rank {r + 1}: image {int(i)}  score {total[i].item():.4f}  ("
                 + ", ".join(f"{j.name} {parts[k, i].item():.4f}" for k, j in enumerate(judges)) + ")"
                 for r, i in enumerate(order.tolist())]
        sorted_images = images[order.to(images.device)]
        return io.NodeOutput(sorted_images, sorted_images[:top_k], "\n".join(lines),
                             [total[i].item() for i in order.tolist()])


class PoEVLMAsk(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEVLMAsk",
            display_name="VLM Ask (PoE)",
            category="poe/judges",
            description="Free-text answer of the VLM about the first image, seen exactly as a judge sees it "
                        "(same resize and visual prompt): use it to debug questions.",
            inputs=[
                VLMModel.Input("vlm", tooltip="Model from VLM Loader."),
                io.Image.Input("image", tooltip="Image to ask about (the first of the batch is used)."),
                io.String.Input("question", multiline=True, default="Describe the image.",
                                tooltip="Question asked verbatim (no 'Answer with Yes or No.' hint)."),
                io.Int.Input("max_new_tokens", default=64, min=1, max=1024,
                             tooltip="Longest answer, in tokens (greedy decoding)."),
                io.String.Input("visual_prompt", multiline=True, default="",
                                tooltip="Same syntax as VLM Judge: drawn on the VLM's copy only."),
            ],
            outputs=[io.String.Output(display_name="answer")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, vlm, image, question, max_new_tokens, visual_prompt) -> io.NodeOutput:
        view = VLMView(vlm.payload, overlays=parse_visual_prompt(visual_prompt), before_call=vlm.load)
        answer = view.ask(image, question, max_new_tokens)
        return io.NodeOutput(answer, ui=ui.PreviewText(answer))


NODES = [PoEVLMLoader, PoEVLMJudge, PoECLIPJudge, PoEVLMScore, PoEVLMAsk]
