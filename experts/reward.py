"""Human-preference reward models as judges: PickScore, HPS v2.1, ImageReward, LAION aesthetic predictor v2.

Engine code (plain torch + transformers; open_clip optional). Each model maps an IMAGE batch (N, H, W, C)
in [0, 1] and a prompt to one score per image, differentiably (the pixels go through a torch resize /
centre-crop / normalise path, :func:`preprocess`), so one :class:`RewardJudge` is a score, an SMC
potential (:meth:`RewardJudge.expert`) and a training loss. Official definitions, with f = image
embedding, g = text embedding, f̂ = f / ‖f‖:

* PickScore (Kirstain et al. 2023; CLIP ViT-H/14 fine-tuned on Pick-a-Pic):  s = τ · f̂ · ĝ,
  τ = exp(logit_scale) (≈ 100) — what ``yuvalkirstain/PickScore`` computes;
* HPS v2.1 (Wu et al. 2023; open_clip ViT-H-14):  s = 100 · f̂ · ĝ — HPSv2's ``img_score`` returns
  f̂ · ĝ (≈ 0.25–0.35); papers report it ×100, which is also a useful scale for λ;
* ImageReward (Xu et al. 2023; BLIP ViT-L + BERT with cross-attention + MLP):
  s = (MLP(h_[CLS](prompt | image)) − 0.16717) / 1.03334, h = the text encoder's first hidden state with
  the image tokens as cross-attention context, prompt padded to 35 tokens;
* LAION aesthetic predictor v2 (improved-aesthetic-predictor; MLP on CLIP ViT-L/14):  s = MLP(f̂), ≈ 1–10.

The MLP heads of ImageReward and the aesthetic predictor are the same stack of linear layers
(768 → 1024 → 128 → 64 → 16 → 1, dropout between, no non-linearity: :class:`LinearHead`).

Model folders (a ComfyUI ``models/reward/<name>`` folder; safetensors only):
* PickScore: the Hugging Face CLIP folder (config.json, model.safetensors, tokenizer, preprocessor);
* HPS v2.1: a CLIP-H transformers folder made by :func:`convert_reward` (``reward.json`` kind "hpsv2"),
  or ``open_clip_model.safetensors`` + ``reward.json`` {"kind": "hpsv2", "format": "open_clip"} (needs
  the ``open_clip_torch`` package, extra ``hps``);
* ImageReward: a transformers BLIP folder + ``imagereward_head.safetensors`` (made by the converter);
* aesthetic: a CLIP ViT-L/14 transformers folder + ``aesthetic_head.safetensors``.
Pickle checkpoints (``.pt``/``.pth``) are refused; :func:`convert_reward` turns them into these folders
once, with ``allow_pickle=True``, and checks the converted folder reproduces the original's scores.
"""
from __future__ import annotations

import json
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..extras import require_extra
from .base import PIXEL, DiscriminativeExpert
from .vlm import PICKLE_SUFFIXES, VLMFolderError, check_model_folder, freeze, resolve_dtype, weight_files
from .vlm_families import resize

PICKSCORE, HPS, IMAGEREWARD, AESTHETIC = "pickscore", "hpsv2", "imagereward", "aesthetic"
REWARD_KINDS = (PICKSCORE, HPS, IMAGEREWARD, AESTHETIC)
NEEDS_PROMPT = {PICKSCORE: True, HPS: True, IMAGEREWARD: True, AESTHETIC: False}
MARKER = "reward.json"
AESTHETIC_HEAD = "aesthetic_head.safetensors"
IMAGEREWARD_HEAD = "imagereward_head.safetensors"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
TRANSFORMERS, OPEN_CLIP = "transformers", "open_clip"
# ImageReward's score normalisation (ImageReward.py: rewards = (mlp(features) - mean) / std)
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072
IMAGEREWARD_MAX_TOKENS = 35
HPS_SCALE = 100.0
# OpenAI CLIP normalisation: ImageReward's and the aesthetic predictor's preprocessing
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# What the official checkpoints are called, for error messages that tell users which converter to run
OFFICIAL_FILES = {
    PICKSCORE: "pytorch_model.bin (yuvalkirstain/PickScore_v1, only needed when no model.safetensors)",
    HPS: "HPS_v2.1_compressed.pt (xswu/HPSv2)",
    IMAGEREWARD: "ImageReward.pt (THUDM/ImageReward)",
    AESTHETIC: "sac+logos+ava1-l14-linearMSE.pth (christophschuhmann/improved-aesthetic-predictor)",
}


class RewardFolderError(VLMFolderError):
    """A reward-model folder or checkpoint that cannot or must not be loaded."""


# --------------------------------------------------------------------------- pure helpers


