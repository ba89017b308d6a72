"""Reward-model judges as nodes: PickScore, HPS v2.1, ImageReward, LAION aesthetic predictor v2.

Thin ComfyUI layer over experts.reward: model folders live in models/reward (one folder per model, see
docs/reward_judges.md); the loaded model is wrapped in a ModelPatcher (nodes.vlm.ManagedModel) so
ComfyUI's memory manager moves it to the GPU for each use and offloads it with everything else. The
judge goes out on the same POE_JUDGES socket as the VLM / CLIP judges: SMC potential, VLM Score /
Rank (best-of-N), trainers' rewards.
"""
from __future__ import annotations

import os

import comfy.model_management
import folder_paths
from comfy_api.latest import io

from ._types import PoEJudges
from ..experts.reward import (
    AESTHETIC_HEAD, IMAGEREWARD_HEAD, MARKER, OPEN_CLIP_WEIGHTS, PICKLE_SUFFIXES, RewardJudge, load_reward_model,
)
from .vlm import DTYPE_OPTIONS, ManagedModel, auto_dtype_name, resolve_folder_in

REWARD_FOLDER = "reward"
_MARKS = ("config.json", MARKER, AESTHETIC_HEAD, IMAGEREWARD_HEAD, OPEN_CLIP_WEIGHTS)

folder_paths.add_model_folder_path(REWARD_FOLDER, os.path.join(folder_paths.models_dir, REWARD_FOLDER))


def _looks_like_reward(path: str) -> bool:
    """A model folder (or one holding only an official pickle, listed so the node can explain the converter)."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return any(n in _MARKS for n in names) or any(os.path.splitext(n)[1] in PICKLE_SUFFIXES for n in names)


def reward_folders() -> list[str]:
    """Reward model folders one or two levels deep under every models/reward path."""
    found = set()
    for base in folder_paths.get_folder_paths(REWARD_FOLDER):
        if not os.path.isdir(base):
            continue
        for entry in sorted(os.scandir(base), key=lambda e: e.name):
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            if _looks_like_reward(entry.path):
                found.add(entry.name)
                continue
            for sub in os.scandir(entry.path):
                if sub.is_dir() and not sub.name.startswith(".") and _looks_like_reward(sub.path):
                    found.add(f"{entry.name}/{sub.name}")
    return sorted(found)


class PoERewardJudge(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoERewardJudge",
            display_name="Reward Model Judge (PoE)",
            category="poe/judges",
            description="A human-preference reward model from models/reward as a judge: PickScore, HPS v2.1, "
                        "ImageReward (prompt-image) or the LAION aesthetic predictor (image only); the kind is "
                        "read from the folder. Differentiable; plugs into the SMC / FK-steering samplers, "
                        "VLM Score / Rank (best-of-N) and the trainers.",
            inputs=[
                io.Combo.Input("model_name", options=reward_folders(),
                               tooltip="A reward folder inside models/reward (see docs/reward_judges.md for the "
                                       "layout of each model; official .pt files must be converted once with "
                                       "'python -m comfy_poe convert-reward')."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The prompt the images should match (usually the generation prompt). "
                                        "Not used by the aesthetic predictor."),
                io.Float.Input("weight", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="Weight γ of this judge: the sampler multiplies the target by "
                                       "exp(γ · reward). Rewards differ in scale: ImageReward ≈ N(0, 1) over "
                                       "images, PickScore / HPS ×100 ≈ 20–30, aesthetic ≈ 1–10."),
                io.Combo.Input("dtype", options=DTYPE_OPTIONS, default="auto",
                               tooltip="Weight precision. auto: bfloat16 (or float16) on GPU, float32 on CPU."),
                io.Int.Input("batch_size", default=8, min=1, max=256,
                             tooltip="Images per reward-model forward pass; lower it if memory runs out."),
                PoEJudges.Input("judges", optional=True,
                                tooltip="Judges to chain with (this judge is appended to the list)."),
            ],
            outputs=[PoEJudges.Output(display_name="judges")],
        )

    @classmethod
    def execute(cls, model_name, prompt, weight, dtype, batch_size, judges=None) -> io.NodeOutput:
        folder = resolve_folder_in(REWARD_FOLDER, "model_name", model_name,
                                   " (put reward models in ComfyUI/models/reward, see docs/reward_judges.md)")
        model = load_reward_model(folder, device=comfy.model_management.unet_offload_device(),
                                  dtype=auto_dtype_name(dtype, comfy.model_management.get_torch_device()))
        managed = ManagedModel(model, model)
        judge = RewardJudge(model, prompt, batch_size=batch_size, before_call=managed.load)
        return io.NodeOutput(list(judges or []) + [judge.expert(weight, name=f"{model.kind}:{model_name}")])


NODES = [PoERewardJudge]
