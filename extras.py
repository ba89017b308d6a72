"""Optional extras: which packages each one adds, and a clear message when one is missing.

The nodes need only ``requirements.txt``. The digits demo and benchmarks, the tests and a few optional
features need more; pyproject.toml lists them as extras (``pip install "comfy-poe[digits]"``). Code that
needs an extra calls :func:`require_extra` before any work starts, so a missing package is one sentence
that says what to install, not an ImportError from deep inside a model loader.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent

# extra -> {import name: pip name}; keep in sync with [project.optional-dependencies] in pyproject.toml
EXTRAS = {
    "digits": {"diffusers": "diffusers", "sklearn": "scikit-learn", "tqdm": "tqdm"},
}


class MissingExtraError(ImportError):
    """A feature was used whose optional packages are not installed."""


def missing_packages(extra: str) -> list[str]:
    """pip names of the packages of ``extra`` that cannot be imported here."""
    return [pip for module, pip in EXTRAS[extra].items() if importlib.util.find_spec(module) is None]


def require_extra(extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` naming the extra and its packages if any of them is missing."""
    missing = missing_packages(extra)
    if missing:
        raise MissingExtraError(
            f"{feature} needs the optional '{extra}' extra, which is not installed (missing: {', '.join(missing)}). "
            f"Install it into this Python with: python -m pip install -e \"{PACK_DIR}[{extra}]\" "
            f"(or: python -m pip install {' '.join(missing)})"
        )


def exit_unless_installed(extra: str, feature: str) -> None:
    """For command lines: :func:`require_extra`, ending the program with the message on stderr and exit
    status 2 (a usage error, like argparse's) instead of a traceback."""
    try:
        require_extra(extra, feature)
    except MissingExtraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