def preprocess(images_nchw: torch.Tensor, size: int, crop: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Differentiable torchvision ``Resize(size, bicubic) → CenterCrop(crop) → Normalize(mean, std)`` of
    (N, 3, H, W) pixels in [0, 1] (the preprocessing of CLIP, open_clip, ImageReward and the aesthetic
    predictor)."""
    x = images_nchw
    h, w = x.shape[-2:]
    # the long side as torchvision / transformers compute it: int(size · long / short)
    x = resize(x, (size, int(size * w / h)) if h <= w else (int(size * h / w), size))
    top, left = (x.shape[-2] - crop) // 2, (x.shape[-1] - crop) // 2
    x = x[..., top:top + crop, left:left + crop]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - m) / s


class LinearHead(nn.Module):
    """The ImageReward / aesthetic-predictor MLP: ``layers`` = Linear, Dropout, Linear, Dropout, Linear,
    Dropout, Linear, Linear (no activations, as published); sizes come from the weights."""

    def __init__(self, sizes: Sequence[int]):
        super().__init__()
        if len(sizes) != 6:
            raise ValueError(f"the reward head has 5 linear layers (6 sizes), got sizes {list(sizes)}")
        a, b, c, d, e, f = sizes
        self.layers = nn.Sequential(nn.Linear(a, b), nn.Dropout(0.2), nn.Linear(b, c), nn.Dropout(0.2),
                                    nn.Linear(c, d), nn.Dropout(0.1), nn.Linear(d, e), nn.Linear(e, f))

    @classmethod
    def from_state_dict(cls, sd: dict, what: str = "reward head") -> "LinearHead":
        keys = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
        missing = sorted(keys - set(sd))
        if missing:
            raise RewardFolderError(f"{what}: not an ImageReward / aesthetic MLP head (missing {', '.join(missing[:4])})")
        sizes = [sd["layers.0.weight"].shape[1]] + [sd[f"layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6, 7)]
        head = cls(sizes)
        head.load_state_dict({k: sd[k] for k in keys})
        return head

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    def forward(self, x):
        return self.layers(x)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RewardFolderError(f"{path} is not valid JSON ({exc})") from exc


def _pickles(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES
                  and p.name != "training_args.bin")


def _pickle_message(path: Path, kind: Optional[str] = None) -> str:
    kinds = kind or "<" + "|".join(REWARD_KINDS) + ">"
    return (f"{path} is a pickle checkpoint; pickles can run arbitrary code when loaded, so they are refused. "
            f"Convert it once into safetensors: python -m comfy_poe convert-reward {kinds} --source '{path}' "
            f"--out <models/reward/NAME> --allow-pickle  (see docs/reward_judges.md)")


def detect_kind(folder) -> tuple[str, str]:
    """(kind, format) of a reward folder: ``reward.json`` decides, else the head files / config do."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RewardFolderError(f"reward model folder {str(folder)!r} does not exist or is not a folder")
    marker = folder / MARKER
    if marker.is_file():
        info = _read_json(marker)
        kind, fmt = info.get("kind"), info.get("format", TRANSFORMERS)
        if kind not in REWARD_KINDS:
            raise RewardFolderError(f"{marker}: kind {kind!r} is not one of {', '.join(REWARD_KINDS)}")
        if fmt not in (TRANSFORMERS, OPEN_CLIP) or (fmt == OPEN_CLIP and kind != HPS):
            raise RewardFolderError(f"{marker}: format {fmt!r} is not supported for kind {kind!r}")
        return kind, fmt
    if (folder / IMAGEREWARD_HEAD).is_file():
        return IMAGEREWARD, TRANSFORMERS
    if (folder / AESTHETIC_HEAD).is_file():
        return AESTHETIC, TRANSFORMERS
    if (folder / OPEN_CLIP_WEIGHTS).is_file():
        return HPS, OPEN_CLIP
    config = folder / "config.json"
    if config.is_file() and _read_json(config).get("model_type") == "clip":
        return PICKSCORE, TRANSFORMERS
    pickles = _pickles(folder)
    if pickles:
        raise RewardFolderError(_pickle_message(pickles[0]))
    raise RewardFolderError(
        f"{str(folder)!r} is not a reward model folder: expected a CLIP folder (PickScore), a folder made by "
        "'python -m comfy_poe convert-reward' (HPS v2.1, ImageReward, aesthetic: reward.json + *_head.safetensors), "
        "see docs/reward_judges.md")


def _load_head(path: Path, what: str) -> tuple[LinearHead, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise RewardFolderError(f"{what}: {path.name} is missing from {str(path.parent)!r}")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    return LinearHead.from_state_dict(load_file(str(path)), what), metadata


def _check_processor_files(folder: Path, kind: str, text: bool) -> None:
    """The tokenizer / image-processor files transformers needs; PickScore_v1 ships without them."""
    missing = []
    if text and not any((folder / n).is_file() for n in ("tokenizer.json", "vocab.json", "vocab.txt")):
        missing.append("tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    if kind != IMAGEREWARD and not any((folder / n).is_file() for n in ("preprocessor_config.json", "processor_config.json")):
        missing.append("image processor (preprocessor_config.json)")
    if missing:
        source = ("Salesforce/blip-itm-large-coco" if kind == IMAGEREWARD else
                  "openai/clip-vit-large-patch14" if kind == AESTHETIC else "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
        raise RewardFolderError(f"{kind} folder {str(folder)!r} has no {' and no '.join(missing)}; copy those files "
                                f"from {source} into it (see docs/reward_judges.md)")


def _check_hf(folder: Path, model_type: str, kind: str) -> dict:
    pickles = _pickles(folder)
    safe, _ = weight_files(folder)
    if pickles and not safe:
        raise RewardFolderError(_pickle_message(pickles[0], kind))
    if not (folder / "config.json").is_file():
        raise RewardFolderError(f"{kind} folder {str(folder)!r} has no config.json (expected a transformers "
                                f"{model_type.upper()} folder; see docs/reward_judges.md)")
    got = _read_json(folder / "config.json").get("model_type")
    if got != model_type:
        raise RewardFolderError(f"{kind} folder {str(folder)!r} holds a {got!r} model, but {kind} needs a "
                                f"{model_type!r} (transformers) model: wrong architecture for this reward")
    config = check_model_folder(folder, allowed_model_types=(model_type,), what=kind)
    _check_processor_files(folder, kind, text=kind != AESTHETIC)
    return config


def check_reward_folder(folder) -> str:
    """The kind of reward folder ``folder`` after the checks :func:`load_reward_model` makes before it reads
    any weights (folder, marker, architecture, pickles, remote code, tokenizer / processor files)."""
    folder = Path(folder)
    kind, fmt = detect_kind(folder)
    if fmt == OPEN_CLIP:
        if not (folder / OPEN_CLIP_WEIGHTS).is_file():
            raise RewardFolderError(f"HPS v2.1 folder {str(folder)!r} has no {OPEN_CLIP_WEIGHTS}")
    else:
        _check_hf(folder, "blip" if kind == IMAGEREWARD else "clip", kind)
    return kind


# --------------------------------------------------------------------------- the model


class RewardModel(nn.Module):
    """A frozen reward model: backbone (+ head), tokenizer and the image preprocessing of its kind.

    ``score(images, prompts)`` maps IMAGE (N, H, W, C) in [0, 1] and N prompts to (N,) rewards and is
    differentiable with respect to the images.
    """

    def __init__(self, kind: str, backbone: nn.Module, tokenizer, *, head: Optional[LinearHead] = None,
                 size: int = 224, crop: int = 224, mean=CLIP_MEAN, std=CLIP_STD, fmt: str = TRANSFORMERS,
                 folder: Optional[Path] = None):
        super().__init__()
        if kind not in REWARD_KINDS:
            raise ValueError(f"reward kind must be one of {REWARD_KINDS}, got {kind!r}")
        self.kind, self.format, self.folder = kind, fmt, folder
        self.backbone, self.head, self.tokenizer = backbone, head, tokenizer
        self.size, self.crop, self.mean, self.std = int(size), int(crop), tuple(mean), tuple(std)

    @property
    def needs_prompt(self) -> bool:
        return NEEDS_PROMPT[self.kind]

    def _param(self):
        return next(self.backbone.parameters())

    # ---- embeddings ------------------------------------------------------------------------------
    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        p = self._param()
        x = images[..., :3].permute(0, 3, 1, 2).to(p.device, torch.float32)
        return preprocess(x, self.size, self.crop, self.mean, self.std).to(p.dtype)

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unit CLIP image embeddings f̂ (PickScore, HPS, aesthetic)."""
        if self.format == OPEN_CLIP:
            f = self.backbone.encode_image(pixel_values)
        elif hasattr(self.backbone, "get_image_features"):
            f = self.backbone.get_image_features(pixel_values=pixel_values)
            f = getattr(f, "pooler_output", f)
        else:  # CLIPVisionModelWithProjection (the aesthetic predictor needs no text tower)
            f = self.backbone(pixel_values=pixel_values).image_embeds
        return F.normalize(f.float(), dim=-1)

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit CLIP text embeddings ĝ (PickScore, HPS)."""
        device = self._param().device
        if self.format == OPEN_CLIP:
            g = self.backbone.encode_text(self.tokenizer(list(prompts)).to(device))
        else:
            max_length = self.backbone.config.text_config.max_position_embeddings
            tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=min(77, max_length),
                                    return_tensors="pt")
            g = self.backbone.get_text_features(**{k: v.to(device) for k, v in tokens.items()})
            g = getattr(g, "pooler_output", g)
        return F.normalize(g.float(), dim=-1)

    def imagereward_features(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """h_[CLS] of BLIP's text encoder over the prompt with the image tokens as cross-attention context."""
        device = self._param().device
        image = self.backbone.vision_model(pixel_values=pixel_values)[0]
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=IMAGEREWARD_MAX_TOKENS, return_tensors="pt")
        out = self.backbone.text_encoder(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device),
            encoder_hidden_states=image,
            encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long, device=device))
        return out[0][:, 0, :].float()

    # ---- scores ----------------------------------------------------------------------------------
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if images.ndim != 4 or images.shape[-1] not in (3, 4):
            raise ValueError(f"images must be an IMAGE batch (N, H, W, C) with C = 3 or 4, got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        pixel_values = self.pixels(images)
        if self.kind == IMAGEREWARD:
            h = self.imagereward_features(pixel_values, prompts)
            return ((self.head(h.to(self.head.layers[0].weight.dtype)).float()[:, 0] - IMAGEREWARD_MEAN)
                    / IMAGEREWARD_STD)
        f = self.image_embeds(pixel_values)
        if self.kind == AESTHETIC:
            return self.head(f.to(self.head.layers[0].weight.dtype)).float()[:, 0]
        g = self.text_embeds(prompts)
        scale = self.backbone.logit_scale.exp().float() if self.kind == PICKSCORE else HPS_SCALE
        return scale * (f * g).sum(-1)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _clip_image_settings(processor) -> dict:
    from .vlm_families import mean_std, size_value

    ip = processor.image_processor if hasattr(processor, "image_processor") else processor
    size = size_value(ip.size, "shortest_edge") or size_value(ip.size, "height")
    crop = size_value(ip.crop_size, "height", size) if getattr(ip, "do_center_crop", True) else size
    mean, std = mean_std(ip)
    return dict(size=size, crop=crop, mean=mean, std=std)


def load_reward_model(folder, *, dtype="auto", device="cpu") -> RewardModel:
    """Load a reward folder (see the module docstring), frozen, after the safety checks (no pickles, no
    remote code, the architecture its kind needs).

    Built outside inference mode (ComfyUI runs nodes under ``torch.inference_mode``): weights created there
    are inference tensors, which autograd cannot save, and the judge must stay differentiable (trainers)."""
    with torch.inference_mode(False):
        return _load_reward_model(Path(folder), dtype, device)


def _load_reward_model(folder: Path, dtype, device) -> RewardModel:
    from transformers import AutoProcessor, AutoTokenizer

    kind, fmt = detect_kind(folder)
    if fmt == OPEN_CLIP:
        model = _load_open_clip(folder)
        return freeze(model).to(device)
    model_type = "blip" if kind == IMAGEREWARD else "clip"
    config = _check_hf(folder, model_type, kind)
    torch_dtype = resolve_dtype(dtype, config)
    common = dict(dtype=torch_dtype, local_files_only=True, use_safetensors=True)
    head = None
    if kind == IMAGEREWARD:
        from transformers import BlipForImageTextRetrieval

        head, _ = _load_head(folder / IMAGEREWARD_HEAD, "ImageReward")
        backbone = BlipForImageTextRetrieval.from_pretrained(folder, **common)
        width = backbone.config.text_config.hidden_size
        if head.in_features != width:
            raise RewardFolderError(f"ImageReward head expects {head.in_features}-d text features but the BLIP text "
                                    f"encoder in {str(folder)!r} gives {width}-d: head and model do not match")
        size = backbone.config.vision_config.image_size
        model = RewardModel(kind, backbone, AutoTokenizer.from_pretrained(folder, local_files_only=True), head=head,
                            size=size, crop=size, folder=folder)
    else:
        if kind == AESTHETIC:
            from transformers import CLIPVisionModelWithProjection as cls

            head, _ = _load_head(folder / AESTHETIC_HEAD, "aesthetic predictor")
        else:
            from transformers import CLIPModel as cls
        if kind == AESTHETIC:  # vision tower only; its config carries the joint model's projection size
            from transformers import CLIPConfig

            joint = CLIPConfig.from_pretrained(folder, local_files_only=True)
            vision = joint.vision_config
            vision.projection_dim = joint.projection_dim
            backbone = cls.from_pretrained(folder, config=vision, **common)
        else:
            backbone = cls.from_pretrained(folder, **common)
        dim = backbone.config.projection_dim
        if head is not None and head.in_features != dim:
            raise RewardFolderError(
                f"aesthetic head expects {head.in_features}-d CLIP image embeddings (CLIP ViT-L/14: 768) but the CLIP "
                f"in {str(folder)!r} gives {dim}-d: use the CLIP the predictor was trained on")
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        tokenizer = getattr(processor, "tokenizer", None)
        model = RewardModel(kind, backbone, tokenizer, head=head, folder=folder, **_clip_image_settings(processor))
    if head is not None:
        head.to(torch_dtype)
    return freeze(model).to(device)


def _import_open_clip():
    require_extra("hps", "This HPS v2.1 folder is in open_clip format, which", error=RewardFolderError,
                  hint="or convert the checkpoint to transformers format (convert-reward hpsv2 --base <CLIP-H folder>)")
    import open_clip

    return open_clip


def _load_open_clip(folder: Path) -> RewardModel:
    from safetensors.torch import load_file

    open_clip = _import_open_clip()
    info = _read_json(folder / MARKER) if (folder / MARKER).is_file() else {}
    arch = info.get("arch", "ViT-H-14")
    weights = folder / OPEN_CLIP_WEIGHTS
    if not weights.is_file():
        raise RewardFolderError(f"HPS v2.1 folder {str(folder)!r} has no {OPEN_CLIP_WEIGHTS}")
    model = open_clip.create_model(arch, pretrained=None)
    model.load_state_dict(load_file(str(weights)))
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return RewardModel(HPS, model, open_clip.get_tokenizer(arch), size=size, crop=size, fmt=OPEN_CLIP, folder=folder)


# --------------------------------------------------------------------------- the judge


class RewardJudge:
    """A reward model with its prompt as a judge; ``__call__`` maps IMAGE (N, H, W, C) to (N,) rewards.

    ``before_call`` runs before every use (the node layer loads the model onto the GPU there);
    ``batch_size`` images go through the model at a time.
    """

    def __init__(self, model: RewardModel, prompt: str = "", *, batch_size: int = 8,
                 before_call: Optional[Callable[[], None]] = None):
        prompt = str(prompt).strip()
        if model.needs_prompt and not prompt:
            raise ValueError(f"{model.kind} scores how well an image matches a prompt: write the prompt")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.prompt, self.batch_size, self.before_call = model, prompt, int(batch_size), before_call

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.before_call is not None:
            self.before_call()
        chunks = [self.model.score(images[s:s + self.batch_size], [self.prompt] * images[s:s + self.batch_size].shape[0])
                  for s in range(0, images.shape[0], self.batch_size)]
        return torch.cat(chunks).to(images.device)

    def expert(self, weight: float = 1.0, name: Optional[str] = None) -> DiscriminativeExpert:
        info = {"kind": self.model.kind, "format": self.model.format, "prompt": self.prompt,
                "folder": str(self.model.folder) if self.model.folder else None}
        return DiscriminativeExpert(self, weight=weight, space=PIXEL, differentiable=True,
                                    name=name or self.model.kind, info=info)


# --------------------------------------------------------------------------- open_clip layout


def open_clip_to_hf(sd: dict) -> dict:
    """An open_clip ViT state dict (visual.*, transformer.*, token_embedding, …) renamed to transformers'
    CLIPModel keys; fused attention in_proj weights are split into q / k / v, projections transposed."""
    out = {}
    tower_maps = (("visual.transformer.resblocks.", "vision_model.encoder.layers."),
                  ("transformer.resblocks.", "text_model.encoder.layers."))
    simple = {
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight", "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale",
    }
    block = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for key, value in sd.items():
        if key in simple:
            out[simple[key]] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.T.contiguous()
        elif key == "text_projection":
            out["text_projection.weight"] = value.T.contiguous()
        elif key == "attn_mask" or key.endswith(".attn_mask"):
            continue
        else:
            for src, dst in tower_maps:
                if key.startswith(src):
                    layer, rest = key[len(src):].split(".", 1)
                    prefix = f"{dst}{layer}."
                    if rest.startswith("attn.in_proj_"):
                        param = rest.rsplit("_", 1)[1]  # weight / bias
                        for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                            out[f"{prefix}self_attn.{name}_proj.{param}"] = part.contiguous()
                    else:
                        module, param = rest.rsplit(".", 1)
                        if module not in block:
                            raise RewardFolderError(f"open_clip key {key!r} is not part of a CLIP ViT")
                        out[f"{prefix}{block[module]}.{param}"] = value
                    break
            else:
                raise RewardFolderError(f"open_clip key {key!r} is not part of a CLIP ViT (wrong checkpoint?)")
    return out


def _mha(x, w_in, b_in, w_out, b_out, heads, mask=None):
    n, t, d = x.shape
    q, k, v = (x @ w_in.T + b_in).chunk(3, dim=-1)
    q, k, v = (z.reshape(n, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
    att = q @ k.transpose(-1, -2) / (d // heads) ** 0.5
    if mask is not None:
        att = att + mask
    return (att.softmax(-1) @ v).transpose(1, 2).reshape(n, t, d) @ w_out.T + b_out


def _resblocks(x, sd, prefix, heads, mask=None):
    i = 0
    while f"{prefix}{i}.ln_1.weight" in sd:
        p = lambda name: sd[f"{prefix}{i}.{name}"]  # noqa: E731
        h = F.layer_norm(x, x.shape[-1:], p("ln_1.weight"), p("ln_1.bias"))
        x = x + _mha(h, p("attn.in_proj_weight"), p("attn.in_proj_bias"), p("attn.out_proj.weight"),
                     p("attn.out_proj.bias"), heads, mask)
        h = F.layer_norm(x, x.shape[-1:], p("ln_2.weight"), p("ln_2.bias"))
        x = x + F.gelu(h @ p("mlp.c_fc.weight").T + p("mlp.c_fc.bias")) @ p("mlp.c_proj.weight").T + p("mlp.c_proj.bias")
        i += 1
    return x


def open_clip_reference_embeds(sd: dict, pixel_values: torch.Tensor, input_ids: torch.Tensor, pool_at: torch.Tensor,
                               vision_heads: int, text_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(f̂, ĝ) computed straight from an open_clip ViT state dict (its VisionTransformer / TextTransformer:
    pre-LN residual blocks, exact GELU, class token, ln_post → proj; causal text, ln_final at the
    end-of-text position ``pool_at`` → text_projection). Reference for the converter's score check."""
    sd = {k: v.float() for k, v in sd.items()}
    x = F.conv2d(pixel_values.float(), sd["visual.conv1.weight"], stride=sd["visual.conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, x.shape[-1:], sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = _resblocks(x, sd, "visual.transformer.resblocks.", vision_heads)
    f = F.layer_norm(x[:, 0], x.shape[-1:], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]
    t = sd["token_embedding.weight"][input_ids] + sd["positional_embedding"][: input_ids.shape[1]]
    length = input_ids.shape[1]
    causal = torch.full((length, length), float("-inf")).triu(1)
    t = _resblocks(t, sd, "transformer.resblocks.", text_heads, causal)
    t = F.layer_norm(t, t.shape[-1:], sd["ln_final.weight"], sd["ln_final.bias"])
    g = t[torch.arange(t.shape[0]), pool_at] @ sd["text_projection"]
    return F.normalize(f, dim=-1), F.normalize(g, dim=-1)


# --------------------------------------------------------------------------- BLIP (ImageReward) layout


_BLIP_VISION = (
    (r"^cls_token$", "embeddings.class_embedding"), (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."), (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."), (r"^norm\.", "post_layernorm."),
)
# parts of the official checkpoint ImageReward's score never uses
_BLIP_UNUSED = ("text_decoder.", "vision_proj", "text_proj", "itm_head", "temp", "image_queue", "text_queue",
                "idx_queue", "ptr_queue", "visual_encoder_m.", "text_encoder_m.", "vision_proj_m", "text_proj_m")


def imagereward_to_hf(sd: dict) -> tuple[dict, dict, list[str]]:
    """ImageReward.pt state dict → (transformers BlipForImageTextRetrieval weights, head weights, skipped keys).

    Official layout: ``blip.visual_encoder.*`` (BLIP's timm-style ViT), ``blip.text_encoder.*`` (BERT names,
    identical in transformers' BlipTextModel), ``mlp.layers.*`` (the head)."""
    model, head, skipped = {}, {}, []
    for key, value in sd.items():
        if key.startswith("mlp."):
            head[key[len("mlp."):]] = value
            continue
        k = key[len("blip."):] if key.startswith("blip.") else key
        if k.startswith("visual_encoder."):
            rest = k[len("visual_encoder."):]
            for pattern, repl in _BLIP_VISION:
                if re.search(pattern, rest):
                    model["vision_model." + re.sub(pattern, repl, rest)] = value
                    break
            else:
                raise RewardFolderError(f"ImageReward key {key!r} is not part of BLIP's vision encoder (wrong checkpoint?)")
        elif k.startswith("text_encoder."):
            if not k.endswith("position_ids"):
                model[k] = value
        elif k.startswith(_BLIP_UNUSED):
            skipped.append(key)
        else:
            raise RewardFolderError(f"ImageReward key {key!r} is not part of ImageReward (wrong checkpoint?)")
    if not head:
        raise RewardFolderError("the checkpoint has no 'mlp.layers.*' head: not an ImageReward checkpoint")
    return model, head, skipped


# --------------------------------------------------------------------------- converter


def load_pickle_state_dict(path, *, allow_pickle: bool = False) -> dict:
    """Tensors of a pickle checkpoint, only with ``allow_pickle``; torch's restricted ``weights_only``
    unpickler is used (plain tensors and containers, no arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise RewardFolderError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if not allow_pickle:
        raise RewardFolderError(f"{path} is a pickle checkpoint; pickles can run arbitrary code when loaded, so they "
                                "are refused. Add --allow-pickle (allow_pickle=True) to convert it once, only if you "
                                "trust the source")
    warnings.warn(f"loading pickle checkpoint {path} (allow_pickle): only do this for files from a source you trust",
                  stacklevel=2)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means: not a plain tensor checkpoint
        raise RewardFolderError(f"{path} is not a plain tensor checkpoint torch can load safely ({exc})") from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise RewardFolderError(f"{path} does not hold a state dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _copy_base(base: Path, out: Path, weights: bool) -> None:
    """Config, tokenizer and processor files of a transformers folder (and its safetensors when ``weights``)."""
    out.mkdir(parents=True, exist_ok=True)
    for p in base.iterdir():
        if not p.is_file() or p.suffix in PICKLE_SUFFIXES or p.name == MARKER:
            continue
        if p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json"):
            if not weights:
                continue
        shutil.copy2(p, out / p.name)


def _write_marker(out: Path, **info) -> None:
    from ..fileio import atomic_write_text

    atomic_write_text(out / MARKER, json.dumps(info, indent=2) + "\n")


def _save_head(out: Path, name: str, head_sd: dict, **metadata) -> None:
    from ..fileio import atomic_save_safetensors

    atomic_save_safetensors(out / name, head_sd, metadata={k: str(v) for k, v in metadata.items()})


def _check_images(n: int = 3, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, size, size, 3, generator=torch.Generator().manual_seed(seed))


CHECK_PROMPTS = ("a photo of a cat", "an oil painting of a city at night", "a red car")


@dataclass
class ConversionResult:
    folder: Path
    kind: str
    max_abs_error: float
    scores: list
    skipped: list

    def summary(self) -> str:
        return (f"{self.kind} → {self.folder}: converted scores match the original's on {len(self.scores)} inputs "
                f"(max |Δ| {self.max_abs_error:.2e})" + (f"; ignored unused keys: {len(self.skipped)}" if self.skipped else ""))


def _compare(kind: str, got: torch.Tensor, want: torch.Tensor, tolerance: float, out: Path, skipped) -> ConversionResult:
    err = float((got - want).abs().max())
    scale = max(1.0, float(want.abs().max()))
    if not err <= tolerance * scale:
        raise RewardFolderError(f"conversion check failed: the converted {kind} folder {out} scores {got.tolist()} "
                                f"but the original scores {want.tolist()} (max |Δ| {err:.3g}); the folder is not usable")
    return ConversionResult(out, kind, err, got.tolist(), list(skipped))


def convert_reward(kind: str, source, out, *, base=None, allow_pickle: bool = False, fmt: str = TRANSFORMERS,
                   tolerance: float = 1e-4, arch: str = "ViT-H-14") -> ConversionResult:
    """Turn an official reward checkpoint into a safetensors reward folder ``out`` and check that the
    converted folder reproduces the original's scores on a few random images / prompts.

    kind / source / base:
    * pickscore: source = a transformers CLIP folder with pickle weights (pytorch_model.bin);
    * hpsv2: source = HPS_v2.1_compressed.pt (open_clip ViT-H-14); ``fmt`` "transformers" needs ``base``, a
      transformers CLIP-H folder for config, tokenizer and processor (laion/CLIP-ViT-H-14-laion2B-s32B-b79K or
      PickScore_v1); "open_clip" writes open_clip_model.safetensors for open_clip architecture ``arch``
      (needs open_clip at use time);
      reference: :func:`open_clip_reference_embeds` on the original tensors;
    * imagereward: source = ImageReward.pt, base = a transformers BLIP ITM folder for config and tokenizer
      (Salesforce/blip-itm-large-coco; its weights are not used; the image size is read from the checkpoint);
    * aesthetic: source = sac+logos+ava1-l14-linearMSE.pth, base = the CLIP ViT-L/14 transformers folder
      (openai/clip-vit-large-patch14), copied into ``out``; reference: the MLP computed from the original tensors.
    Nothing is left in ``out`` when a step fails.
    """
    if kind not in REWARD_KINDS:
        raise ValueError(f"kind must be one of {REWARD_KINDS}, got {kind!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RewardFolderError(f"output folder {str(out)!r} exists and is not empty; choose a new folder")
    base = Path(base) if base is not None else None
    if base is not None and not (base / "config.json").is_file():
        raise RewardFolderError(f"--base {str(base)!r} is not a transformers model folder (no config.json)")
    tmp = out.with_name(f".{out.name}.converting")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        result = _convert(kind, Path(source), tmp, base, allow_pickle, fmt, tolerance, arch)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.folder = out
    return result


def _convert(kind, source, out, base, allow_pickle, fmt, tolerance, arch) -> ConversionResult:
    import transformers as T
    from safetensors.torch import save_file

    images = _check_images()
    prompts = list(CHECK_PROMPTS)
    if kind == PICKSCORE:
        if not source.is_dir():
            raise RewardFolderError("pickscore: --source must be the transformers CLIP folder with the pickle weights")
        if not allow_pickle:
            raise RewardFolderError(_pickle_message(source / "pytorch_model.bin", kind))
        warnings.warn(f"loading pickle weights from {source} (allow_pickle)", stacklevel=3)
        original = freeze(T.CLIPModel.from_pretrained(source, local_files_only=True, use_safetensors=False))
        _copy_base(source, out, weights=False)
        original.save_pretrained(out, safe_serialization=True)
        processor = T.AutoProcessor.from_pretrained(source, local_files_only=True)
        want = RewardModel(PICKSCORE, original, processor.tokenizer, **_clip_image_settings(processor)).score(images, prompts)
        _write_marker(out, kind=PICKSCORE, source=source.name)
        return _compare(kind, load_reward_model(out, dtype="float32").score(images, prompts), want, tolerance, out, [])

    sd = load_pickle_state_dict(source, allow_pickle=allow_pickle)
    if kind == AESTHETIC:
        head_sd = {k[len("mlp."):] if k.startswith("mlp.") else k: v for k, v in sd.items()}
        LinearHead.from_state_dict(head_sd, f"{source.name}")
        if base is None:
            raise RewardFolderError("aesthetic: --base must be the CLIP ViT-L/14 transformers folder "
                                    "(openai/clip-vit-large-patch14) the predictor was trained on")
        _check_hf(base, "clip", kind)
        _copy_base(base, out, weights=True)
        _save_head(out, AESTHETIC_HEAD, head_sd, source=source.name)
        _write_marker(out, kind=AESTHETIC, source=source.name)
        model = load_reward_model(out, dtype="float32")
        with torch.no_grad():
            f = model.image_embeds(model.pixels(images))
            want = f
            for i in (0, 2, 4, 6, 7):  # the MLP straight from the original tensors
                want = want @ head_sd[f"layers.{i}.weight"].float().T + head_sd[f"layers.{i}.bias"].float()
            return _compare(kind, model.score(images, prompts), want[:, 0], tolerance, out, [])

    if kind == IMAGEREWARD:
        model_sd, head_sd, skipped = imagereward_to_hf(sd)
        if base is None:
            raise RewardFolderError("imagereward: --base must be a transformers BLIP folder (Salesforce/blip-itm-large-coco) "
                                    "for the config and tokenizer")
        config = T.BlipConfig.from_pretrained(base, local_files_only=True)
        patch = model_sd["vision_model.embeddings.patch_embedding.weight"].shape[-1]
        tokens = model_sd["vision_model.embeddings.position_embedding"].shape[1] - 1
        config.vision_config.image_size = int(round(tokens ** 0.5)) * patch
        backbone = T.BlipForImageTextRetrieval(config).eval()
        missing, unexpected = backbone.load_state_dict(model_sd, strict=False)
        missing = [k for k in missing if not k.startswith(("vision_proj", "text_proj", "itm_head"))
                   and not k.endswith("position_ids")]
        if missing or unexpected:
            raise RewardFolderError(f"ImageReward checkpoint does not fit the BLIP config of --base: missing "
                                    f"{missing[:4]}, unexpected {unexpected[:4]} (wrong --base?)")
        _copy_base(base, out, weights=False)
        backbone.save_pretrained(out, safe_serialization=True)
        _save_head(out, IMAGEREWARD_HEAD, head_sd, source=source.name, mean=IMAGEREWARD_MEAN, std=IMAGEREWARD_STD)
        _write_marker(out, kind=IMAGEREWARD, source=source.name)
        # reference: the original tensors loaded into a fresh model (the file round trip and the head)
        tokenizer = T.AutoTokenizer.from_pretrained(base, local_files_only=True)
        size = config.vision_config.image_size
        ref = RewardModel(IMAGEREWARD, freeze(backbone), tokenizer, head=freeze(LinearHead.from_state_dict(head_sd)),
                          size=size, crop=size)
        with torch.no_grad():
            want = ref.score(images, prompts)
            return _compare(kind, load_reward_model(out, dtype="float32").score(images, prompts), want, tolerance, out,
                            skipped)

    # HPS v2.1 (open_clip ViT-H-14)
    sd = {k: v for k, v in sd.items() if k != "attn_mask"}
    if fmt == OPEN_CLIP:
        open_clip = _import_open_clip()
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out / OPEN_CLIP_WEIGHTS))
        _write_marker(out, kind=HPS, format=OPEN_CLIP, arch=arch, source=source.name)
        model = load_reward_model(out)
        tokens = open_clip.get_tokenizer(arch)(prompts)
        heads_v, heads_t = model.backbone.visual.transformer.resblocks[0].attn.num_heads, \
            model.backbone.transformer.resblocks[0].attn.num_heads
        with torch.no_grad():
            f, g = open_clip_reference_embeds(sd, model.pixels(images), tokens, tokens.argmax(-1), heads_v, heads_t)
            return _compare(kind, model.score(images, prompts), HPS_SCALE * (f * g).sum(-1), tolerance, out, [])
    if base is None:
        raise RewardFolderError("hpsv2: --base must be a transformers CLIP ViT-H/14 folder (config, tokenizer, processor: "
                                "laion/CLIP-ViT-H-14-laion2B-s32B-b79K or PickScore_v1), or use --format open_clip")
    _check_hf(base, "clip", kind)
    config = T.CLIPConfig.from_pretrained(base, local_files_only=True)
    backbone = T.CLIPModel(config).eval()
    missing, unexpected = backbone.load_state_dict(open_clip_to_hf(sd), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RewardFolderError(f"HPS checkpoint does not fit the CLIP config of --base: missing {missing[:4]}, "
                                f"unexpected {unexpected[:4]} (wrong --base?)")
    _copy_base(base, out, weights=False)
    backbone.save_pretrained(out, safe_serialization=True)
    _write_marker(out, kind=HPS, source=source.name)
    model = load_reward_model(out, dtype="float32")
    tokens = model.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    ids = tokens["input_ids"]
    eos = config.text_config.eos_token_id
    pool_at = ids.argmax(-1) if eos == 2 else (ids == eos).int().argmax(-1)
    with torch.no_grad():
        f, g = open_clip_reference_embeds(sd, model.pixels(images), ids, pool_at,
                                          config.vision_config.num_attention_heads, config.text_config.num_attention_heads)
        return _compare(kind, model.score(images, prompts), HPS_SCALE * (f * g).sum(-1), tolerance, out, [])
