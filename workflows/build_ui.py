"""Dev tool: generate the UI-format twin of every API-format workflow shipped in this folder.

ComfyUI lists every ``*.json`` of a pack's ``workflows/`` folder as a template. Templates must be in
the UI (litegraph) format the frontend saves — nodes with positions, sockets, positional
``widgets_values`` and a ``links`` table — while tests submit the API format
(``{id: {"class_type", "inputs"}}``). The API files are the source of truth; this tool writes
``<name>.json`` for each ``api/<name>_api.json`` using a live server's ``/object_info`` (the only
place that knows each node's input order, widget kinds and output types)::

    python workflows/build_ui.py --server http://127.0.0.1:8188          # (re)write the UI twins
    python -m comfy_poe.workflows.build_ui --server URL --check          # exit 1 if a twin is stale
    python workflows/build_ui.py --object-info object_info.json          # offline, from a saved dump

Generated files carry ``"extra": {"comfy_poe_generated_from": "<name>_api.json"}``; a UI workflow
without that marker is hand-made and never overwritten. ``ui_to_api`` is the inverse (what the
frontend's "Export (API)" does) and is what the round-trip test checks against the API twin.

Layout (so that a template reads at Fit View on a 1800×1100 laptop window, where the frontend zooms to
0.75 × the fitting scale and draws no text below 8/14 = 0.57): every node is drawn in one **group per
stage**, and groups are packed compactly (see ``layout``). A node's stage is

- ``"_meta": {"group": "<stage title>"}`` on the node in the API file, when given (the shipped workflows
  use it to tell their story: "Two models", "Prompts", "Product of experts", "SMC sampling", "Output");
- otherwise derived from the graph and ``/object_info``: "Output" for sinks (output nodes without outputs,
  e.g. Save Image) and nodes that only feed sinks (VAE Decode before Save Image), else by category
  (``CATEGORY_STAGES``: loaders → "Models", conditioning → "Prompts", mask → "Masks", poe/judges →
  "Judges", poe/sampling → "Product of experts", sampling → "Sampling", …).

Stages are ordered by the deepest node they hold; inside a group, nodes flow in graph order. Node titles
come from ``_meta.title`` (the name the frontend shows, and what ``api_batch`` selectors match): give nodes
of one type distinct titles; the tool warns about duplicates. ``workflows/check_frontend.py`` loads every
UI workflow in the real frontend (headless Chromium) and checks zoom, overlaps, groups and titles, and
writes the template thumbnails ``workflows/<name>.jpg``.

Frontend conventions reproduced (ComfyUI_frontend 1.27, which ComfyUI v0.3.64 pins):
- inputs are ordered by ``input_order`` (required, then optional); a node's ``inputs`` array holds
  its socket (non-widget) inputs in that order, followed by any widget input that is linked
  (with ``"widget": {"name": ...}``) — unlinked widget inputs are not saved;
- ``widgets_values`` holds one value per widget input in the same order; an INT input with
  ``control_after_generate`` (or, by legacy convention, one named ``seed`` / ``noise_seed``) is
  followed by the value of its "control after generate" widget, written as ``"fixed"`` so a
  template reproduces its image;
- links are ``[id, origin_id, origin_slot, target_id, target_slot, type]``, ``version`` 0.4;
- groups are ``{"id", "title", "bounding": [x, y, w, h], "color", "font_size", "flags"}``; a node's ``pos``
  is the top-left of its body, its 30-pixel title bar is drawn above it.

Notes: Note / MarkdownNote nodes live only in the frontend (the server rejects them in a prompt), so an API
file carries a note as ``"_meta": {"note": "<markdown>"}`` on any node (ComfyUI ignores ``_meta``); the UI twin
gets a MarkdownNote with that text left of the graph, and ``ui_to_api`` puts a MarkdownNote's text back on the
``_meta`` of the node recorded in its ``properties.comfy_poe_note_for``.

Standard library only: it must run with any Python, outside ComfyUI's venv.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

WORKFLOWS_DIR = Path(__file__).resolve().parent
# API twins live one folder down: ComfyUI lists only ``workflows/*.json`` (not sub-folders) as templates,
# and an API-format file opened as a template fails ("does not contain a valid version").
API_FOLDER = "api"
API_SUFFIX = "_api.json"
GENERATED_KEY = "comfy_poe_generated_from"
UI_VERSION = 0.4

# Input types the frontend turns into widgets (core ComfyWidgets); V1 combos have a list as type.
WIDGET_TYPES = frozenset({"INT", "FLOAT", "BOOLEAN", "STRING", "COMBO", "MARKDOWN"})
LEGACY_SEED_NAMES = ("seed", "noise_seed")
CONTROL_VALUE = "fixed"  # "control after generate": keep the seed, so the template is reproducible
# Frontend-only nodes that never reach the server.
VIRTUAL_NODES = frozenset({"Note", "MarkdownNote"})
# Widgets the frontend adds to a node on load, which /object_info does not list (PreviewAny's text preview).
FRONTEND_WIDGET_HEIGHTS = {"PreviewAny": 72}

# Layout (pixels, canvas units). Node sizes follow the frontend's own metrics (LiteGraph 1.27: title bar 30
# drawn above ``pos``, slots 20, widgets 20 + 4 margin); sizes are a little above its ``computeSize()`` so
# no widget is cut off (workflows/check_frontend.py checks that in the real frontend).
NODE_WIDTH, TITLE_HEIGHT, SLOT_HEIGHT, WIDGET_HEIGHT, TEXTAREA_HEIGHT, NODE_PAD = 320, 30, 20, 24, 72, 16
NODE_GAP, GROUP_PAD, GROUP_HEADER, GROUP_GAP, ORIGIN = 24, 14, 56, 36, (0, 0)
# The view the layout is made for: Fit View (``ds.fitToBounds``, zoom 0.75) in a laptop window. Below
# a zoom of MinFontSizeForLOD / NODE_TEXT_SIZE (8 / 14 = 0.57 by default) the frontend draws no text.
VIEW, FIT_ZOOM = (1800, 1100), 0.75
# Above this Fit View zoom, reading order (stage order, one column per depth) beats a larger zoom.
COMFORTABLE_SCALE = 0.6
GROUP_COLORS = ("#3f789e", "#88A", "#8A8", "#b58b2a", "#a1309b", "#b06634", "#444")
# Stage names derived from a node's category when the API file gives no ``_meta.group`` hint.
CATEGORY_STAGES = (("loaders", "Models"), ("advanced/loaders", "Models"), ("conditioning", "Prompts"),
                   ("mask", "Masks"), ("poe/judges", "Judges"), ("poe/sampling", "Product of experts"),
                   ("sampling", "Sampling"), ("poe/lora", "LoRA merge"), ("poe/training", "Training"),
                   ("poe/selma", "SELMA"), ("latent", "Latent"), ("image", "Images"))
# Notes (``_meta.note`` in an API file) become MarkdownNotes stacked left of the graph.
NOTE_NODE, NOTE_KEY, NOTE_FOR = "MarkdownNote", "note", "comfy_poe_note_for"
NOTE_SIZE = (440, 420)
NOTE_STAGE = "Read me: files and folders"


# --------------------------------------------------------------------------- object_info helpers


def input_specs(info: dict) -> list[tuple[str, list, bool]]:
    """``(name, spec, optional)`` for a node's inputs in the frontend's order: ``input_order``
    required then optional (object_info dict order where absent). Hidden inputs are left out."""
    inputs = info.get("input", {})
    order = info.get("input_order", {})
    out = []
    for group, optional in (("required", False), ("optional", True)):
        specs = inputs.get(group) or {}
        names = [n for n in order.get(group, []) if n in specs]
        names += [n for n in specs if n not in names]
        out += [(name, specs[name], optional) for name in names]
    return out


def spec_type(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else str(spec[0])


def spec_options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec) -> bool:
    return spec_type(spec) in WIDGET_TYPES and not spec_options(spec).get("forceInput", False)


def widget_count(name: str, spec) -> int:
    """How many entries of ``widgets_values`` the input takes (2 with a control-after-generate widget)."""
    options, kind = spec_options(spec), spec_type(spec)
    control = options.get("control_after_generate")
    if kind == "INT":
        return 2 if (control if control is not None else name in LEGACY_SEED_NAMES) else 1
    if control:
        raise NotImplementedError(f"input {name!r}: a {kind} with control_after_generate (the frontend adds a "
                                  "filter widget too) is not supported by this tool")
    if options.get("image_upload") or options.get("video_upload") or options.get("animated_image_upload"):
        raise NotImplementedError(f"input {name!r}: upload widgets are not supported by this tool")
    return 1


def default_value(spec):
    options = spec_options(spec)
    if "default" in options:
        return options["default"]
    if isinstance(spec[0], list):
        return spec[0][0] if spec[0] else ""
    if options.get("options"):
        return options["options"][0]
    return {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False}.get(spec_type(spec), "")


def output_types(info: dict) -> list[str]:
    return ["COMBO" if isinstance(t, list) else str(t) for t in info.get("output", [])]


def node_info(object_info: dict, class_type: str, where: str) -> dict:
    info = object_info.get(class_type)
    if info is None:
        raise KeyError(f"{where}: node type {class_type!r} is not in /object_info "
                       "(is the pack that defines it installed and loading without errors?)")
    return info


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) and not isinstance(value[1], bool)


# --------------------------------------------------------------------------- API -> UI


def graph_depths(api: dict) -> dict[str, int]:
    """Longest-path depth of each node from the graph's sources (its layout column)."""
    depth: dict[str, int] = {}

    def visit(node_id: str, stack: tuple) -> int:
        if node_id in depth:
            return depth[node_id]
        if node_id in stack:
            raise ValueError(f"node {node_id}: the workflow has a cycle")
        sources = [str(v[0]) for v in api[node_id]["inputs"].values() if is_link(v)]
        for src in sources:
            if src not in api:
                raise ValueError(f"node {node_id}: links to node {src}, which does not exist")
        depth[node_id] = 1 + max((visit(s, stack + (node_id,)) for s in sources), default=-1)
        return depth[node_id]

    for node_id in api:
        visit(node_id, ())
    return depth


