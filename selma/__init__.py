"""SELMA (Li et al., NeurIPS 2024): skill-specific prompts from a local LLM, self-generated image datasets,
and per-skill LoRAs merged into one model.

Engine code: plain torch + transformers, no ComfyUI imports (the nodes live in ``nodes/selma.py``).
"""
from .presets import SkillPreset, list_presets, load_preset
from .rouge import RougePool, deduplicate, lcs_length, rouge_l, tokenize

__all__ = ["RougePool", "SkillPreset", "deduplicate", "lcs_length", "list_presets", "load_preset", "rouge_l",
           "tokenize"]
