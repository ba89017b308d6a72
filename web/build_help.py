"""Dev tool: the per-node help pages ``web/docs/<node id>.md`` that ComfyUI's frontend shows.

How ComfyUI v0.3.64 with frontend 1.27 finds a page (read from the sources):

- the root ``__init__.py`` sets ``WEB_DIRECTORY = "./web"``; ``nodes.load_custom_node`` then registers
  ``EXTENSION_WEB_DIRS[<folder name>] = <pack>/web`` (the *folder* name under ``custom_nodes``; a
  ``[tool.comfy] web`` entry in pyproject.toml would register it under the project *name* instead, which
  the frontend does not ask for), and ``server.py`` serves it as ``web.static("/extensions/<folder>")``;
- every node's ``/object_info`` entry carries ``python_module = "custom_nodes.<folder>"``; the frontend's
  ``NodeHelpService`` fetches ``/extensions/<folder>/docs/<node id>/<locale>.md`` and, when that is not
  found, ``/extensions/<folder>/docs/<node id>.md`` (relative links resolve against
  ``/extensions/<folder>/docs/``). Without a page it shows the node's description and input list.

So one ``docs/<node id>.md`` per node serves every locale (a translation would go to
``docs/<node id>/<locale>.md``).

Page layout. Hand-written: the title, what the node does, a recipe. Generated from the node schema,
between the markers ``<!-- schema:begin -->`` / ``<!-- schema:end -->``: the **Inputs** list (every input,
its type, default, range or options, and its tooltip) and the **Outputs** list (name and type; the text
after the colon is written by hand and kept when the list is regenerated). Lists, not tables: the frontend
shows the page in the node library's narrow side panel, where a five-column table needs side scrolling. ``tests/test_node_help.py`` checks that
every node has a page and that each page's tables are exactly what the schema gives, so a page names only
inputs the node has.

The schemas come from a running server's ``/object_info`` (the only place that knows them) and are kept in
``web/node_schemas.json``, so the unit test needs no ComfyUI; the integration test checks that snapshot
against the live server::

    python web/build_help.py --server http://127.0.0.1:8188   # refresh node_schemas.json and every table
    python web/build_help.py --check                          # exit 1 if a page is missing or stale (offline)

A node without a page gets a skeleton to fill in. Standard library only.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

try:  # a package import inside the pack; a plain script run from the repository works too
    from ..workflows.build_ui import fetch_object_info, input_specs, spec_options, spec_type, write_json_atomic
except ImportError:  # pragma: no cover - python web/build_help.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflows"))
    from build_ui import fetch_object_info, input_specs, spec_options, spec_type, write_json_atomic

WEB_DIR = Path(__file__).resolve().parent
DOCS_DIR = WEB_DIR / "docs"
SCHEMAS_PATH = WEB_DIR / "node_schemas.json"
BEGIN, END = "<!-- schema:begin -->", "<!-- schema:end -->"
MAX_LISTED_OPTIONS = 12  # longer combos (ComfyUI's sampler list) are summarised


def is_pack_node(info: dict, pack_module: str | None = None) -> bool:
    """A node of this pack: its ``python_module`` is ``custom_nodes.<folder>`` and it lives in
    ``poe/`` (``pack_module`` pins the folder when several packs could match)."""
    module = info.get("python_module", "")
    if pack_module is not None:
        return module == pack_module
    return module.startswith("custom_nodes.") and str(info.get("category", "")).startswith("poe/")


def reduce_schema(info: dict) -> dict:
    """The parts of an ``/object_info`` entry the help page documents (server-independent: file
    lists, whose options depend on the user's folders, are stored as ``"options": null``)."""
    inputs = []
    for name, spec, optional in input_specs(info):
        opts, kind = spec_options(spec), spec_type(spec)
        entry = {"name": name, "type": kind, "optional": optional, "tooltip": opts.get("tooltip", "")}
        for key in ("default", "min", "max", "step", "multiline"):
            if key in opts:
                entry[key] = opts[key]
        if kind == "COMBO":
            options = spec[0] if isinstance(spec[0], list) else opts.get("options", [])
            entry["options"] = None if opts.get("default") is None else list(options)
        inputs.append(entry)
    tooltips = info.get("output_tooltips") or []
    outputs = [{"name": name, "type": "COMBO" if isinstance(kind, list) else str(kind),
                "is_list": bool((info.get("output_is_list") or [False] * len(info["output"]))[i]),
                "tooltip": (tooltips[i] if i < len(tooltips) else None) or ""}
               for i, (name, kind) in enumerate(zip(info.get("output_name", []), info.get("output", [])))]
    return {"display_name": info.get("display_name") or info["name"], "category": info.get("category", ""),
            "description": info.get("description", ""), "inputs": inputs, "outputs": outputs}


def pack_schemas(object_info: dict) -> dict:
    return {node_id: reduce_schema(info) for node_id, info in sorted(object_info.items()) if is_pack_node(info)}


def _cell(text) -> str:
    return str(text).replace("\n", " ").strip()


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def default_cell(entry: dict) -> str:
    if "default" not in entry or entry["default"] is None:
        return ""
    value = entry["default"]
    if isinstance(value, bool):
        return f"default `{str(value).lower()}`"
    if isinstance(value, str):
        if "\n" in value or len(value) > 40:
            return "default: see the node"
        return f"default `{value}`" if value else "default empty"
    return f"default `{_number(value)}`"


def range_cell(entry: dict) -> str:
    kind = entry["type"]
    if kind in ("INT", "FLOAT") and ("min" in entry or "max" in entry):
        text = f"{_number(entry.get('min', '−∞'))} … {_number(entry.get('max', '∞'))}"
        return text + (f", step {_number(entry['step'])}" if "step" in entry else "")
    if kind == "COMBO":
        options = entry.get("options")
        if options is None:
            return "a file or folder from your model folders"
        if len(options) > MAX_LISTED_OPTIONS:
            return f"one of ComfyUI's {len(options)} options"
        return "one of " + ", ".join(f"`{o}`" for o in options)
    if kind == "STRING":
        return "text, several lines" if entry.get("multiline") else "text"
    if kind == "BOOLEAN":
        return ""
    return "a link"


def input_line(entry: dict) -> str:
    """One input as a list item (help pages are shown in a narrow side panel: lists, not wide tables)."""
    facts = ", ".join(f for f in (entry["type"], default_cell(entry), range_cell(entry)) if f)
    tooltip = _cell(entry["tooltip"])
    return (f"- **{entry['name']}**{' (optional)' if entry['optional'] else ''} — {facts}."
            + (f" {tooltip}" if tooltip else ""))


def inputs_table(schema: dict) -> list[str]:
    return [input_line(entry) for entry in schema["inputs"]]


OUTPUT_LINE = re.compile(r"^- \*\*([^*\n]+)\*\*(?: \(list\))? — [^:\n]+: (.*)$", re.M)


def output_rows(text: str) -> dict[str, str]:
    """Hand-written output descriptions of an existing page's Outputs list: ``{output name: text}``."""
    section = text.split("## Outputs", 1)[1] if "## Outputs" in text else ""
    return {m.group(1): m.group(2) for m in OUTPUT_LINE.finditer(section)}


def outputs_table(schema: dict, written: dict[str, str]) -> list[str]:
    rows = []
    for entry in schema["outputs"]:
        text = written.get(entry["name"]) or _cell(entry["tooltip"]) or "TODO: describe this output"
        rows.append(f"- **{entry['name']}**{' (list)' if entry['is_list'] else ''} — {entry['type']}: {text}")
    return rows


def schema_block(schema: dict, written_outputs: dict[str, str]) -> str:
    lines = [BEGIN, "", "## Inputs", ""] + inputs_table(schema)
    lines += ["", "## Outputs", ""] + outputs_table(schema, written_outputs) + ["", END]
    return "\n".join(lines)


def skeleton(node_id: str, schema: dict) -> str:
    return (f"# {schema['display_name']}\n\n{schema['description']}\n\n{schema_block(schema, {})}\n\n"
            "## Recipe\n\nTODO\n")


def render_page(node_id: str, schema: dict, current: str | None) -> str:
    """The page with its generated block refreshed (a skeleton when there is no page yet)."""
    if current is None:
        return skeleton(node_id, schema)
    if BEGIN not in current or END not in current:
        raise ValueError(f"web/docs/{node_id}.md has no {BEGIN} … {END} block")
    head, rest = current.split(BEGIN, 1)
    block, tail = rest.split(END, 1)
    return head + schema_block(schema, output_rows(block)) + tail


def page_path(node_id: str, docs: Path = DOCS_DIR) -> Path:
    return docs / f"{node_id}.md"


def problems(schemas: dict, docs: Path = DOCS_DIR, orphans: bool = True) -> list[str]:
    """Everything wrong with the pages for these schemas (empty = all good); ``orphans``: also pages
    of nodes that are not in ``schemas``."""
    found = []
    for node_id, schema in sorted(schemas.items()):
        path = page_path(node_id, docs)
        if not path.exists():
            found.append(f"{node_id}: no help page {path.name}")
            continue
        text = path.read_text(encoding="utf-8")
        try:
            expected = render_page(node_id, schema, text)
        except ValueError as e:
            found.append(str(e))
            continue
        if expected != text:
            found.append(f"{node_id}: the Inputs/Outputs lists of {path.name} differ from the node schema "
                         "(run python web/build_help.py --server URL)")
        if "TODO" in text:
            found.append(f"{node_id}: {path.name} still has a TODO")
    for path in sorted(docs.glob("*.md")) if orphans else ():
        if path.stem not in schemas:
            found.append(f"{path.name}: no node {path.stem!r} in this pack")
    return found


def build_all(schemas: dict, docs: Path = DOCS_DIR, log=print) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    for node_id, schema in sorted(schemas.items()):
        path = page_path(node_id, docs)
        current = path.read_text(encoding="utf-8") if path.exists() else None
        page = render_page(node_id, schema, current)
        if page != current:
            path.write_text(page, encoding="utf-8")
            log(f"wrote {path.name}" + (" (skeleton: fill in the TODOs)" if current is None else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", help="URL of a running ComfyUI with this pack loaded: refresh the schema snapshot")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is missing or stale")
    args = parser.parse_args(argv)
    if args.server:
        schemas = pack_schemas(fetch_object_info(args.server))
        if not args.check:
            write_json_atomic(SCHEMAS_PATH, schemas)
    else:
        schemas = json.loads(SCHEMAS_PATH.read_text(encoding="utf-8"))
    if args.check:
        found = problems(schemas)
        for line in found:
            print(line)
        return 1 if found else 0
    build_all(schemas)
    return 0


if __name__ == "__main__":
    sys.exit(main())
