"""Dev tool: open every UI workflow in the real ComfyUI frontend (headless Chromium) and check how it reads.

For each ``workflows/<name>.json`` (fetched from the server's template route, as the template browser does)
it loads the graph with ``app.loadGraphData``, runs the frontend's Fit View (``ds.fitToBounds`` over every
node's bounding box, zoom 0.75) in a laptop-sized window, and checks:

- no dialog opened and the graph has all its nodes;
- at Fit View the canvas is not in low-quality mode (the frontend hides all text below
  ``MinFontSizeForLOD / NODE_TEXT_SIZE`` zoom);
- no two nodes overlap (title bar included) and each node lies inside the groups it belongs to, and
  groups do not overlap;
- node titles are distinct;
- each node is at least as large as the frontend's own ``computeSize()`` (so the saved size hides no widget).

It writes a screenshot per workflow (``--shots DIR``) and, with ``--thumbnails``, the template thumbnail
``workflows/<name>.jpg`` that the template browser shows (it asks for ``/api/workflow_templates/<pack>/<name>.jpg``).
With ``--templates-shot FILE`` it also opens the template browser and saves a screenshot of it.

    /path/to/ComfyUI/venv/bin/python workflows/check_frontend.py --server http://127.0.0.1:8188 \\
        --shots /tmp/shots --thumbnails

Needs Chromium (Debian: ``apt-get install chromium``) and aiohttp + Pillow, which ComfyUI's own venv has.
Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKFLOWS_DIR = Path(__file__).resolve().parent
WINDOW = (1800, 1100)  # a laptop browser window
THUMBNAIL_SIZE = 512  # square: the template browser's cards are square (object-cover)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--hide-scrollbars",
                  "--mute-audio", "--no-default-browser-check"]

# Runs in the page: load one workflow, Fit View, and report what the frontend made of it.
LOAD_JS = r"""
async ([pack, name]) => {
  const res = await fetch(`/api/workflow_templates/${pack}/${name}.json`);
  if (!res.ok) return {error: `GET ${name}.json: ${res.status}`};
  const wf = await res.json();
  const before = new Set(document.querySelectorAll('.p-dialog'));  // dialogs already open (closing ones too)
  await app.loadGraphData(wf, true, true, name);
  await new Promise(r => setTimeout(r, 1000));
  const c = app.canvas, nodes = app.graph.nodes;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of nodes) { const b = n.boundingRect; x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]);
    x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]); }
  c.ds.fitToBounds([x0 - 10, y0 - 10, x1 - x0 + 20, y1 - y0 + 20]);   // what Fit View does
  c.setDirty(true, true); c.draw(true, true);
  if (c.updateLowQualityThreshold) c.updateLowQualityThreshold();
  c.draw(true, true);
  await new Promise(r => setTimeout(r, 300));
  for (const g of app.graph.groups) { const b = g._bounding || g.bounding; x0 = Math.min(x0, b[0]);
    y0 = Math.min(y0, b[1]); x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]); }
  const s = c.ds.scale, o = c.ds.offset, m = 16;
  return {
    screen_box: [(x0 + o[0]) * s - m, (y0 + o[1]) * s - m, (x1 - x0) * s + 2 * m, (y1 - y0) * s + 2 * m],
    scale: c.ds.scale, low_quality: c.low_quality, threshold: c._lowQualityZoomThreshold,
    canvas: [c.canvas.width / devicePixelRatio, c.canvas.height / devicePixelRatio],
    dialogs: [...document.querySelectorAll('.p-dialog')].filter(d => !before.has(d)).length,  // new ones only
    expected_nodes: wf.nodes.length,
    nodes: nodes.map(n => ({id: n.id, type: n.type, title: n.title, box: Array.from(n.boundingRect),
                            size: Array.from(n.size), min: Array.from(n.computeSize())})),
    groups: app.graph.groups.map(g => ({title: g.title, box: Array.from(g._bounding || g.bounding)})),
  };
}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overlaps(a, b, gap: float = 0.0) -> bool:
    """Boxes [x, y, w, h] intersect (closer than ``gap``)."""
    return (a[0] < b[0] + b[2] + gap and b[0] < a[0] + a[2] + gap and
            a[1] < b[1] + b[3] + gap and b[1] < a[1] + a[3] + gap)


