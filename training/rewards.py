"""Rewards for the alignment trainers: any discriminative expert, plus model-free image rewards.

A *reward function* maps a batch of final latents (model coordinates, (N, C, H, W)) to a (N,) float tensor
r(x) — black-box, no gradient needed (DDPO / GFlowNet only use its value).  ``reward_function`` turns
:class:`~comfy_poe.experts.DiscriminativeExpert` judges (VLM judge, CLIP score, classifier, palette, …)
into one: r(x) = Σ_j w_j r_j(x) (decoding once for all pixel judges), exactly what the PoE sampler uses as
log-potentials.

Model-free rewards (no weights needed), as pixel-space experts on ComfyUI IMAGE batches (N, H, W, C) in [0, 1]:
- JPEG compressibility / incompressibility (DDPO, Black et al. 2023; the DAG-GFlowNet code's
  ``jpeg_(in)compressibility``): ∓ size in kB of the image saved as JPEG at quality 95 (PIL), after
  rounding to uint8 as the reference does;
- brightness: mean BT.601 luma (the cheap reward of the tests and benchmarks).

The diffusers trainer's ``reward`` / ``judge`` config entries (:class:`JudgeSpec`, :func:`parse_judge_specs`)
name these or a model folder: the reward models of ``experts.reward`` and the VLM judge of ``experts.vlm_judge``,
built by :class:`JudgeLoader` with the same loaders and judge classes as the ComfyUI nodes.
"""
from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..experts.base import PIXEL, DiscriminativeExpert, evaluate_potentials
from ..experts.image_judges import luma

RewardFn = Callable[[torch.Tensor], torch.Tensor]