def node_height(n_sockets: int, n_outputs: int, widget_specs: list) -> int:
    """Body height (the title bar is drawn above it): slot rows, then one row per widget."""
    rows = max(n_sockets, n_outputs)
    widgets = sum(TEXTAREA_HEIGHT if spec_options(s).get("multiline") else WIDGET_HEIGHT * widget_count(n, s)
                  for n, s in widget_specs)
    return SLOT_HEIGHT * rows + widgets + NODE_PAD


def api_to_ui(api: dict, object_info: dict, source_name: str = "") -> dict:
    """UI-format workflow (frontend save format, version 0.4) equivalent to the API-format ``api``."""
    for node_id in api:
        if not str(node_id).isdigit():
            raise ValueError(f"node id {node_id!r}: UI workflows need integer node ids")
    ids = sorted(api, key=int)
    depths = graph_depths(api)
    order = {node_id: i for i, node_id in enumerate(sorted(ids, key=lambda n: (depths[n], int(n))))}

    nodes, links, outputs_of = [], [], {}
    for node_id in ids:
        node = api[node_id]
        info = node_info(object_info, node["class_type"], f"node {node_id}")
        outputs_of[node_id] = [{"name": name, "type": kind, "links": [], "slot_index": i}
                               for i, (name, kind) in enumerate(zip(info.get("output_name", info.get("output", [])),
                                                                    output_types(info)))]
    for node_id in ids:
        node, where = api[node_id], f"node {node_id} ({api[node_id]['class_type']})"
        info = object_info[node["class_type"]]
        specs = input_specs(info)
        known = {name for name, _, _ in specs}
        unknown = sorted(set(node["inputs"]) - known)
        if unknown:
            raise ValueError(f"{where}: inputs {unknown} do not exist on this node (stale workflow?)")
        sockets = [(n, s) for n, s, _ in specs if not is_widget(s)]
        sockets += [(n, s) for n, s, _ in specs if is_widget(s) and is_link(node["inputs"].get(n))]
        widget_specs = [(n, s) for n, s, _ in specs if is_widget(s)]

        inputs = []
        for slot, (name, spec) in enumerate(sockets):
            entry = {"name": name, "type": spec_type(spec), "link": None}
            if is_widget(spec):
                entry["widget"] = {"name": name}
            value = node["inputs"].get(name)
            if is_link(value):
                src, src_slot = str(value[0]), value[1]
                if src not in outputs_of or src_slot >= len(outputs_of[src]):
                    raise ValueError(f"{where}: input {name!r} links to output {src_slot} of node {src}, which does not exist")
                link_id = len(links) + 1
                links.append([link_id, int(src), src_slot, int(node_id), slot, outputs_of[src][src_slot]["type"]])
                outputs_of[src][src_slot]["links"].append(link_id)
                entry["link"] = link_id
            elif value is not None:
                raise ValueError(f"{where}: input {name!r} is a socket of type {spec_type(spec)} but has a constant value")
            elif not spec_optional(specs, name):
                raise ValueError(f"{where}: required input {name!r} is not connected")
            inputs.append(entry)

        values = []
        for name, spec in widget_specs:
            value = node["inputs"].get(name)
            if value is None or is_link(value):
                if value is None:
                    print(f"warning: {where}: widget {name!r} missing in the API workflow, using its default",
                          file=sys.stderr)
                value = default_value(spec)
            values.append(value)
            if widget_count(name, spec) == 2:
                values.append(CONTROL_VALUE)

        ui_node = {
            "id": int(node_id), "type": node["class_type"], "pos": [0, 0],
            "size": [NODE_WIDTH, node_height(len(sockets), len(outputs_of[node_id]), widget_specs)
                     + FRONTEND_WIDGET_HEIGHTS.get(node["class_type"], 0)],
            "flags": {}, "order": order[node_id], "mode": 0,
            "inputs": inputs, "outputs": outputs_of[node_id],
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": values,
        }
        title = node.get("_meta", {}).get("title")
        if title and title != info.get("display_name"):
            ui_node["title"] = title
        nodes.append(ui_node)

    notes = note_nodes(api, first_id=max((n["id"] for n in nodes), default=0) + 1, first_order=len(nodes))
    stages = {node_id: node_stage(node_id, api, object_info) for node_id in ids}
    for note in notes:  # the notes get a group of their own, read first
        stages[str(note["id"])], depths[str(note["id"])] = NOTE_STAGE, -1
    groups = layout(nodes + notes, depths, stages)
    titles = [n.get("title") or object_info[n["type"]].get("display_name") or n["type"] for n in nodes]
    for title in sorted({t for t in titles if titles.count(t) > 1}):
        print(f"warning: {source_name or 'workflow'}: {titles.count(title)} nodes are titled {title!r}; "
              "give them distinct _meta.title values in the API file", file=sys.stderr)
    nodes += notes
    extra = {GENERATED_KEY: source_name} if source_name else {}
    return {
        "last_node_id": max((n["id"] for n in nodes), default=0),
        "last_link_id": len(links),
        "nodes": nodes, "links": links, "groups": groups, "config": {}, "extra": extra, "version": UI_VERSION,
    }


