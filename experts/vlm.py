"""Loading local vision-language models (VLMs) safely: folder checks, family detection, frozen weights.

Engine code (plain torch + transformers, no ComfyUI). A model folder is what ``save_pretrained``
writes: ``config.json``, ``*.safetensors`` weights, tokenizer and processor files. The loader refuses
pickle-only weights and remote code unless the caller opts in, detects the family from
``config.model_type`` and returns a :class:`VLMBundle` whose model is frozen (no parameter gradients)
but still differentiable with respect to its pixel inputs.
"""
from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .vlm_families import FAMILIES, FamilySpec, family_for_model_type

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Files whose "auto_map" entry points transformers at Python code shipped inside the folder.
REMOTE_CODE_CONFIGS = (
    "config.json", "processor_config.json", "preprocessor_config.json", "tokenizer_config.json",
    "image_processor_config.json",
)


class VLMFolderError(ValueError):
    """A model folder that cannot or must not be loaded (missing, unsafe, unsupported)."""


def supported_model_types() -> list[str]:
    return sorted(t for spec in FAMILIES.values() for t in spec.model_types)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise VLMFolderError(f"{path} is not valid JSON ({exc}); the model folder looks damaged") from exc


def weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickle files) at the top of a model folder."""
    files = [p for p in folder.iterdir() if p.is_file()]
    safe = sorted(p for p in files if p.suffix == ".safetensors")
    pickles = sorted(p for p in files if p.suffix in PICKLE_SUFFIXES and p.name != "training_args.bin")
    return safe, pickles


def remote_code_entries(folder: Path) -> list[str]:
    """Names of the config files in ``folder`` that ask for remote code (an ``auto_map`` entry)."""
    found = []
    for name in REMOTE_CODE_CONFIGS:
        path = folder / name
        if path.is_file():
            data = _read_json(path)
            nested = [data] + [v for v in data.values() if isinstance(v, dict)]
            if any("auto_map" in d for d in nested):
                found.append(name)
    return found


def check_model_folder(folder, *, allow_pickle: bool = False, trust_remote_code: bool = False,
                       allowed_model_types=None, what: str = "VLM") -> dict:
    """Validate a local model folder before anything in it is executed or unpickled; returns config.json.

    Refuses: a missing folder or config, pickle-only weights (``.bin/.pt/.pth/.ckpt``) unless
    ``allow_pickle``, configs with ``auto_map`` (custom Python code) unless ``trust_remote_code``, and
    model types outside ``allowed_model_types`` (default: every supported VLM family).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise VLMFolderError(f"{what} model folder {str(folder)!r} does not exist or is not a folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise VLMFolderError(
            f"{what} model folder {str(folder)!r} has no config.json; put the whole Hugging Face model folder "
            "(config.json, *.safetensors, tokenizer and processor files) there"
        )
    config = _read_json(config_path)
    safe, pickles = weight_files(folder)
    if not safe:
        if not pickles:
            raise VLMFolderError(f"{what} model folder {str(folder)!r} has no weights (*.safetensors)")
        if not allow_pickle:
            names = ", ".join(p.name for p in pickles[:4])
            raise VLMFolderError(
                f"{what} model folder {str(folder)!r} only has pickle weights ({names}); pickles can run arbitrary "
                "code when loaded. Use a safetensors copy of the model, or switch on allow_pickle if you trust "
                "the source"
            )
    remote = remote_code_entries(folder)
    if remote and not trust_remote_code:
        raise VLMFolderError(
            f"{what} model folder {str(folder)!r} asks to run custom Python code (auto_map in {', '.join(remote)}); "
            "this is refused by default. Switch on trust_remote_code only if you trust the source"
        )
    model_type = config.get("model_type")
    allowed = supported_model_types() if allowed_model_types is None else sorted(allowed_model_types)
    if model_type not in allowed:
        raise VLMFolderError(
            f"{what} model folder {str(folder)!r} has model_type {model_type!r}, which is not supported; "
            f"supported model types: {', '.join(allowed)}"
        )
    return config


# Constructor parameters that are sub-processors, not options read from processor_config.json.
SUB_PROCESSOR_PARAMS = ("image_processor", "tokenizer", "video_processor", "feature_extractor")


