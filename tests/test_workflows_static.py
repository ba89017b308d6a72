"""Shipped workflows, checked without a server: API files are well-formed graphs, every API
workflow has a generated UI twin (and every generated twin its API file), and each twin still
describes the same graph and constants as its API file (build_ui.py was re-run after edits).
Widget order against /object_info is checked in tests/integration/test_ui_workflows.py."""
import json
from pathlib import Path

import pytest

from comfy_poe.workflows import build_ui

WORKFLOWS = Path(build_ui.__file__).resolve().parent
API_FILES = build_ui.api_workflows(WORKFLOWS)
UI_FILES = sorted(p for p in WORKFLOWS.glob("*.json") if not p.name.endswith(build_ui.API_SUFFIX))


def _load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def api_links(api: dict) -> dict:
    """{(target_id, input_name): (source_id, output_index)} of an API workflow."""
    return {(node_id, name): (str(value[0]), value[1])
            for node_id, node in api.items() for name, value in node["inputs"].items() if build_ui.is_link(value)}


def ui_links(ui: dict) -> dict:
    """The same mapping read from a UI workflow's nodes and links table."""
    nodes = {n["id"]: n for n in ui["nodes"]}
    return {(str(dst), nodes[dst]["inputs"][dst_slot]["name"]): (str(src), src_slot)
            for _, src, src_slot, dst, dst_slot, _ in ui["links"]}


def test_there_are_workflows():
    assert len(API_FILES) >= 3 and UI_FILES


@pytest.mark.parametrize("path", API_FILES, ids=[p.stem for p in API_FILES])
def test_api_workflow_is_a_valid_graph(path):
    api = _load(path)
    assert isinstance(api, dict) and api, f"{path.name}: not a JSON object of nodes"
    for node_id, node in api.items():
        assert node_id.isdigit(), f"{path.name}: node id {node_id!r} is not an integer string"
        assert isinstance(node.get("class_type"), str) and node["class_type"], f"{path.name}: node {node_id} has no class_type"
        assert isinstance(node.get("inputs"), dict), f"{path.name}: node {node_id} has no inputs object"
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                assert build_ui.is_link(value), f"{path.name}: node {node_id} input {name!r}: malformed link {value}"
                assert str(value[0]) in api, f"{path.name}: node {node_id} input {name!r} links to missing node {value[0]}"
                assert value[1] >= 0
    build_ui.graph_depths(api)  # raises on cycles
    outputs = {"SaveImage", "PreviewImage", "SaveLatent", "PreviewAny", "SaveAnimatedWEBP"}
    assert any(n["class_type"] in outputs for n in api.values()), f"{path.name}: no output node"


@pytest.mark.parametrize("path", API_FILES, ids=[p.stem for p in API_FILES])
def test_api_workflow_has_a_generated_ui_twin(path):
    twin = build_ui.ui_twin_path(path)
    assert twin.exists(), f"{path.name}: no UI twin; run python workflows/build_ui.py --server URL"
    assert _load(twin)["extra"].get(build_ui.GENERATED_KEY) == path.name


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_ui_workflow_is_consistent(path):
    ui = _load(path)
    assert ui.get("version") == build_ui.UI_VERSION
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]), f"{path.name}: duplicate node ids"
    assert ui["last_node_id"] >= max(nodes)
    assert ui["last_link_id"] >= max((link[0] for link in ui["links"]), default=0)
    link_ids = [link[0] for link in ui["links"]]
    assert len(set(link_ids)) == len(link_ids), f"{path.name}: duplicate link ids"
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        assert src in nodes and dst in nodes, f"{path.name}: link {link_id} joins missing nodes"
        output = nodes[src]["outputs"][src_slot]
        assert link_id in output["links"] and output["type"] == kind, f"{path.name}: link {link_id} vs its source"
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id, f"{path.name}: link {link_id} vs its target"
    used = {(n["id"], i["link"]) for n in ui["nodes"] for i in n.get("inputs", []) if i.get("link") is not None}
    assert used == {(link[3], link[0]) for link in ui["links"]}, f"{path.name}: inputs and links table disagree"
    if build_ui.is_generated(ui):
        twin = WORKFLOWS / build_ui.API_FOLDER / ui["extra"][build_ui.GENERATED_KEY]
        assert twin.exists(), f"{path.name}: generated from {twin.name}, which is gone"


