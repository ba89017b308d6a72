"""Every node has a help page (web/docs/<node id>.md, shown by ComfyUI's frontend) whose Inputs and
Outputs lists are exactly what the node's schema gives: each input with its type, default and range, and
no input the node does not have. The schemas are the snapshot web/node_schemas.json (written by
``web/build_help.py --server URL``; tests/integration/test_node_help_comfy.py checks it against a live
server), so this test needs no ComfyUI."""
import json
import re
from pathlib import Path

import pytest

from comfy_poe.web import build_help

REPO = Path(build_help.__file__).resolve().parents[1]
SCHEMAS = json.loads(build_help.SCHEMAS_PATH.read_text(encoding="utf-8"))


def _source_node_ids() -> set[str]:
    """Node ids declared in nodes/*.py (``io.Schema(node_id="...")``)."""
    ids = set()
    for path in (REPO / "nodes").glob("*.py"):
        ids |= set(re.findall(r"node_id\s*=\s*\"([^\"]+)\"", path.read_text(encoding="utf-8")))
    return ids


def _items(text: str, heading: str) -> list[str]:
    """The list items under ``## heading``."""
    section = text.split(f"## {heading}\n", 1)[1].lstrip("\n")
    return [line for line in section.split("\n\n", 1)[0].splitlines() if line.startswith("- ")]


def test_snapshot_lists_every_node_of_the_source():
    source = _source_node_ids()
    assert source, "no node_id found in nodes/*.py"
    assert set(SCHEMAS) == source, (
        f"web/node_schemas.json is stale: missing {sorted(source - set(SCHEMAS))}, extra "
        f"{sorted(set(SCHEMAS) - source)}; run python web/build_help.py --server URL")


def test_no_page_without_a_node():
    pages = {p.stem for p in build_help.DOCS_DIR.glob("*.md")}
    assert pages - set(SCHEMAS) == set(), f"help pages for unknown nodes: {sorted(pages - set(SCHEMAS))}"


@pytest.mark.parametrize("node_id", sorted(SCHEMAS))
def test_page_matches_the_schema(node_id):
    schema = SCHEMAS[node_id]
    path = build_help.page_path(node_id)
    assert path.exists(), f"{node_id} has no help page; run python web/build_help.py --server URL and fill it in"
    text = path.read_text(encoding="utf-8")
    assert text.startswith(f"# {schema['display_name']}\n"), f"{path.name}: the title is not the display name"
    inputs = _items(text, "Inputs")
    names = [re.match(r"- \*\*([^*]+)\*\*", line).group(1) for line in inputs]
    assert names == [i["name"] for i in schema["inputs"]], f"{path.name}: inputs differ from the node's"
    for line, entry in zip(inputs, schema["inputs"]):  # type, default, range and tooltip, as the schema says
        assert line == build_help.input_line(entry), (path.name, entry["name"])
    outputs = _items(text, "Outputs")
    assert [re.match(r"- \*\*([^*]+)\*\*", line).group(1) for line in outputs] == \
        [o["name"] for o in schema["outputs"]], path.name
    assert all(line.split(": ", 1)[1].strip() and "TODO" not in line for line in outputs), \
        f"{path.name}: an output is not described"
    recipe = text.split("## Recipe\n", 1)
    assert len(recipe) == 2 and recipe[1].strip() and "TODO" not in text, f"{path.name}: no recipe"
    assert build_help.problems({node_id: schema}, orphans=False) == []


def test_tables_are_rendered_from_the_schema():
    """The generator's own output passes the checks above, and regenerating keeps hand-written text."""
    schema = {"display_name": "X", "category": "poe/x", "description": "d", "outputs": [
        {"name": "out", "type": "IMAGE", "is_list": False, "tooltip": ""}], "inputs": [
        {"name": "a", "type": "INT", "optional": False, "tooltip": "A | b", "default": 3, "min": 0, "max": 9},
        {"name": "m", "type": "COMBO", "optional": True, "tooltip": "", "default": "x", "options": ["x", "y"]},
        {"name": "f", "type": "COMBO", "optional": False, "tooltip": "", "options": None}]}
    page = build_help.skeleton("X", schema).replace("TODO: describe this output", "the picture")
    assert "- **a** — INT, default `3`, 0 … 9. A | b" in page
    assert "- **m** (optional) — COMBO, default `x`, one of `x`, `y`." in page
    assert "a file or folder from your model folders" in page
    assert "- **out** — IMAGE: the picture" in page
    assert build_help.render_page("X", schema, page) == page  # idempotent, keeps "the picture"
    schema["inputs"].pop(0)
    assert "- **a**" not in build_help.render_page("X", schema, page)


def test_pack_serves_web_directory():
    init = (REPO / "__init__.py").read_text(encoding="utf-8")
    assert re.search(r'^WEB_DIRECTORY = "\./web"$', init, re.M)
    assert build_help.DOCS_DIR == REPO / "web" / "docs"


def test_a_page_naming_an_input_the_node_lacks_is_refused(tmp_path):
    node_id = "PoESample"
    text = build_help.page_path(node_id).read_text(encoding="utf-8")
    bad = text.replace("## Inputs\n\n", "## Inputs\n\n- **model** — MODEL, a link. Not an input of PoE Sample.\n", 1)
    (tmp_path / f"{node_id}.md").write_text(bad, encoding="utf-8")
    found = build_help.problems({node_id: SCHEMAS[node_id]}, docs=tmp_path)
    assert found and "differ from the node schema" in found[0]
    (tmp_path / "PoENoSuchNode.md").write_text(text, encoding="utf-8")
    assert any("no node 'PoENoSuchNode'" in line for line in build_help.problems(SCHEMAS, docs=tmp_path))