@functools.lru_cache(maxsize=None)
def processor_class_without_video(processor_cls):
    """The processor class itself, or, if it owns a video sub-processor, a subclass that has none.

    Qwen-VL, SmolVLM and LLaVA-OneVision processors own a video processor, which needs torchvision and its
    own config file; a judge never sees video. The subclass declares its sub-processors the two ways
    transformers reads them — the ``attributes`` list (4.x) and the modality parameters of ``__init__``
    (5.x, ``ProcessorMixin.get_attributes``) — as the image processor and tokenizer alone, and passes
    ``video_processor=None`` to the family's own constructor, which keeps every other family option.
    Nothing else is overridden: it is built through its public constructor (:func:`load_processor`).
    """
    signature = inspect.signature(processor_cls.__init__)
    if "video_processor" not in signature.parameters:
        return processor_cls
    # transformers reads both the sub-processors and the options it saves from this signature.
    image_only = signature.replace(parameters=[p for n, p in signature.parameters.items() if n != "video_processor"])

    class ImageOnlyProcessor(processor_cls):
        if isinstance(getattr(processor_cls, "attributes", None), list):  # transformers 4.x
            attributes = [a for a in processor_cls.attributes if "video" not in a]

        def __init__(self, *args, **kwargs):
            bound = image_only.bind(self, *args, **kwargs)
            options = {n: v for n, v in bound.arguments.items() if n != "self"}
            options.update(options.pop(next((n for n, p in image_only.parameters.items()
                                             if p.kind is p.VAR_KEYWORD), "_"), {}))
            super().__init__(video_processor=None, **options)

        __init__.__signature__ = image_only

    ImageOnlyProcessor.__name__ = processor_cls.__name__
    ImageOnlyProcessor.__qualname__ = processor_cls.__qualname__
    return ImageOnlyProcessor


def processor_class(folder: Path, model_type: str):
    """The transformers processor class named by the folder (or registered for its model type)."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = None
    for file in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = folder / file
        if path.is_file():
            name = _read_json(path).get("processor_class")
            if name:
                break
    name = name or PROCESSOR_MAPPING_NAMES.get(model_type)
    try:
        cls = getattr(transformers, name, None) if name else None
    except ImportError as exc:  # transformers 4.x imports SmolVLM's processor only with torchvision
        raise VLMFolderError(
            f"the {name} processor of model folder {str(folder)!r} cannot be imported with transformers "
            f"{transformers.__version__}: {exc}. Install torchvision (ComfyUI has it) or transformers>=5"
        ) from exc
    if cls is None:
        raise VLMFolderError(f"no processor class found for model folder {str(folder)!r} (model_type {model_type!r})")
    return cls


def load_processor(folder: Path, model_type: str, *, trust_remote_code: bool = False):
    """The folder's processor, built from its parts through public transformers API only.

    The image processor and tokenizer come from ``AutoImageProcessor`` / ``AutoTokenizer``; the family's
    options (image token counts, chat template, ...) from ``get_processor_dict``; then the processor's own
    constructor runs. ``ProcessorMixin.from_pretrained`` is not used: it would also load the video
    sub-processor, and its internals differ between transformers 4.x and 5.x.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    cls = processor_class(folder, model_type)
    common = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    options, _ = cls.get_processor_dict(str(folder), **common)
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in options.items() if k not in SUB_PROCESSOR_PARAMS
              and (k in params or (k == "chat_template" and takes_any))}
    return processor_class_without_video(cls)(
        image_processor=AutoImageProcessor.from_pretrained(folder, **common),
        tokenizer=AutoTokenizer.from_pretrained(folder, **common), **kwargs)


def resolve_dtype(dtype, config: dict) -> torch.dtype:
    """'auto' → the dtype the weights were saved in (config 'dtype'/'torch_dtype'), else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        saved = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
        return DTYPES.get(saved, torch.float32)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


@dataclass
class VLMBundle:
    """A loaded, frozen VLM with its processor, tokenizer and family (pixel layout + prompt rules)."""

    model: Any
    processor: Any
    family: FamilySpec
    model_type: str
    folder: Path
    config: dict

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_processor(self):
        return self.processor.image_processor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no parameter gradients: the judge is frozen, gradients only reach its inputs."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_vlm(folder, *, dtype="auto", device="cpu", allow_pickle: bool = False,
             trust_remote_code: bool = False) -> VLMBundle:
    """Load a local image-text-to-text model folder of a supported family (see vlm_families.FAMILIES)."""
    from transformers import AutoModelForImageTextToText

    folder = Path(folder)
    config = check_model_folder(folder, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    model_type = config["model_type"]
    family = family_for_model_type(model_type)
    torch_dtype = resolve_dtype(dtype, config)
    safe, _ = weight_files(folder)
    model = AutoModelForImageTextToText.from_pretrained(
        folder, dtype=torch_dtype, local_files_only=True, use_safetensors=bool(safe),
        trust_remote_code=trust_remote_code,
    )
    freeze(model).to(device)
    processor = load_processor(folder, model_type, trust_remote_code=trust_remote_code)
    return VLMBundle(model=model, processor=processor, family=family, model_type=model_type, folder=folder,
                     config=config)