def note_nodes(api: dict, first_id: int, first_order: int) -> list[dict]:
    """A MarkdownNote per ``_meta.note`` of the API workflow (positions are set by :func:`layout`)."""
    notes, y = [], ORIGIN[1]
    for node_id in sorted(api, key=int):
        text = (api[node_id].get("_meta") or {}).get(NOTE_KEY)
        if not text:
            continue
        i = len(notes)
        notes.append({"id": first_id + i, "type": NOTE_NODE, "pos": [ORIGIN[0] - NOTE_SIZE[0] - GROUP_GAP, y],
                      "size": list(NOTE_SIZE), "flags": {}, "order": first_order + i, "mode": 0, "inputs": [],
                      "outputs": [], "properties": {NOTE_FOR: str(node_id)}, "widgets_values": [text],
                      "color": "#432", "bgcolor": "#653"})
        y += NOTE_SIZE[1] + TITLE_HEIGHT + NODE_GAP
    return notes


def spec_optional(specs, name: str) -> bool:
    return any(optional for n, _, optional in specs if n == name)


def node_stage(node_id: str, api: dict, object_info: dict) -> str:
    """The group (stage) a node is drawn in: ``_meta.group`` of the API file, else derived: sinks (output
    nodes without outputs, e.g. Save Image) and what only feeds them ("Output"), then the node's category
    (CATEGORY_STAGES), else its first part."""
    node = api[node_id]
    hint = node.get("_meta", {}).get("group")
    if hint:
        return str(hint)
    info = object_info.get(node["class_type"], {})

    def sink(class_type: str) -> bool:  # SaveImage, PreviewImage …: an output node with no outputs
        other = object_info.get(class_type, {})
        return bool(other.get("output_node")) and not other.get("output")

    consumers = [other["class_type"] for other in api.values()
                 if any(is_link(v) and str(v[0]) == node_id for v in other["inputs"].values())]
    if sink(node["class_type"]) or (consumers and all(sink(c) for c in consumers)):
        return "Output"
    category = str(info.get("category", ""))
    for prefix, stage in CATEGORY_STAGES:
        if category == prefix or category.startswith(prefix + "/"):
            return stage
    return category.split("/")[0].capitalize() or "Nodes"


