"""Shared pieces of the pack's command lines (stdlib only): argparse value checks, help text, program name.

Every check raises ``argparse.ArgumentTypeError`` with what to change, so argparse prints
``usage: ... error: argument --x: must be ...`` and exits 2 — never a traceback.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Callable, Sequence


def _number(text: str, kind: type, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def _checked(name: str, kind: type, what: str, ok: Callable) -> Callable[[str], int | float]:
    """argparse type: ``kind(text)`` (finite for floats) for which ``ok(value)`` holds, else "must be <what>"."""

    def parse(text: str):
        value = _number(text, kind, what)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = name
    return parse


positive_int = _checked("positive_int", int, "a whole number >= 1", lambda v: v >= 1)
nonnegative_int = _checked("nonnegative_int", int, "a whole number >= 0", lambda v: v >= 0)
# a seed torch accepts
seed = _checked("seed", int, "a whole number from 0 to 2**63 - 1", lambda v: 0 <= v < 2**63)
finite_float = _checked("finite_float", float, "a finite number", lambda v: True)
positive_float = _checked("positive_float", float, "a finite number > 0", lambda v: v > 0)
nonnegative_float = _checked("nonnegative_float", float, "a finite number >= 0", lambda v: v >= 0)
fraction = _checked("fraction", float, "a number in (0, 1]", lambda v: 0.0 < v <= 1.0)


def multiple_of_8(text: str) -> int:
    """An image side in pixels: a positive multiple of 8 (the VAE's latent stride)."""
    value = positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 (pixels per latent cell), got {text}; "
                                         f"use {max(8, value // 8 * 8)} or {value // 8 * 8 + 8}")
    return value


def int_in(low: int, high: int) -> Callable[[str], int]:
    """A whole number in [low, high] (e.g. a digit class 0..9)."""
    return _checked(f"int_{low}_{high}", int, f"a whole number from {low} to {high}", lambda v: low <= v <= high)


def int_list(item: Callable[[str], int] = positive_int) -> Callable[[str], list[int]]:
    """Comma-separated whole numbers, each checked by ``item``: type=int_list(seed) reads '0,1,2'."""

    def parse(text: str) -> list[int]:
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"must be comma-separated whole numbers, got {text!r}")
        return [item(p) for p in parts]

    return parse


def choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """Comma-separated names out of ``choices`` (case-insensitive)."""
    by_lower = {c.lower(): c for c in choices}

    def parse(text: str) -> list[str]:
        names = [p.strip() for p in str(text).split(",") if p.strip()]
        bad = [n for n in names if n.lower() not in by_lower]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (comma-separated), got {text!r}")
        return [by_lower[n.lower()] for n in names]

    return parse


_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|obj):`~?([^`]+)`")


def plain_help(text: str | None) -> str:
    """A docstring as terminal help: RST roles and double backticks removed (``x`` -> x, :func:`a.b` -> a.b)."""
    return _ROLE.sub(r"\1", text or "").replace("``", "")


def program_name(module: str, script: str | None = None) -> str:
    """``script`` (e.g. comfy-poe) when running as that console script, else ``python -m <module>``."""
    invoked = os.path.basename(sys.argv[0] if sys.argv and sys.argv[0] else "")
    if script and invoked in (script, f"{script}.exe", f"{script}-script.py"):
        return script
    return f"python -m {module}"