@pytest.mark.parametrize("path", API_FILES, ids=[p.stem for p in API_FILES])
def test_ui_twin_describes_the_same_graph(path):
    """Same nodes, types, titles, links and constants: catches an API edit without regenerating."""
    api, ui = _load(path), _load(build_ui.ui_twin_path(path))
    nodes = {str(n["id"]): n for n in ui["nodes"] if n["type"] not in build_ui.VIRTUAL_NODES}
    notes = {n["properties"][build_ui.NOTE_FOR]: n["widgets_values"][0]
             for n in ui["nodes"] if n["type"] in build_ui.VIRTUAL_NODES and build_ui.NOTE_FOR in n.get("properties", {})}
    assert notes == {k: v["_meta"]["note"] for k, v in api.items() if v.get("_meta", {}).get("note")}, \
        f"{path.name}: notes differ from the UI twin"
    assert set(nodes) == set(api), f"{path.name}: node ids differ from the UI twin"
    for node_id, node in api.items():
        assert nodes[node_id]["type"] == node["class_type"], f"{path.name}: node {node_id} type"
        title = node.get("_meta", {}).get("title")
        assert nodes[node_id].get("title", title) == title, f"{path.name}: node {node_id} title"
        values = nodes[node_id]["widgets_values"]
        constants = [v for v in node["inputs"].values() if not build_ui.is_link(v)]
        missing = [v for v in constants if not any(type(v) is type(w) and v == w for w in values)]
        assert not missing, f"{path.name}: node {node_id} constants {missing} are not in the UI twin {values}"
        assert len(values) >= len(constants)
    assert ui_links(ui) == api_links(api), f"{path.name}: links differ from the UI twin"


def test_ui_to_api_inverts_api_to_ui_on_a_synthetic_object_info():
    """The converter pair on a hand-written /object_info: widget order, seed control value,
    optional sockets, a linked widget input."""
    object_info = {
        "Src": {"input": {"required": {"n": ["INT", {"default": 1}]}}, "output": ["LATENT", "INT"],
                "output_name": ["latent", "count"]},
        "Dst": {"input": {"required": {"latent": ["LATENT"], "seed": ["INT", {"default": 0}],
                                       "mode": [["a", "b"]], "steps": ["INT", {"default": 5}]},
                          "optional": {"extra": ["MASK"], "note": ["STRING", {"default": ""}]}},
                "input_order": {"required": ["latent", "seed", "mode", "steps"], "optional": ["extra", "note"]},
                "output": [], "output_name": []},
    }
    api = {"1": {"class_type": "Src", "inputs": {"n": 3}},
           "2": {"class_type": "Dst", "inputs": {"latent": ["1", 0], "seed": 7, "mode": "b", "steps": ["1", 1], "note": "x"}}}
    ui = build_ui.api_to_ui(api, object_info, "t_api.json")
    dst = next(n for n in ui["nodes"] if n["type"] == "Dst")
    assert dst["widgets_values"] == [7, "fixed", "b", 5, "x"]  # linked steps keeps a (default) value slot
    assert [i["name"] for i in dst["inputs"]] == ["latent", "extra", "steps"]
    assert dst["inputs"][2]["widget"] == {"name": "steps"}
    assert ui["links"] == [[1, 1, 0, 2, 0, "LATENT"], [2, 1, 1, 2, 2, "INT"]]
    assert dst["pos"][0] > next(n for n in ui["nodes"] if n["type"] == "Src")["pos"][0]
    assert build_ui.strip_meta(build_ui.ui_to_api(ui, object_info)) == api
    dst["widgets_values"].pop(1)
    with pytest.raises(ValueError, match="widgets_values"):
        build_ui.ui_to_api(ui, object_info)


TEXT_ZOOM = 8 / 14  # the frontend draws no text below MinFontSizeForLOD (8) / NODE_TEXT_SIZE (14)