def _stage_block(members: list[dict], depths: dict[str, int], max_height: float,
                 by_depth: bool) -> tuple[list, float, float]:
    """Positions of one stage's nodes relative to its group's inner top-left, in reading order (graph
    depth, then id) flowing top to bottom, then to the next column: a new column when ``by_depth`` and the
    depth changes, or when the column would grow past ``max_height``."""
    columns: list[list[dict]] = [[]]
    height, last_depth = 0.0, None
    for node in sorted(members, key=lambda n: (depths[str(n["id"])], n["id"])):
        tall, depth = TITLE_HEIGHT + node["size"][1], depths[str(node["id"])]
        if columns[-1] and ((by_depth and depth != last_depth) or height + NODE_GAP + tall > max_height):
            columns.append([])
            height = 0.0
        height += (NODE_GAP if columns[-1] else 0) + tall
        columns[-1].append(node)
        last_depth = depth
    placed, x, block_h = [], 0.0, 0.0
    for column in columns:
        y = 0.0
        for node in column:
            placed.append((node, x, y + TITLE_HEIGHT))
            y += TITLE_HEIGHT + node["size"][1] + NODE_GAP
        block_h = max(block_h, y - NODE_GAP)
        x += max(n["size"][0] for n in column) + NODE_GAP
    return placed, x - NODE_GAP, block_h


