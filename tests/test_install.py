"""Install metadata tells the truth: requirements.txt is the nodes' dependency list from pyproject, the
oldest-versions constraints pin every lower bound, and the pack works without its optional extras."""
import re
import subprocess
import sys

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

from comfy_poe.extras import EXTRAS, MissingExtraError, missing_packages, require_extra

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def requirement_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def parse(requirement: str) -> tuple[str, str | None]:
    """('name', 'lower bound' or None) of a 'name>=x' requirement (extras and comments dropped)."""
    requirement = requirement.split("#")[0].strip()
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*(?:>=\s*([0-9][^,;\s]*))?.*", requirement)
    assert match, requirement
    return match.group(1).lower().replace("_", "-"), match.group(2)


def extra_requirements(extra: str) -> list[str]:
    """The requirements of an extra, with the pack's own extras it names (comfy-poe[a,b]) expanded."""
    found = []
    for requirement in PYPROJECT["project"]["optional-dependencies"][extra]:
        own = re.fullmatch(r"comfy-poe\[([^\]]+)\]", requirement)
        found += [r for e in own.group(1).split(",") for r in extra_requirements(e.strip())] if own else [requirement]
    return found


def test_requirements_txt_is_the_pyproject_dependency_list():
    assert requirement_lines(ROOT / "requirements.txt") == PYPROJECT["project"]["dependencies"]
    assert not any(parse(r)[0] == "torch" for r in PYPROJECT["project"]["dependencies"])  # ComfyUI's torch


def test_every_lower_bound_is_pinned_in_the_oldest_constraints():
    pins = dict(line.split("==") for line in requirement_lines(ROOT / ".ci" / "constraints-oldest.txt"))
    pins = {name.lower().replace("_", "-"): version for name, version in pins.items()}
    # what CI installs: the nodes' dependencies and the test extra with the extras it includes; other extras
    # (hps: open_clip) are not installed by CI, so their bounds are not claimed as tested
    requirements = PYPROJECT["project"]["dependencies"] + extra_requirements("test")
    for requirement in requirements:
        name, lower = parse(requirement)
        if lower is None or name == "comfy-poe":
            continue
        assert name in pins, f"{name}>={lower} has no pin in .ci/constraints-oldest.txt"
        given = [int(p) for p in lower.split(".")]
        pinned = [int(p) for p in re.findall(r"\d+", pins[name])[:len(given)]]
        assert pinned == given, f"{name}: lower bound {lower} but the oldest pass tests {pins[name]}"


def test_extras_in_code_match_pyproject():
    optional = PYPROJECT["project"]["optional-dependencies"]
    for extra, packages in EXTRAS.items():
        assert sorted(packages.values()) == sorted(parse(r)[0] for r in optional[extra])


def test_readme_has_the_test_command_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- test-command:begin -->")[1].split("<!-- test-command:end -->")[0]
    assert 'pip install -e ".[test]"' in block and "python -m pytest -q" in block
    assert "test-command:begin" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_missing_extra_names_the_extra_and_the_packages(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    assert missing_packages("digits") == ["diffusers"]
    with pytest.raises(MissingExtraError, match=r"'digits' extra.*missing: diffusers\).*pip install -e .*\[digits\]"):
        require_extra("digits", "The digits demo")


# None in sys.modules: `import diffusers` raises ModuleNotFoundError, find_spec answers None (not installed)
BLOCK_EXTRAS = """
import sys
sys.modules.update(dict.fromkeys(('diffusers', 'sklearn')))
"""


def test_the_pack_imports_and_the_demo_explains_without_the_digits_extra():
    engine = ("experts", "samplers", "lora", "training", "selma", "extras", "fileio")
    code = BLOCK_EXTRAS + "\n".join(f"import comfy_poe.{m}" for m in engine) + """
from comfy_poe.__main__ import main
main(['demo', '--quick'])
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert "'digits' extra" in run.stderr and "Traceback" not in run.stderr


def test_trainer_and_batch_runner_name_their_extra_when_missing(monkeypatch, capsys, tmp_path):
    """Every optional import goes through extras.require_extra: one message shape, naming extra and packages."""
    from comfy_poe.training.launch import main as train_main

    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate -> ImportError
    with pytest.raises(SystemExit) as info:
        train_main(["--config", str(tmp_path / "run.toml")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "'train' extra" in err and "missing: accelerate" in err and "[train]" in err
    with pytest.raises(MissingExtraError, match=r"'batch' extra.*missing: aiohttp"):
        monkeypatch.setitem(sys.modules, "aiohttp", None)
        require_extra("batch", "The batch runner", modules=("aiohttp",))
