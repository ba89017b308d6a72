"""Skill presets for the SELMA prompt generator: editable JSON files (``selma/presets/*.json``).

A preset describes one skill: a description, rules the LLM is told to follow, seed examples that start
the in-context pool (SELMA uses 3 per skill), and the filters applied to every generated prompt
(``max_words``: fewer words than this; ``max_count``: no number above it; ``require_count``: at least
one number word). Users edit the shipped files or drop their own ``<name>.json`` into an extra folder
(the ComfyUI node also reads ``<ComfyUI user dir>/comfy_poe/selma_presets``); a user file with the same
name replaces the shipped one.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parent / "presets"
CUSTOM = "custom"


class PresetError(ValueError):
    """A skill preset that is missing or malformed."""


@dataclass(frozen=True)
class SkillPreset:
    name: str
    description: str
    rules: tuple = ()
    examples: tuple = ()
    max_words: int = 30
    min_words: int = 3
    max_count: int | None = None
    require_count: bool = False
    extra: dict = field(default_factory=dict, compare=False)

    def validate(self, what: str = "preset") -> "SkillPreset":
        if not self.description.strip():
            raise PresetError(f"{what} {self.name!r}: description is empty; say which skill the prompts should train")
        if not self.examples:
            raise PresetError(f"{what} {self.name!r}: give at least one seed example (SELMA uses 3)")
        if self.max_words < 2 or self.min_words < 1 or self.min_words >= self.max_words:
            raise PresetError(f"{what} {self.name!r}: need 1 ≤ min_words < max_words, got "
                              f"{self.min_words} and {self.max_words}")
        if self.max_count is not None and self.max_count < 1:
            raise PresetError(f"{what} {self.name!r}: max_count must be ≥ 1 or null, got {self.max_count}")
        return self

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(data.pop("extra"))
        data["rules"], data["examples"] = list(self.rules), list(self.examples)
        return data


_FIELDS = {"name", "description", "rules", "examples", "max_words", "min_words", "max_count", "require_count"}


def preset_from_dict(data: dict, name: str | None = None, source: str = "preset") -> SkillPreset:
    if not isinstance(data, dict):
        raise PresetError(f"{source}: expected a JSON object with description, rules and examples")
    rules, examples = data.get("rules", []), data.get("examples", [])
    for key, value in (("rules", rules), ("examples", examples)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PresetError(f"{source}: {key!r} must be a list of strings")
    try:
        preset = SkillPreset(
            name=str(data.get("name") or name or "skill"), description=str(data.get("description", "")),
            rules=tuple(r.strip() for r in rules if r.strip()),
            examples=tuple(e.strip() for e in examples if e.strip()),
            max_words=int(data.get("max_words", 30)), min_words=int(data.get("min_words", 3)),
            max_count=None if data.get("max_count") is None else int(data["max_count"]),
            require_count=bool(data.get("require_count", False)),
            extra={k: v for k, v in data.items() if k not in _FIELDS},
        )
    except (TypeError, ValueError) as exc:
        raise PresetError(f"{source}: {exc}") from exc
    return preset.validate(source)


def preset_files(extra_dirs=()) -> dict[str, Path]:
    """name → JSON file; later folders override earlier ones (shipped presets first)."""
    files: dict[str, Path] = {}
    for folder in (PRESET_DIR, *map(Path, extra_dirs)):
        if folder.is_dir():
            for path in sorted(folder.glob("*.json")):
                files[path.stem] = path
    return files


def list_presets(extra_dirs=()) -> list[str]:
    return sorted(preset_files(extra_dirs))


def load_preset(name: str, extra_dirs=()) -> SkillPreset:
    files = preset_files(extra_dirs)
    if name not in files:
        raise PresetError(f"skill preset {name!r} not found; available: {', '.join(sorted(files)) or 'none'}")
    path = files[name]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PresetError(f"skill preset file {path} cannot be read ({exc})") from exc
    return preset_from_dict(data, name=name, source=f"skill preset file {path}")


def split_lines(text: str) -> tuple:
    """Non-empty stripped lines; a leading '- ' / '* ' / 'N.' list marker is dropped."""
    from .prompts import strip_list_marker

    return tuple(s for s in (strip_list_marker(line) for line in str(text or "").splitlines()) if s)


def override(preset: SkillPreset | None, description: str = "", rules: str = "", examples: str = "",
             **limits) -> SkillPreset:
    """A preset with the non-empty text fields (one rule / example per line) and given limits replaced;
    ``preset=None`` builds a custom skill from the strings alone."""
    base = preset or SkillPreset(name=CUSTOM, description="")
    changes = {k: v for k, v in limits.items() if v is not None}
    if str(description).strip():
        changes["description"] = str(description).strip()
    if split_lines(rules):
        changes["rules"] = split_lines(rules)
    if split_lines(examples):
        changes["examples"] = split_lines(examples)
    return replace(base, **changes).validate("custom skill" if preset is None else "skill")