def _pack(sizes: list[tuple[float, float]], order: list[int], width: float, height: float, monotone: bool):
    """Column-first fill: each box (in ``order``) goes to the left-most, then top-most free corner that keeps
    it inside ``width`` × ``height`` without touching the others (GROUP_GAP apart); with ``monotone`` never
    left of the box before it, so the boxes read top to bottom, left to right. None if one does not fit."""
    spots: dict[int, tuple[float, float]] = {}
    corners, last_x = [(0.0, 0.0)], 0.0
    for i in order:
        w, h = sizes[i]
        for x, y in sorted(corners, key=lambda c: (c[0], c[1])):
            if x + w > width or y + h > height or (monotone and x < last_x):
                continue
            if all(x + w + GROUP_GAP <= ox or ox + sizes[j][0] + GROUP_GAP <= x or
                   y + h + GROUP_GAP <= oy or oy + sizes[j][1] + GROUP_GAP <= y for j, (ox, oy) in spots.items()):
                spots[i] = (x, y)
                corners += [(x + w + GROUP_GAP, y), (x, y + h + GROUP_GAP)]
                last_x = x
                break
        else:
            return None
    return spots


def fit_view_scale(width: float, height: float) -> float:
    """The zoom the frontend's Fit View picks for a graph of this size in the VIEW window."""
    return FIT_ZOOM * min(VIEW[0] / max(width + 20, 300), VIEW[1] / max(height + 20, 300))