def inside(inner, outer) -> bool:
    return (inner[0] >= outer[0] and inner[1] >= outer[1] and
            inner[0] + inner[2] <= outer[0] + outer[2] and inner[1] + inner[3] <= outer[1] + outer[3])


def problems(name: str, report: dict) -> list[str]:
    """Everything that makes the loaded workflow hard to read (empty = fine)."""
    if "error" in report:
        return [f"{name}: {report['error']}"]
    found = []
    if report["dialogs"]:
        found.append(f"{name}: {report['dialogs']} dialog(s) opened on load")
    if len(report["nodes"]) != report["expected_nodes"]:
        found.append(f"{name}: {len(report['nodes'])} nodes on the canvas, {report['expected_nodes']} in the file")
    if report["low_quality"]:
        found.append(f"{name}: Fit View zooms to {report['scale']:.2f} < {report['threshold']:.2f}: text is hidden")
    nodes = report["nodes"]
    for a, b in itertools.combinations(nodes, 2):
        if overlaps(a["box"], b["box"]):
            found.append(f"{name}: nodes {a['id']} ({a['title']}) and {b['id']} ({b['title']}) overlap")
    titles = [n["title"] for n in nodes]
    for title in sorted({t for t in titles if titles.count(t) > 1}):
        found.append(f"{name}: {titles.count(title)} nodes are titled {title!r}")
    for n in nodes:
        if n["size"][0] + 0.5 < n["min"][0] or n["size"][1] + 0.5 < n["min"][1]:
            found.append(f"{name}: node {n['id']} ({n['title']}) is {n['size']}, smaller than its content {n['min']}")
    groups = report["groups"]
    for a, b in itertools.combinations(groups, 2):
        if overlaps(a["box"], b["box"]):
            found.append(f"{name}: groups {a['title']!r} and {b['title']!r} overlap")
    for n in nodes:
        for g in groups:
            if overlaps(n["box"], g["box"]) and not inside(n["box"], g["box"]):
                found.append(f"{name}: node {n['id']} ({n['title']}) sticks out of group {g['title']!r}")
    return found


def write_thumbnail(canvas_image, box, out: Path) -> None:
    """The graph (``box`` in canvas pixels) cropped from the canvas, centred on a square of the canvas
    background (the template browser shows square cards), as ``out`` (JPEG, written atomically)."""
    from PIL import Image

    image = canvas_image.convert("RGB")
    x, y, w, h = (int(round(v)) for v in box)
    graph = image.crop((max(x, 0), max(y, 0), min(x + w, image.width), min(y + h, image.height)))
    side = max(graph.size)
    square = Image.new("RGB", (side, side), image.getpixel((2, image.height - 3)))
    square.paste(graph, ((side - graph.width) // 2, (side - graph.height) // 2))
    square = square.resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.LANCZOS)
    tmp = out.with_name(out.name + ".tmp")
    square.save(tmp, "JPEG", quality=85, optimize=True)
    os.replace(tmp, out)


class Page:
    """The smallest Chrome DevTools Protocol client that does the job (aiohttp websocket)."""

    def __init__(self, ws):
        self.ws, self.ids = ws, itertools.count(1)

    async def call(self, method: str, **params):
        msg_id = next(self.ids)
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=120)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def eval(self, expression: str, arg=None):
        if arg is not None:
            expression = f"({expression})({json.dumps(arg)})"
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result["result"].get("value")

    async def screenshot(self, fmt: str = "png", quality: int = 90) -> bytes:
        params = {"format": fmt}
        if fmt == "jpeg":
            params["quality"] = quality
        return base64.b64decode((await self.call("Page.captureScreenshot", **params))["data"])


