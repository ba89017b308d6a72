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
# (tests/test_install.py checks it; the `test` extra is the union and is not listed)
EXTRAS = {
    "digits": {"diffusers": "diffusers", "sklearn": "scikit-learn", "tqdm": "tqdm"},
    "batch": {"aiohttp": "aiohttp", "tqdm": "tqdm"},
    "train": {"accelerate": "accelerate", "diffusers": "diffusers"},
    "hps": {"open_clip": "open-clip-torch"},
}


class MissingExtraError(ImportError):
    """A feature was used whose optional packages are not installed."""


def missing_packages(extra: str, modules=None) -> list[str]:
    """pip names of the packages of ``extra`` (or only of its import names ``modules``) that cannot be
    imported here."""
    wanted = EXTRAS[extra] if modules is None else {m: EXTRAS[extra][m] for m in modules}
    return [pip for module, pip in wanted.items() if importlib.util.find_spec(module) is None]


def require_extra(extra: str, feature: str, *, modules=None, hint: str = "", error=MissingExtraError) -> None:
    """Raise ``error`` (default :class:`MissingExtraError`) naming the extra, its missing packages and the
    install command if any of them is missing. ``modules`` narrows the check to the import names a feature
    really needs; ``hint`` ends the message (another way out, such as a conversion). Every optional import of
    the pack goes through here, so the message is the same everywhere."""
    missing = missing_packages(extra, modules)
    if missing:
        raise error(
            f"{feature} needs the optional '{extra}' extra, which is not installed (missing: {', '.join(missing)}). "
            f"Install it into this Python with: python -m pip install -e \"{PACK_DIR}[{extra}]\" "
            f"(or: python -m pip install {' '.join(missing)})" + (f"; {hint}" if hint else "")
        )


def exit_unless_installed(extra: str, feature: str) -> None:
    """For command lines: :func:`require_extra`, ending the program with the message on stderr and exit
    status 2 (a usage error, like argparse's) instead of a traceback."""
    try:
        require_extra(extra, feature)
    except MissingExtraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