def layout(nodes: list[dict], depths: dict[str, int], stages: dict[str, str]) -> list[dict]:
    """Lay the nodes out in one group per stage and return the groups (UI format).

    Stages are ordered by the largest graph depth of their nodes (then the smallest node id), so the graph
    reads left to right, top to bottom: inputs, prompts, experts / judges, sampling, output. Inside a
    group nodes flow in reading order (graph depth, then id) down a column and on to the next. The groups
    are packed column-first into the smallest box of the VIEW window's shape that holds them (in stage
    order, each group below or right of the one before; or largest first when that packs tighter). Among a few column heights the arrangement with the
    largest Fit View zoom wins, up to COMFORTABLE_SCALE; above it, and on ties, stage order and one column per
    depth win, then the larger zoom, then the smaller area. Nodes and groups never overlap."""
    members: dict[str, list[dict]] = {}
    for node in sorted(nodes, key=lambda n: n["id"]):
        members.setdefault(stages[str(node["id"])], []).append(node)
    stage_order = sorted(members, key=lambda s: (max(depths[str(n["id"])] for n in members[s]),
                                                 min(n["id"] for n in members[s])))
    tallest = max((TITLE_HEIGHT + n["size"][1] for n in nodes), default=0)
    best = None
    for by_depth in (True, False):
        for max_height in sorted({tallest, 500.0, 700.0, 900.0, 1200.0, float("inf")}):
            if max_height < tallest:
                continue
            blocks = [_stage_block(members[s], depths, max_height, by_depth) for s in stage_order]
            sizes = [(w + 2 * GROUP_PAD, h + GROUP_HEADER + GROUP_PAD) for _, w, h in blocks]
            area = sum((w + GROUP_GAP) * (h + GROUP_GAP) for w, h in sizes)
            aspect = VIEW[0] / VIEW[1]
            s = max((area / aspect) ** 0.5, max(w for w, _ in sizes) / aspect, max(h for _, h in sizes))
            by_size = sorted(range(len(sizes)), key=lambda i: -sizes[i][0] * sizes[i][1])
            for rank, order in enumerate((list(range(len(sizes))), by_size)):
                scale_h = s
                for _ in range(200):
                    spots = _pack(sizes, order, scale_h * aspect, scale_h, monotone=rank == 0)
                    if spots is not None:
                        break
                    scale_h *= 1.03
                width = max(spots[i][0] + sizes[i][0] for i in spots)
                height = max(spots[i][1] + sizes[i][1] for i in spots)
                scale = round(fit_view_scale(width, height), 2)
                key = (min(scale, COMFORTABLE_SCALE), -rank, by_depth, scale, -width * height)
                if best is None or key > best[0]:
                    best = (key, blocks, sizes, spots)
    groups = []
    if best is None:
        return groups
    _, blocks, sizes, spots = best
    for i, title in enumerate(stage_order):
        gx, gy = spots[i][0] + ORIGIN[0], spots[i][1] + ORIGIN[1]
        for node, x, y in blocks[i][0]:
            node["pos"] = [gx + GROUP_PAD + x, gy + GROUP_HEADER + y]
        groups.append({"id": i + 1, "title": title, "bounding": [gx, gy, sizes[i][0], sizes[i][1]],
                       "color": GROUP_COLORS[i % len(GROUP_COLORS)], "font_size": 24, "flags": {}})
    return groups


# --------------------------------------------------------------------------- UI -> API


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """API-format prompt of a UI-format workflow (what the frontend's "Export (API)" produces,
    ``_meta.title`` included). Supports plain graphs: muted / bypassed nodes, reroutes, primitive
    nodes and subgraphs are refused with an error; notes are skipped."""
    if ui.get("definitions", {}).get("subgraphs"):
        raise NotImplementedError("subgraphs are not supported")
    links = {}
    for link in ui.get("links", []):
        link_id, src, src_slot, dst, dst_slot, kind = link[:6]
        links[link_id] = (src, src_slot, dst, dst_slot, kind)
    api, notes = {}, {}
    for node in sorted(ui["nodes"], key=lambda n: n["id"]):
        where = f"node {node['id']} ({node['type']})"
        if node["type"] in VIRTUAL_NODES:
            target = (node.get("properties") or {}).get(NOTE_FOR)
            if target is not None and node.get("widgets_values"):
                notes[str(target)] = node["widgets_values"][0]
            continue
        if node.get("mode", 0) != 0:
            raise NotImplementedError(f"{where}: muted or bypassed nodes are not supported")
        info = node_info(object_info, node["type"], where)
        linked = {}
        for slot, entry in enumerate(node.get("inputs", [])):
            if entry.get("link") is None:
                continue
            if entry["link"] not in links:
                raise ValueError(f"{where}: input {entry['name']!r} uses link {entry['link']}, which is not in 'links'")
            src, src_slot, dst, dst_slot, _ = links[entry["link"]]
            if dst != node["id"] or dst_slot != slot:
                raise ValueError(f"{where}: link {entry['link']} ends at node {dst} slot {dst_slot}, "
                                 f"but input {entry['name']!r} is slot {slot} of node {node['id']}")
            linked[entry["name"]] = [str(src), src_slot]
        values = list(node.get("widgets_values") or [])
        inputs, i = {}, 0
        for name, spec, _ in input_specs(info):
            if is_widget(spec):
                count = widget_count(name, spec)
                if i + count > len(values):
                    raise ValueError(f"{where}: widgets_values has {len(values)} entries, too few for widget {name!r}")
                if name not in linked:
                    inputs[name] = values[i]
                i += count
            if name in linked:
                inputs[name] = linked[name]
        if i != len(values):
            raise ValueError(f"{where}: widgets_values has {len(values)} entries but the node's widgets take {i}")
        unknown = sorted(set(linked) - set(inputs))
        if unknown:
            raise ValueError(f"{where}: inputs {unknown} do not exist on this node")
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                "_meta": {"title": node.get("title") or info.get("display_name") or node["type"]}}
    for target, text in notes.items():
        if target in api:
            api[target]["_meta"][NOTE_KEY] = text
    return api


