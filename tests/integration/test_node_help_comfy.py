"""The running server serves every node's help page where ComfyUI's frontend (1.27) looks for it, and the
schema snapshot the unit test checks the pages against is the live one.

The frontend derives the folder from the node's ``python_module`` (``custom_nodes.<folder>``), asks for
``/extensions/<folder>/docs/<node id>/<locale>.md`` and falls back to ``/extensions/<folder>/docs/<node id>.md``
(see web/build_help.py). Also: the template list offers only the UI workflows, each with its thumbnail.
"""
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from comfy_poe.web import build_help
from comfy_poe.workflows import build_ui

pytestmark = pytest.mark.integration

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(server, path: str) -> tuple[int, bytes, str]:
    try:
        with _OPENER.open(server.url + path, timeout=30) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        return err.code, b"", ""


def _folder(python_module: str) -> str:
    """What the frontend's extractCustomNodeName does: custom_nodes.<folder>[@version] -> folder."""
    parts = python_module.split(".")
    assert len(parts) >= 2 and parts[0] == "custom_nodes", python_module
    return parts[1].split("@")[0]


@pytest.fixture(scope="module")
def pack_nodes(comfy_server) -> dict:
    nodes = comfy_server.pack_nodes()
    assert nodes, "the pack registered no nodes"
    return nodes


def test_schema_snapshot_is_the_live_schema(pack_nodes):
    snapshot = json.loads(build_help.SCHEMAS_PATH.read_text(encoding="utf-8"))
    live = {node_id: build_help.reduce_schema(info) for node_id, info in sorted(pack_nodes.items())}
    assert sorted(live) == sorted(snapshot)
    stale = [node_id for node_id in live if live[node_id] != snapshot[node_id]]
    assert not stale, f"web/node_schemas.json is stale for {stale}: run python web/build_help.py --server URL"


def test_server_serves_every_help_page(comfy_server, pack_nodes):
    for node_id, info in sorted(pack_nodes.items()):
        base = f"/extensions/{_folder(info['python_module'])}/docs/"
        page = build_help.page_path(node_id)
        status, body, _ = _get(comfy_server, f"{base}{node_id}.md")
        assert status == 200, f"{node_id}: GET {base}{node_id}.md -> {status}"
        assert body == page.read_bytes(), f"{node_id}: served page differs from {page}"
        assert body.decode("utf-8").startswith(f"# {info['display_name']}\n")
        # The locale path the frontend tries first is absent, so its fallback (the page above) is used.
        assert _get(comfy_server, f"{base}{node_id}/en.md")[0] == 404


def test_template_list_offers_the_ui_workflows_with_thumbnails(comfy_server):
    folder = comfy_server.pack_link.name
    listed = comfy_server.get_json("/workflow_templates").get(folder, [])
    ui = sorted(p.stem for p in build_ui.WORKFLOWS_DIR.glob("*.json"))
    assert sorted(listed) == ui, "the template list should hold exactly the UI workflows (no *_api twins)"
    for name in listed:
        status, body, kind = _get(comfy_server, f"/api/workflow_templates/{folder}/{name}.json")
        assert status == 200 and "nodes" in json.loads(body), name
        status, body, kind = _get(comfy_server, f"/api/workflow_templates/{folder}/{name}.jpg")
        assert status == 200 and body[:3] == b"\xff\xd8\xff" and kind == "image/jpeg", f"{name}.jpg: {status} {kind}"