def _overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_ui_layout_reads_at_fit_view(path):
    """Groups per stage, no overlaps, distinct titles, and Fit View in a 1800x1100 window keeps text drawn
    (workflows/check_frontend.py checks the same in the real frontend)."""
    ui = _load(path)
    boxes = {n["id"]: [n["pos"][0], n["pos"][1] - build_ui.TITLE_HEIGHT, n["size"][0],
                       n["size"][1] + build_ui.TITLE_HEIGHT] for n in ui["nodes"]}
    groups = [g["bounding"] for g in ui["groups"]]
    assert groups, f"{path.name}: no groups"
    for (i, a), (j, b) in ((x, y) for x in boxes.items() for y in boxes.items() if x[0] < y[0]):
        assert not _overlap(a, b), f"{path.name}: nodes {i} and {j} overlap"
    for k, a in enumerate(groups):
        assert not any(_overlap(a, b) for b in groups[k + 1:]), f"{path.name}: groups overlap"
    for node_id, box in boxes.items():
        inside = [g for g in groups if g[0] <= box[0] and g[1] <= box[1] and box[0] + box[2] <= g[0] + g[2]
                  and box[1] + box[3] <= g[1] + g[3]]
        assert len(inside) == 1, f"{path.name}: node {node_id} is not inside exactly one group"
    x0 = min(b[0] for b in boxes.values())
    y0 = min(b[1] for b in boxes.values())
    x1 = max(b[0] + b[2] for b in boxes.values())
    y1 = max(b[1] + b[3] for b in boxes.values())
    assert build_ui.fit_view_scale(x1 - x0, y1 - y0) >= TEXT_ZOOM, f"{path.name}: Fit View would hide the text"
    titles = [n.get("title") or n["type"] for n in ui["nodes"]]
    repeated = {t for t in titles if titles.count(t) > 1 and t in {n["type"] for n in ui["nodes"]}}
    assert not repeated, f"{path.name}: several nodes keep the default title {sorted(repeated)}"


def test_thumbnail_beside_every_ui_workflow():
    for path in UI_FILES:
        thumb = path.with_suffix(".jpg")
        assert thumb.exists(), f"{path.name}: no {thumb.name}; run workflows/check_frontend.py --thumbnails"
        assert thumb.read_bytes()[:3] == b"\xff\xd8\xff", f"{thumb.name} is not a JPEG"


def test_notes_travel_as_meta_in_api_files_and_as_markdown_notes_in_ui_twins():
    """A ``_meta.note`` becomes a MarkdownNote (a frontend-only node) in the UI twin and comes back on export."""
    object_info = {"Src": {"input": {"required": {"n": ["INT", {"default": 1}]}}, "output": ["LATENT"], "output_name": ["latent"]}}
    api = {"1": {"class_type": "Src", "inputs": {"n": 3}, "_meta": {"title": "Src", "note": "## Files\nput x in models/y"}}}
    ui = build_ui.api_to_ui(api, object_info, "t_api.json")
    note = next(n for n in ui["nodes"] if n["type"] == "MarkdownNote")
    assert note["widgets_values"] == ["## Files\nput x in models/y"] and note["properties"][build_ui.NOTE_FOR] == "1"
    assert note["id"] not in api and note["inputs"] == [] and note["outputs"] == []
    back = build_ui.ui_to_api(ui, object_info)
    assert set(back) == {"1"} and back["1"]["_meta"]["note"] == api["1"]["_meta"]["note"]
    assert build_ui.strip_meta(back) == build_ui.strip_meta(api)


def test_build_ui_explains_an_unreachable_server_or_a_foreign_object_info(tmp_path, capsys):
    """A developer tool, but still one line, exit 2, nothing written: not a traceback."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = sorted(p.name for p in build_ui.WORKFLOWS_DIR.glob("*.json"))
    with pytest.raises(SystemExit) as info:
        build_ui.main(["--server", f"http://127.0.0.1:{port}"])
    assert info.value.code == 2 and "no ComfyUI /object_info there" in capsys.readouterr().err
    foreign = tmp_path / "object_info.json"
    foreign.write_text(json.dumps({"KSampler": {}}))
    with pytest.raises(SystemExit) as info:
        build_ui.main(["--object-info", str(foreign), "--check"])
    assert info.value.code == 2 and "no comfy-poe nodes" in capsys.readouterr().err
    assert sorted(p.name for p in build_ui.WORKFLOWS_DIR.glob("*.json")) == before