def _check_pixels(images: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{name}: expected an IMAGE batch (N, H, W, C) with C in 1/3/4, got {shape}")
    return images


def jpeg_sizes_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB (1000 bytes) of each image saved as JPEG at ``quality`` (uint8 after round + clamp)."""
    from PIL import Image

    images = _check_pixels(images, "jpeg reward")
    pixels = (images.detach().float()[..., :3] * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        image.save(buffer, format="JPEG", quality=int(quality))
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


def jpeg_judge(mode: str = "compressibility", weight: float = 1.0, quality: int = 95) -> DiscriminativeExpert:
    """JPEG (in)compressibility reward: −kB (compressibility, favours flat simple images) or +kB
    (incompressibility, favours detail / texture).  Black-box (not differentiable)."""
    if mode not in ("compressibility", "incompressibility"):
        raise ValueError(f"jpeg reward mode must be 'compressibility' or 'incompressibility', got {mode!r}")
    sign = -1.0 if mode == "compressibility" else 1.0

    def fn(images: torch.Tensor) -> torch.Tensor:
        return sign * jpeg_sizes_kb(images, quality)

    return DiscriminativeExpert(fn, weight=weight, space=PIXEL, differentiable=False, name=f"jpeg_{mode}",
                                info={"quality": quality})


def brightness_judge(weight: float = 1.0) -> DiscriminativeExpert:
    """Mean BT.601 luma in [0, 1] (differentiable)."""

    def fn(images: torch.Tensor) -> torch.Tensor:
        images = _check_pixels(images, "brightness reward")
        if images.shape[-1] == 1:
            return images[..., 0].flatten(1).mean(1)
        return luma(images).flatten(1).mean(1)

    return DiscriminativeExpert(fn, weight=weight, space=PIXEL, differentiable=True, name="brightness")


def reward_function(judges: Sequence[DiscriminativeExpert], decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                    clamp_pixels: bool = True) -> RewardFn:
    """r(x) = Σ_j w_j r_j(x) for final latents x (no gradient).  Pixel judges see ``decode(x)`` clamped to
    [0, 1] (what a VAE Decode node shows); noise-aware judges get σ = 0."""
    judges = list(judges or [])
    if not judges:
        raise ValueError("reward: connect at least one judge / reward expert")
    for judge in judges:
        if not isinstance(judge, DiscriminativeExpert):
            raise TypeError(f"reward: expected DiscriminativeExpert objects, got {type(judge).__name__}")
        if judge.space == PIXEL and decode is None:
            raise ValueError(f"reward {judge.name!r} scores decoded pixels but no decoder (VAE) was given")
    pixel_decode = None
    if decode is not None:
        pixel_decode = (lambda z: decode(z).clamp(0.0, 1.0)) if clamp_pixels else decode  # noqa: E731

    @torch.no_grad()
    def reward(x: torch.Tensor) -> torch.Tensor:
        value = evaluate_potentials(judges, x, decode=pixel_decode).float()
        if not torch.isfinite(value).all():
            raise ValueError("reward: a judge returned a non-finite value (−inf rewards cannot be trained on)")
        return value

    return reward


# ------------------------------------------------------------------------------ judges from a run config
# The diffusers trainer's reward / judge settings: model-free rewards by name; reward models, VLM and CLIP judges
# from local folders, loaded with the same loaders and judge classes as the ComfyUI nodes.
MODEL_FREE_REWARDS = ("brightness", "jpeg-compressibility", "jpeg-incompressibility")
REWARD_MODEL_KINDS = {"pickscore": "pickscore", "hps": "hpsv2", "hpsv2": "hpsv2", "hps-v2.1": "hpsv2",
                      "imagereward": "imagereward", "aesthetic": "aesthetic"}
VLM_KIND, CLIP_KIND = "vlm", "clip"
JUDGE_DTYPES = ("auto", "float32", "bfloat16", "float16")
PROMPT_FIELD = "{prompt}"
COMMON_KEYS = {"kind", "path", "weight", "dtype", "batch_size"}
KIND_KEYS = {
    "reward model": {"prompt"},
    VLM_KIND: {"question", "answer", "alternative", "questions", "mode", "visual_prompt", "allow_pickle",
               "trust_remote_code"},
    CLIP_KIND: {"prompt", "negatives", "allow_pickle", "trust_remote_code"},
}
JUDGE_KEYS = COMMON_KEYS.union(*KIND_KEYS.values())


@dataclass(frozen=True)
class JudgeSpec:
    """One reward / judge of a run config (``reward = "..."``, ``[reward]``, ``[[reward]]``, ``judge = {...}``).

    kind:        brightness | jpeg-compressibility | jpeg-incompressibility | pickscore | hpsv2 | imagereward |
                 aesthetic | vlm | clip;
    path:        the model folder (reward models: a models/reward folder; vlm, clip: a models/vlm folder);
    weight:      w of r = Σ_j w_j r_j;
    prompt:      reward models and clip: the text the images are scored against; "" = the generation prompt;
    negatives:   clip: texts the prompt is normalised against (the CLIP Judge node's negatives);
    questions:   vlm: "question | answer | weight | alternative" lines; ``{prompt}`` becomes the generation prompt;
    mode:        vlm: yes_no (normalised yes/no log-probability) | dual_process (mean answer log-likelihood);
    dtype:       auto = float32 on the CPU, bfloat16 (or float16) on a GPU, as the nodes;
    batch_size:  images per judge forward pass;
    visual_prompt: vlm: overlays drawn on the judge's copy of the images (VLM Judge node syntax);
    allow_pickle / trust_remote_code: vlm and clip folders (reward folders are safetensors: convert pickles once).
    """

    kind: str
    path: str = ""
    weight: float = 1.0
    prompt: str = ""
    negatives: tuple = ()
    questions: str = ""
    mode: str = ""
    dtype: str = "auto"
    batch_size: int = 8
    visual_prompt: str = ""
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @property
    def needs_model(self) -> bool:
        return self.kind not in MODEL_FREE_REWARDS

    def fingerprint(self):
        """What identifies the judge in a run's fingerprint (the bare name for a model-free reward of weight 1)."""
        if not self.needs_model and self.weight == 1.0:
            return self.kind
        d = {"kind": self.kind, "weight": self.weight}
        if self.needs_model:
            d.update(folder=Path(self.path).name, prompt=self.prompt, dtype=self.dtype)
        if self.kind == VLM_KIND:
            d.update(questions=self.questions, mode=self.mode, visual_prompt=self.visual_prompt)
        if self.kind == CLIP_KIND:
            d.update(negatives=list(self.negatives))
        return d


def _kind_name(value) -> str:
    name = str(value).strip().lower().replace("_", "-").replace(" ", "-")
    return REWARD_MODEL_KINDS.get(name, name)


def _vlm_questions(entry: dict, mode: str) -> str:
    """The questions text of a vlm entry: ``question`` / ``answer`` / ``alternative``, or ``questions`` lines."""
    from ..experts.vlm_judge import SCORING_MODES, Question, parse_questions

    if mode not in SCORING_MODES:
        raise ValueError(f"mode must be one of {', '.join(SCORING_MODES)}, got {mode!r}")
    if entry.get("questions") and entry.get("question"):
        raise ValueError("give question = ... (with answer) or questions = ..., not both")
    if entry.get("question") is not None:
        for key in ("question", "answer", "alternative"):
            if any(c in str(entry.get(key, "")) for c in "|\n"):
                raise ValueError(f"{key} must be one line without '|' (use questions = ... for several)")
        q = Question(str(entry["question"]), str(entry.get("answer", "Yes")), 1.0,
                     str(entry["alternative"]) if entry.get("alternative") else None)
        questions = f"{q.text} | {q.answer} | 1" + (f" | {q.alternative}" if q.alternative else "")
    else:
        questions = str(entry.get("questions", ""))
    for q in parse_questions(questions):
        if mode == "yes_no" and q.opposite is None:
            raise ValueError(f"question {q.text!r} has no alternative answer to normalise against in mode yes_no; "
                             "give alternative = ... or use mode = 'dual_process'")
    return questions


def _model_spec(kind: str, entry: dict, path: Path, common: dict, default_mode: str) -> JudgeSpec:
    """The JudgeSpec of a model entry after the checks its loader makes before reading weights."""
    from ..experts.clip_judge import CLIP_MODEL_TYPES
    from ..experts.reward import check_reward_folder
    from ..experts.vlm import check_model_folder

    safety = dict(allow_pickle=bool(entry.get("allow_pickle", False)),
                  trust_remote_code=bool(entry.get("trust_remote_code", False)))
    prompt = str(entry.get("prompt", "")).strip()
    if kind == VLM_KIND:
        check_model_folder(path, **safety)
        mode = str(entry.get("mode", default_mode))
        visual = str(entry.get("visual_prompt", ""))
        if visual.strip():
            from ..experts.overlays import parse_visual_prompt

            parse_visual_prompt(visual)
        return JudgeSpec(kind, questions=_vlm_questions(entry, mode), mode=mode, visual_prompt=visual, **safety,
                         **common)
    if kind == CLIP_KIND:
        check_model_folder(path, allowed_model_types=CLIP_MODEL_TYPES, what="CLIP", **safety)
        negatives = entry.get("negatives", [])
        negatives = negatives.splitlines() if isinstance(negatives, str) else negatives
        if not isinstance(negatives, list) or not all(isinstance(n, str) for n in negatives):
            raise ValueError(f"negatives must be a list of strings, got {entry.get('negatives')!r}")
        return JudgeSpec(kind, prompt=prompt, negatives=tuple(n.strip() for n in negatives if n.strip()), **safety,
                         **common)
    found = check_reward_folder(path)
    if found != kind:
        raise ValueError(f"kind is {kind}, but the folder {str(path)!r} holds a {found} model; set kind = "
                         f"\"{found}\" or point path at a {kind} folder")
    return JudgeSpec(kind, prompt=prompt, **common)


def parse_judge_specs(value, base: Path, name: str, allowed_free: Sequence[str], default_mode: str) -> tuple:
    """``reward = "brightness"`` / ``[reward]`` / ``[[reward]]`` (or ``judge``) as JudgeSpecs, checked before any
    model is loaded: the kind, the keys, the folder (exists, safetensors, the architecture the kind needs).
    ``allowed_free``: the model-free kinds allowed here; ``default_mode``: the VLM scoring mode by default."""
    kinds = ", ".join([*allowed_free, *dict.fromkeys(REWARD_MODEL_KINDS), VLM_KIND, CLIP_KIND])
    entries = value if isinstance(value, list) else [value]
    if not entries:
        raise ValueError(f"config: {name} is an empty list; give at least one {name}")
    specs = []
    for number, entry in enumerate(entries, start=1):
        where = name if len(entries) == 1 else f"{name} #{number}"
        entry = {"kind": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict):
            raise ValueError(f"config: {where} must be a name or a table {{kind = ..., path = ...}}, got {entry!r}")
        unknown = sorted(set(entry) - JUDGE_KEYS)
        if unknown:
            raise ValueError(f"config [{where}]: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(JUDGE_KEYS))})")
        kind = _kind_name(entry.get("kind", ""))
        if kind not in (*allowed_free, *REWARD_MODEL_KINDS.values(), VLM_KIND, CLIP_KIND):
            extra = " (the jpeg rewards are not differentiable)" if kind in MODEL_FREE_REWARDS else ""
            raise ValueError(f"config [{where}]: kind must be one of {kinds}{extra}, got {entry.get('kind')!r}")
        group = kind if kind in (VLM_KIND, CLIP_KIND) else "reward model"
        allowed = {"kind", "weight"} if kind in MODEL_FREE_REWARDS else COMMON_KEYS | KIND_KEYS[group]
        wrong = sorted(set(entry) - allowed)
        if wrong:
            what = f"the model-free {kind}" if kind in MODEL_FREE_REWARDS else f"kind {kind}"
            hint = " (pickles: convert them once with python -m comfy_poe convert-reward)" if group == "reward model" else ""
            raise ValueError(f"config [{where}]: {', '.join(wrong)} do not apply to {what}{hint}")
        try:
            weight, batch_size = float(entry.get("weight", 1.0)), int(entry.get("batch_size", 8))
        except (TypeError, ValueError):
            raise ValueError(f"config [{where}]: weight must be a number and batch_size an integer") from None
        if not math.isfinite(weight):
            raise ValueError(f"config [{where}]: weight must be finite, got {entry.get('weight')!r}")
        if batch_size < 1:
            raise ValueError(f"config [{where}]: batch_size must be >= 1, got {batch_size}")
        dtype = str(entry.get("dtype", "auto"))
        if dtype not in JUDGE_DTYPES:
            raise ValueError(f"config [{where}]: dtype must be one of {', '.join(JUDGE_DTYPES)}, got {dtype!r}")
        if kind in MODEL_FREE_REWARDS:
            specs.append(JudgeSpec(kind, weight=weight))
            continue
        if not str(entry.get("path", "")).strip():
            raise ValueError(f"config [{where}]: kind {kind} needs path = <model folder>")
        path = Path(str(entry["path"]))
        path = path if path.is_absolute() else base / path
        try:
            specs.append(_model_spec(kind, entry, path, dict(path=str(path), weight=weight, dtype=dtype,
                                                            batch_size=batch_size), default_mode))
        except (ValueError, OSError) as e:  # VLMFolderError and RewardFolderError are ValueErrors
            raise ValueError(f"config [{where}] (kind {kind}): {e}") from None
    return tuple(specs)


def judge_dtype(name: str, device) -> str:
    """'auto': float32 on the CPU, bfloat16 on GPUs that support it, else float16 (the nodes' rule)."""
    if name != "auto":
        return name
    device = torch.device(device)
    if device.type == "cpu":
        return "float32"
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float16"


class JudgeLoader:
    """Builds the judges of a run's JudgeSpecs for one generation prompt at a time; each model folder is
    loaded once (frozen, on ``device``) and shared by the judges of all prompts."""

    def __init__(self, specs: Sequence[JudgeSpec], device="cpu"):
        self.specs, self.device, self._models = tuple(specs), device, {}

    def _model(self, spec: JudgeSpec):
        key = (spec.kind, spec.path, spec.dtype, spec.allow_pickle, spec.trust_remote_code)
        if key not in self._models:
            load = dict(dtype=judge_dtype(spec.dtype, self.device), device=self.device)
            safety = dict(allow_pickle=spec.allow_pickle, trust_remote_code=spec.trust_remote_code)
            if spec.kind == VLM_KIND:
                from ..experts.vlm import load_vlm

                self._models[key] = load_vlm(spec.path, **load, **safety)
            elif spec.kind == CLIP_KIND:
                from ..experts.clip_judge import load_clip

                self._models[key] = load_clip(spec.path, **load, **safety)
            else:
                from ..experts.reward import load_reward_model

                self._models[key] = load_reward_model(spec.path, **load)
        return self._models[key]

    def judge(self, spec: JudgeSpec, prompt: str) -> DiscriminativeExpert:
        """The judge of ``spec`` for images made from ``prompt`` (used where the spec gives no prompt)."""
        if spec.kind == "brightness":
            return brightness_judge(spec.weight)
        if spec.kind in MODEL_FREE_REWARDS:
            return jpeg_judge(spec.kind.split("-", 1)[1], weight=spec.weight)
        if spec.kind == VLM_KIND:
            from ..experts.overlays import parse_visual_prompt
            from ..experts.vlm_judge import VLMJudge, parse_questions

            overlays = parse_visual_prompt(spec.visual_prompt) if spec.visual_prompt.strip() else ()
            questions = [dataclasses.replace(q, text=q.text.replace(PROMPT_FIELD, prompt))  # any text in a prompt
                         for q in parse_questions(spec.questions)]
            judge = VLMJudge(self._model(spec), questions, spec.mode, batch_size=spec.batch_size, overlays=overlays)
            return judge.expert(spec.weight, name=VLM_KIND)
        if spec.kind == CLIP_KIND:
            from ..experts.clip_judge import CLIPJudge

            model, processor, model_type = self._model(spec)
            judge = CLIPJudge(model, processor, model_type, [(spec.prompt or prompt, 1.0)], spec.negatives,
                              batch_size=spec.batch_size)
            return judge.expert(spec.weight, name=CLIP_KIND)
        from ..experts.reward import RewardJudge

        return RewardJudge(self._model(spec), spec.prompt or prompt, batch_size=spec.batch_size).expert(spec.weight)

    def judges(self, prompt: str) -> list[DiscriminativeExpert]:
        """The judges scoring images made from ``prompt``."""
        return [self.judge(spec, prompt) for spec in self.specs]
