"""UI-format workflows (the templates ComfyUI lists) against a live server's /object_info.

For each generated UI twin: every node type exists, widgets_values has the frontend's layout
(object_info widget order, the control-after-generate value after seeds) with values of the right
kind, every link's type matches both ends, converting it back to the API format gives exactly the
API twin the other integration tests run (the real check), and it is what build_ui.py generates now.
"""
import json
import math
from pathlib import Path

import pytest

from comfy_poe.workflows import build_ui

pytestmark = pytest.mark.integration

WORKFLOWS = Path(build_ui.__file__).resolve().parent
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
MODEL_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _ui_workflows() -> list[Path]:
    return sorted(p for p in WORKFLOWS.glob("*.json") if not p.name.endswith(build_ui.API_SUFFIX))


GENERATED = [p for p in _ui_workflows() if build_ui.is_generated(_load(p))]
HAND_MADE = [p for p in _ui_workflows() if not build_ui.is_generated(_load(p))]


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.object_info()


def _api_twin(ui_path: Path) -> dict:
    return _load(build_ui.api_twin_path(ui_path))


USER_FOLDER_INPUTS = {"llm_name", "model_name"}  # combos listing folders under models/LLM, models/vlm


def check_widget_value(where: str, name: str, spec, value) -> None:
    kind, options = build_ui.spec_type(spec), build_ui.spec_options(spec)
    if kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {name}={value!r} is not an INT"
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), \
            f"{where}: {name}={value!r} is not a FLOAT"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {name}={value!r} is not a BOOLEAN"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {name}={value!r} is not a STRING"
    elif kind == "COMBO":
        choices = spec[0] if isinstance(spec[0], list) else options.get("options", [])
        # model / file lists depend on the user's folders: empty here, or a file name the test box lacks;
        # model *folders* (LLM, VLM, CLIP judges) have no suffix, so they are exempt by input name
        if choices and not str(value).endswith(MODEL_FILE_SUFFIXES) and name not in USER_FOLDER_INPUTS:
            assert value in choices, f"{where}: {name}={value!r} is not one of {choices}"
    if kind in ("INT", "FLOAT"):
        assert options.get("min", -math.inf) <= value <= options.get("max", math.inf), \
            f"{where}: {name}={value} outside [{options.get('min')}, {options.get('max')}]"


def check_ui_structure(ui: dict, object_info: dict) -> None:
    """Node types, widget layout and link types of a UI workflow, as the frontend will read it."""
    nodes = {n["id"]: n for n in ui["nodes"]}
    for node in ui["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        if node["type"] in build_ui.VIRTUAL_NODES:  # frontend-only notes: a text widget, no sockets
            assert isinstance((node.get("widgets_values") or [None])[0], str) and not node.get("inputs"), where
            continue
        assert node["type"] in object_info, f"{where}: unknown node type"
        specs = build_ui.input_specs(object_info[node["type"]])
        values = list(node.get("widgets_values") or [])
        i = 0
        for name, spec, _ in specs:
            if not build_ui.is_widget(spec):
                continue
            count = build_ui.widget_count(name, spec)
            assert i + count <= len(values), f"{where}: widgets_values too short at {name!r}: {values}"
            check_widget_value(where, name, spec, values[i])
            if count == 2:
                assert values[i + 1] in CONTROL_VALUES, \
                    f"{where}: after {name!r} expected a control_after_generate value, got {values[i + 1]!r}"
            i += count
        assert i == len(values), f"{where}: {len(values)} widgets_values but its widgets take {i}: {values}"
        socket_types = {name: build_ui.spec_type(spec) for name, spec, _ in specs}
        for entry in node.get("inputs", []):
            assert entry["name"] in socket_types, f"{where}: no input named {entry['name']!r}"
            assert entry["type"] == socket_types[entry["name"]], f"{where}: input {entry['name']!r} type"
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        out_types = build_ui.output_types(object_info[nodes[src]["type"]])
        assert out_types[src_slot] == kind, f"link {link_id}: type {kind} but the source outputs {out_types[src_slot]}"
        target = nodes[dst]["inputs"][dst_slot]
        assert target["link"] == link_id, f"link {link_id}: target slot {dst_slot} of node {dst} holds {target['link']}"
        assert target["type"] in (kind, "*"), f"link {link_id}: {kind} into input {target['name']!r} of type {target['type']}"
        assert link_id in nodes[src]["outputs"][src_slot]["links"], f"link {link_id}: missing from its source output"


@pytest.mark.parametrize("ui_path", GENERATED, ids=[p.stem for p in GENERATED])
def test_generated_ui_workflow_matches_object_info(object_info, ui_path):
    check_ui_structure(_load(ui_path), object_info)


@pytest.mark.parametrize("ui_path", GENERATED, ids=[p.stem for p in GENERATED])
def test_ui_workflow_round_trips_to_its_api_twin(object_info, ui_path):
    api = build_ui.ui_to_api(_load(ui_path), object_info)
    assert build_ui.strip_meta(api) == build_ui.strip_meta(_api_twin(ui_path))


@pytest.mark.parametrize("ui_path", GENERATED, ids=[p.stem for p in GENERATED])
def test_ui_workflow_is_up_to_date(object_info, ui_path):
    expected = build_ui.api_to_ui(_api_twin(ui_path), object_info, ui_path.stem + build_ui.API_SUFFIX)
    assert _load(ui_path) == expected, (f"{ui_path.name} is stale: run python workflows/build_ui.py --server URL "
                                        "(or drop extra.comfy_poe_generated_from if it is edited by hand now)")


@pytest.mark.parametrize("ui_path", HAND_MADE, ids=[p.stem for p in HAND_MADE])
def test_hand_made_ui_workflow_matches_object_info(object_info, ui_path):
    ui = _load(ui_path)
    check_ui_structure(ui, object_info)
    build_ui.ui_to_api(ui, object_info)  # converts without error


def test_every_api_workflow_has_a_generated_twin():
    for api_path in build_ui.api_workflows(WORKFLOWS):
        twin = build_ui.ui_twin_path(api_path)
        assert twin in GENERATED, f"{api_path.name}: no generated UI twin {twin.name}"


def test_round_trip_detects_a_widget_shift(object_info):
    """The round trip is sensitive to widget order: dropping a seed's control value breaks it."""
    ui_path = next(p for p in GENERATED if p.stem == "poe_all_in_one")
    ui = _load(ui_path)
    sampler = next(n for n in ui["nodes"] if n["type"] == "PoESample")
    seed_pos = sampler["widgets_values"].index("fixed")
    del sampler["widgets_values"][seed_pos]
    with pytest.raises(AssertionError):
        check_ui_structure(ui, object_info)
    sampler["widgets_values"].append(0)  # right length again, but every value after the seed moved by one
    with pytest.raises(AssertionError):
        check_ui_structure(ui, object_info)
    assert build_ui.strip_meta(build_ui.ui_to_api(ui, object_info)) != build_ui.strip_meta(_api_twin(ui_path))