def strip_meta(api: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


# --------------------------------------------------------------------------- files


def api_workflows(folder: Path = WORKFLOWS_DIR) -> list[Path]:
    """The API-format files of a workflow folder (``<folder>/api/*_api.json``)."""
    return sorted((folder / API_FOLDER).glob("*" + API_SUFFIX))


def ui_twin_path(api_path: Path) -> Path:
    """``workflows/api/<name>_api.json`` -> ``workflows/<name>.json``."""
    return api_path.parent.parent / (api_path.name[: -len(API_SUFFIX)] + ".json")


def api_twin_path(ui_path: Path) -> Path:
    """``workflows/<name>.json`` -> ``workflows/api/<name>_api.json``."""
    return ui_path.parent / API_FOLDER / (ui_path.stem + API_SUFFIX)


def is_generated(ui: dict) -> bool:
    return GENERATED_KEY in (ui.get("extra") or {})


def write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fetch_object_info(server: str) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(server.rstrip("/") + "/object_info", timeout=60) as resp:
        return json.load(resp)


def build_all(object_info: dict, folder: Path = WORKFLOWS_DIR, check: bool = False, log=print) -> int:
    """(Re)write every generated UI twin; with ``check`` only compare. Returns the number of
    twins that are missing or differ from what would be generated."""
    stale = 0
    for api_path in api_workflows(folder):
        ui_path = ui_twin_path(api_path)
        api = json.loads(api_path.read_text(encoding="utf-8"))
        ui = api_to_ui(api, object_info, api_path.name)
        if strip_meta(ui_to_api(ui, object_info)) != strip_meta(api):  # the generator's own round trip
            raise AssertionError(f"{api_path.name}: UI -> API round trip differs; fix build_ui.py")
        if ui_path.exists():
            current = json.loads(ui_path.read_text(encoding="utf-8"))
            if not is_generated(current):
                log(f"skip {ui_path.name}: hand-made (no extra.{GENERATED_KEY})")
                continue
            if current == ui:
                log(f"ok    {ui_path.name}")
                continue
        stale += 1
        if check:
            log(f"STALE {ui_path.name}: regenerate with workflows/build_ui.py --server URL")
        else:
            write_json_atomic(ui_path, ui)
            log(f"wrote {ui_path.name}")
    for ui_path in sorted(folder.glob("*.json")):
        twin = api_twin_path(ui_path)
        if not twin.exists() and is_generated(json.loads(ui_path.read_text(encoding="utf-8"))):
            log(f"orphan {ui_path.name}: generated from {twin.name}, which no longer exists (delete it?)")
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--server", help="URL of a running ComfyUI with this pack loaded, e.g. http://127.0.0.1:8188")
    source.add_argument("--object-info", type=Path, help="a saved /object_info JSON instead of a server")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a UI twin is missing or stale")
    parser.add_argument("--folder", type=Path, default=WORKFLOWS_DIR, help="workflow folder (default: this one)")
    args = parser.parse_args(argv)
    try:
        object_info = (fetch_object_info(args.server) if args.server
                       else json.loads(args.object_info.read_text(encoding="utf-8")))
    except (OSError, ValueError) as err:  # URLError is an OSError; a bad JSON body is a ValueError
        if args.server:
            parser.exit(2, f"error: --server {args.server}: no ComfyUI /object_info there ({err}). Start ComfyUI "
                           "with this pack in custom_nodes, or pass a saved /object_info JSON with --object-info.\n")
        parser.exit(2, f"error: --object-info {args.object_info}: not a readable JSON file ({err})\n")
    if not any(k.startswith("PoE") for k in object_info):
        parser.exit(2, "error: the object_info has no comfy-poe nodes: is this pack in the server's custom_nodes?\n")
    stale = build_all(object_info, args.folder, check=args.check)
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