async def run(server: str, names: list[str], pack: str, shots: Path | None, thumbnails: bool,
              templates_shot: Path | None, chromium: str) -> list[str]:
    import aiohttp
    from PIL import Image

    port, profile = free_port(), tempfile.mkdtemp(prefix="comfy_poe_chromium_")
    proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                             f"--remote-debugging-port={port}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    found: list[str] = []
    try:
        async with aiohttp.ClientSession(trust_env=False) as http:
            for _ in range(100):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                        targets = [t for t in await resp.json() if t.get("type") == "page"]
                    if targets:
                        break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.3)
            else:
                raise RuntimeError("Chromium did not start")
            async with http.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                await page.call("Page.enable")
                await page.call("Emulation.setDeviceMetricsOverride", width=WINDOW[0], height=WINDOW[1],
                                deviceScaleFactor=1, mobile=False)
                await page.call("Page.navigate", url=server)
                t0 = time.monotonic()
                while not await page.eval("!!(window.app && app.graph && app.canvas && window.LiteGraph && "
                                          "Object.keys(LiteGraph.registered_node_types).length > 50)"):
                    if time.monotonic() - t0 > 120:
                        raise RuntimeError("the frontend did not finish loading in 120 s")
                    await asyncio.sleep(0.5)
                await asyncio.sleep(2)
                await page.eval("document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click())")
                for name in names:
                    report = await page.eval(LOAD_JS, [pack, name])
                    issues = problems(name, report)
                    found += issues
                    print(f"{name}: {len(report.get('nodes', []))} nodes, {len(report.get('groups', []))} groups, "
                          f"Fit View scale {report.get('scale', 0):.2f} (text hidden below "
                          f"{report.get('threshold', 0):.2f}) — {'OK' if not issues else 'PROBLEMS'}")
                    for line in issues:
                        print("   ", line)
                    if shots:
                        shots.mkdir(parents=True, exist_ok=True)
                        (shots / f"{name}.png").write_bytes(await page.screenshot())
                        (shots / f"{name}.json").write_text(json.dumps(report, indent=1))
                    if thumbnails and "screen_box" in report:
                        data = await page.eval("app.canvas.canvas.toDataURL('image/png')")
                        write_thumbnail(Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1]))),
                                        report["screen_box"], WORKFLOWS_DIR / f"{name}.jpg")
                if templates_shot:
                    await page.eval("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
                    await asyncio.sleep(2)
                    await page.eval(f"""(() => {{ for (const el of document.querySelectorAll('button, li, a, div'))
                        if (el.children.length < 3 && el.textContent.trim() === {json.dumps(pack)}) {{ el.click(); return true; }}
                        return false; }})()""")
                    await asyncio.sleep(3)
                    templates_shot.parent.mkdir(parents=True, exist_ok=True)
                    templates_shot.write_bytes(await page.screenshot())
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True, help="a running ComfyUI with this pack loaded")
    parser.add_argument("--pack", default=None, help="the pack's folder name under custom_nodes (default: "
                        "the only one /workflow_templates lists these workflows under)")
    parser.add_argument("--shots", type=Path, help="folder for a screenshot + a JSON report per workflow")
    parser.add_argument("--thumbnails", action="store_true", help="write workflows/<name>.jpg")
    parser.add_argument("--templates-shot", type=Path, help="screenshot of the template browser")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("names", nargs="*", help="workflow names (default: every workflows/*.json)")
    args = parser.parse_args(argv)
    import urllib.request
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(args.server.rstrip("/") + "/workflow_templates", timeout=30) as resp:
        listed = json.load(resp)
    names = args.names or sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))
    pack = args.pack or next((k for k, v in listed.items() if set(names) <= set(v)), None)
    if pack is None:
        print(f"no pack in /workflow_templates lists {names}: {listed}", file=sys.stderr)
        return 1
    found = asyncio.run(run(args.server.rstrip("/"), names, pack, args.shots, args.thumbnails,
                            args.templates_shot, args.chromium))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
