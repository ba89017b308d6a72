"""SELMA skill prompts: a local instruction LLM writes image descriptions for one skill, Self-Instruct style.

Li et al. 2024 ("SELMA", arXiv 2403.06952, §3.1) following Wang et al. 2023 ("Self-Instruct", §2.2):
each request shows the LLM the skill's description and rules plus 3 in-context examples drawn at random
from a growing pool (the seed examples and every prompt accepted so far), asks for more numbered
descriptions, parses the "N. caption" lines and keeps a caption only if it passes the skill's filters
and its highest ROUGE-L F1 against the whole pool is ≤ 0.8. This repeats until ``target`` prompts are
collected or ``max_attempts`` requests have been made.

The LLM is any ``generate(text) -> str`` callable. :class:`LLMGenerator` wraps a local transformers
causal LM (safetensors only and no remote code unless opted in, via ``experts.vlm.check_model_folder``)
and samples at temperature 1.0 with its own seeded ``torch.Generator``, so a run is reproducible.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..fileio import atomic_write_text
from ..experts.vlm import VLMFolderError, check_model_folder, freeze, resolve_dtype, weight_files
from .presets import SkillPreset
from .rouge import DEFAULT_THRESHOLD, RougePool

# --------------------------------------------------------------------------------------- parsing

_NUMBERED = re.compile(r"^\s*(\d{1,4})\s*[.)]\s*(.*\S)\s*$")
_LIST_MARKER = re.compile(r"^\s*(?:\d{1,4}\s*[.)]|[-*•])\s+")
NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30,
    "forty": 40, "fifty": 50, "hundred": 100, "thousand": 1000, "dozen": 12, "dozens": 24,
    "single": 1, "pair": 2, "couple": 2, "both": 2, "twin": 2, "twins": 2, "triple": 3, "trio": 3,
}
_WORD = re.compile(r"[a-z]+|\d+")


def strip_list_marker(line: str) -> str:
    return _LIST_MARKER.sub("", str(line)).strip()


def clean_caption(text: str) -> str:
    """One caption: surrounding quotes/markdown removed, whitespace collapsed."""
    text = " ".join(str(text).split())
    text = text.strip("*_`").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'“”":
        text = text[1:-1].strip()
    if text[:1] == "“" and text[-1:] == "”":
        text = text[1:-1].strip()
    return text


def parse_numbered(text: str) -> list[str]:
    """Captions from the "N. caption" (or "N) caption") lines of an LLM answer, in order."""
    found = []
    for line in str(text).splitlines():
        match = _NUMBERED.match(line)
        if match:
            caption = clean_caption(match.group(2))
            if caption:
                found.append(caption)
    return found


def mentioned_counts(text: str) -> list[int]:
    """Numbers a caption mentions (digits and number words such as 'three', 'pair', 'dozen')."""
    counts = []
    for word in _WORD.findall(str(text).lower()):
        if word.isdigit():
            counts.append(int(word))
        elif word in NUMBER_WORDS:
            counts.append(NUMBER_WORDS[word])
    return counts


def word_count(text: str) -> int:
    return len(str(text).split())


def rule_violation(caption: str, preset: SkillPreset) -> Optional[str]:
    """Why ``caption`` breaks the skill's filters (None if it passes): 'too_short', 'too_long'
    (SELMA: fewer than 30 / 50 words), 'count_too_large' (counting: ≤ 3), 'no_count'."""
    words = word_count(caption)
    if words < preset.min_words:
        return "too_short"
    if words >= preset.max_words:
        return "too_long"
    if not caption[:1].isalnum() and caption[:1] not in "\"'“":
        return "not_a_sentence"
    if preset.max_count is not None or preset.require_count:
        counts = mentioned_counts(caption)
        if preset.max_count is not None and any(c > preset.max_count for c in counts):
            return "count_too_large"
        if preset.require_count and not any(c >= 1 for c in counts):
            return "no_count"
    return None


# --------------------------------------------------------------------------------------- instruction

def build_instruction(preset: SkillPreset, examples: list[str], n_new: int) -> str:
    """The request text: skill, rules, numbered in-context examples, and the next number to continue from
    (ending with "k." so a plain completion model continues the list, an instruction model answers it)."""
    rules = [*preset.rules, f"Each description has fewer than {preset.max_words} words."]
    if preset.max_count is not None:
        rules.append(f"Never mention more than {preset.max_count} of anything.")
    rules.append("The descriptions must be diverse and different from the examples.")
    lines = [
        f"You are asked to come up with {n_new} more diverse image descriptions for a text-to-image model.",
        f"Skill: {preset.description}",
        "Requirements:",
        *[f"- {r}" for r in rules],
        f"Write them as a numbered list, one per line, continuing from {len(examples) + 1} to "
        f"{len(examples) + n_new}.",
        "",
        "List of image descriptions:",
        *[f"{i + 1}. {e}" for i, e in enumerate(examples)],
        f"{len(examples) + 1}.",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- self-instruct loop

@dataclass
class PromptRecord:
    prompt: str
    attempt: int
    rouge_max: float
    nearest: Optional[str]


@dataclass
class PromptRun:
    """Accepted prompts (in order) and why the other candidates were dropped."""

    skill: str
    seed: int
    records: list = field(default_factory=list)
    attempts: int = 0
    candidates: int = 0
    rejected: dict = field(default_factory=dict)

    @property
    def prompts(self) -> list[str]:
        return [r.prompt for r in self.records]

    def summary(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"
        return (f"skill {self.skill}: {len(self.records)} prompts from {self.candidates} candidates in "
                f"{self.attempts} LLM requests (seed {self.seed}); rejected: {reasons}")


def generate_skill_prompts(preset: SkillPreset, generate: Callable[[str], str], target: int, *, seed: int = 0,
                           threshold: float = DEFAULT_THRESHOLD, max_attempts: Optional[int] = None,
                           n_examples: int = 3, per_request: int = 20, completion_prefix: Optional[bool] = None,
                           progress: Optional[Callable[[int, int], None]] = None) -> PromptRun:
    """Self-instruct loop (see module docstring). ``generate`` gets the request text and returns the
    LLM's answer. For a plain completion model (``completion_prefix``; default: True when ``generate`` has
    ``uses_chat == False``, as an :class:`LLMGenerator` without chat template) the "k." the request ends with
    is put back in front of the answer so its first line parses too. ``max_attempts`` defaults to
    10 + 4·target requests."""
    if target < 1:
        raise ValueError(f"count must be ≥ 1, got {target}")
    preset.validate()
    if completion_prefix is None:
        completion_prefix = getattr(generate, "uses_chat", True) is False
    max_attempts = max_attempts if max_attempts is not None else 10 + 4 * target
    rng = random.Random(seed)
    pool = RougePool(threshold)
    for example in preset.examples:
        pool.add(example)
    run = PromptRun(skill=preset.name, seed=seed)
    while len(run.records) < target and run.attempts < max_attempts:
        run.attempts += 1
        shown = rng.sample(pool.texts, min(n_examples, len(pool)))
        request = build_instruction(preset, shown, per_request)
        answer = generate(request)
        if completion_prefix and not _NUMBERED.match(answer.lstrip().splitlines()[0] if answer.strip() else ""):
            answer = f"{len(shown) + 1}. {answer.lstrip()}"
        for caption in parse_numbered(answer):
            run.candidates += 1
            reason = rule_violation(caption, preset)
            match = None
            if reason is None:
                match = pool.add_if_novel(caption)
                if match.score > threshold:
                    reason = "near_duplicate"
            if reason is not None:
                run.rejected[reason] = run.rejected.get(reason, 0) + 1
                continue
            run.records.append(PromptRecord(caption, run.attempts, round(match.score, 6), match.text))
            if progress is not None:
                progress(len(run.records), target)
            if len(run.records) >= target:
                break
    return run


# --------------------------------------------------------------------------------------- saving

def _atomic_write(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def save_prompts(run: PromptRun, path) -> tuple[Path, Path]:
    """Write ``<path>.txt`` (one prompt per line, what Skill Dataset reads) and ``<path>.jsonl`` (one record
    per prompt with the attempt, max ROUGE-L and nearest pool text), each atomically."""
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".txt", ".jsonl") else base
    txt, jsonl = base.with_name(base.name + ".txt"), base.with_name(base.name + ".jsonl")
    _atomic_write(txt, "".join(p + "\n" for p in run.prompts))
    header = {"skill": run.skill, "seed": run.seed, "attempts": run.attempts, "candidates": run.candidates,
              "rejected": run.rejected}
    lines = [json.dumps({"meta": header}, ensure_ascii=False)]
    lines += [json.dumps(asdict(r), ensure_ascii=False) for r in run.records]
    _atomic_write(jsonl, "\n".join(lines) + "\n")
    return txt, jsonl


def read_prompt_file(path) -> list[str]:
    """Prompts from a .txt (one per line) or .jsonl (objects with a "prompt" field) file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number} is not valid JSON ({exc})") from exc
                if isinstance(item, dict) and isinstance(item.get("prompt"), str):
                    prompts.append(item["prompt"].strip())
        return [p for p in prompts if p]
    return [line.strip() for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------- local LLM

def causal_lm_model_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def check_llm_folder(folder, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> dict:
    """The VLM loader's folder checks (missing files, pickle-only weights, ``auto_map`` remote code) for a
    text-generation model folder, then: ``model_type`` must be a transformers causal LM (any type is
    accepted when the folder ships its own code and ``trust_remote_code`` is on)."""
    folder = Path(folder)
    try:
        declared = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        declared = None
    # The family check is done below (the VLM list does not apply); everything else is shared.
    config = check_model_folder(folder, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                allowed_model_types=[declared], what="LLM")
    remote = "auto_map" in config
    if declared not in causal_lm_model_types() and not (remote and trust_remote_code):
        raise VLMFolderError(
            f"LLM model folder {str(folder)!r} has model_type {declared!r}, which is not a text-generation "
            "(causal LM) architecture known to this transformers version; use an instruction-tuned LLM "
            "such as Qwen2.5-Instruct, Llama-3.x-Instruct, Phi-3.5 or SmolLM2-Instruct"
        )
    return config


@dataclass
class LLMBundle:
    model: object
    tokenizer: object
    folder: Path
    config: dict

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_llm(folder, *, dtype="auto", device="cpu", allow_pickle: bool = False,
             trust_remote_code: bool = False) -> LLMBundle:
    """Load a local causal LM folder (``save_pretrained`` layout) frozen, with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    config = check_llm_folder(folder, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    safe, _ = weight_files(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=resolve_dtype(dtype, config), local_files_only=True, use_safetensors=bool(safe),
        trust_remote_code=trust_remote_code)
    freeze(model).to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    return LLMBundle(model=model, tokenizer=tokenizer, folder=folder, config=config)


def _eos_ids(bundle: LLMBundle) -> set[int]:
    ids = set()
    for source in (getattr(bundle.model, "generation_config", None), bundle.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def sample_next_token(logits: torch.Tensor, temperature: float, top_p: float,
                      generator: torch.Generator) -> torch.Tensor:
    """One token id from softmax(logits / T), restricted to the smallest set of tokens with probability
    mass ≥ top_p (Holtzman et al. 2020, nucleus sampling); T = 0 is greedy."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)


class LLMGenerator:
    """``generate(text) -> str`` for a loaded causal LM: the chat template (if the tokenizer has one and
    ``chat`` is 'auto'/True) wraps the text as a user message; tokens are sampled with a CPU
    ``torch.Generator`` seeded once, so the sequence of answers is reproducible for a seed."""

    def __init__(self, bundle: LLMBundle, *, seed: int = 0, max_new_tokens: int = 512, temperature: float = 1.0,
                 top_p: float = 1.0, chat="auto", before_call: Optional[Callable[[], None]] = None,
                 device=None, check_interrupt: Optional[Callable[[], None]] = None):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
        self.bundle = bundle
        self.generator = torch.Generator().manual_seed(int(seed))
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        has_template = bool(getattr(bundle.tokenizer, "chat_template", None))
        self.chat = has_template if chat == "auto" else bool(chat)
        if self.chat and not has_template:
            raise ValueError(f"LLM folder {str(bundle.folder)!r} has no chat template; use chat='auto' or False")
        self.before_call, self.device, self.check_interrupt = before_call, device, check_interrupt
        self.eos = _eos_ids(bundle)

    @property
    def uses_chat(self) -> bool:
        return self.chat

    def encode(self, text: str) -> torch.Tensor:
        tok = self.bundle.tokenizer
        if self.chat:
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = tok(text, add_special_tokens=True)["input_ids"]
        ids = torch.as_tensor(ids, dtype=torch.long)
        return ids.reshape(1, -1)

    @torch.no_grad()
    def __call__(self, text: str) -> str:
        if self.before_call is not None:
            self.before_call()
        model = self.bundle.model
        device = self.device or self.bundle.device
        ids = self.encode(text).to(device)
        new: list[int] = []
        past = None
        step_input = ids
        for _ in range(self.max_new_tokens):
            out = model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = sample_next_token(out.logits[0, -1], self.temperature, self.top_p, self.generator)
            token_id = int(token)
            if token_id in self.eos:
                break
            new.append(token_id)
            step_input = token.reshape(1, 1).to(device)
            if self.check_interrupt is not None and len(new) % 32 == 0:
                self.check_interrupt()
        return self.bundle.tokenizer.decode(new, skip_special_tokens=True)


__all__ = [
    "LLMBundle", "LLMGenerator", "PromptRecord", "PromptRun", "build_instruction", "check_llm_folder",
    "clean_caption", "generate_skill_prompts", "load_llm", "mentioned_counts", "parse_numbered",
    "read_prompt_file", "rule_violation", "save_prompts",
]
