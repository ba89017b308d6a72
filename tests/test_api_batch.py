"""comfy_poe.api_batch without ComfyUI: override parsing / matching, manifest writing, websocket frames,
and whole batches against a small fake ComfyUI (http.server on 127.0.0.1, real RFC 6455 handshake)."""
import base64
import hashlib
import json
import os
import queue
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from comfy_poe import api_batch
from comfy_poe.api_batch import (
    BatchError, apply_overrides, decode_frame, encode_frame, load_workflow, main, parse_jobs, resolve_key,
    run_batch, write_json_atomic,
)

WORKFLOW = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
    "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]},
          "_meta": {"title": "Positive"}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]},
          "_meta": {"title": "Negative"}},
    "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                               "seed": 1, "steps": 3, "cfg": 7.0}},
    "7": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "smoke"}},
}
FAIL_SEED = 666  # the fake server raises an execution error for this seed


# --------------------------------------------------------------------------- jobs and overrides


def test_parse_jobs_ids_comments_and_errors():
    jobs = parse_jobs(['# comment', '{"id": "a", "set": {"5.seed": 2}}', '', '{"set": {}}'], source="jobs.jsonl")
    assert [(j.id, j.overrides, j.line) for j in jobs] == [("a", {"5.seed": 2}, 2), ("job4", {}, 4)]
    with pytest.raises(BatchError, match=r"jobs.jsonl:2: not valid JSON"):
        parse_jobs(['{"id": "a"}', '{"id": '], source="jobs.jsonl")
    with pytest.raises(BatchError, match=r":2: duplicate job id 'a'"):
        parse_jobs(['{"id": "a"}', '{"id": "a"}'])
    with pytest.raises(BatchError, match=r":1: expected an object with keys"):
        parse_jobs(['{"id": "a", "sett": {}}'])
    with pytest.raises(BatchError, match="'set' must be an object"):
        parse_jobs(['{"set": [1]}'])
    with pytest.raises(BatchError, match="no jobs"):
        parse_jobs(["", "# nothing"])


def test_resolve_key_by_id_class_and_title():
    assert resolve_key(WORKFLOW, "5.seed") == [("5", "seed")]
    assert resolve_key(WORKFLOW, "KSampler.seed") == [("5", "seed")]
    assert resolve_key(WORKFLOW, "CLIPTextEncode.text") == [("2", "text"), ("3", "text")]
    assert resolve_key(WORKFLOW, "Negative.text") == [("3", "text")]


@pytest.mark.parametrize("key, message", [
    ("Sampler.seed", r"no node with id, class_type or title 'Sampler' \(nodes: 1 \(CheckpointLoaderSimple\), "
                     r"2 \(CLIPTextEncode, Positive\)"),
    ("KSampler.sead", r"node 5 \(KSampler\) has no input 'sead' \(inputs: cfg, model, negative"),
    ("9.seed", "no node with id, class_type or title '9'"),
    ("seed", "use '<node id, class or title>.<input name>'"),
    (".seed", "use '<node id"),
])
def test_resolve_key_errors(key, message):
    with pytest.raises(BatchError, match=message):
        resolve_key(WORKFLOW, key)


def test_apply_overrides_copies_and_refuses_cutting_links():
    before = json.dumps(WORKFLOW, sort_keys=True)
    prompt, applied = apply_overrides(WORKFLOW, {"KSampler.seed": 9, "CLIPTextEncode.text": "x",
                                                 "7.filename_prefix": "run/a"})
    assert prompt["5"]["inputs"]["seed"] == 9 and prompt["2"]["inputs"]["text"] == prompt["3"]["inputs"]["text"] == "x"
    assert applied == {"5.seed": 9, "2.text": "x", "3.text": "x", "7.filename_prefix": "run/a"}
    assert json.dumps(WORKFLOW, sort_keys=True) == before  # the template is untouched
    with pytest.raises(BatchError, match="connected to node 1; a constant would cut that link"):
        apply_overrides(WORKFLOW, {"5.model": "x"})
    relinked, _ = apply_overrides(WORKFLOW, {"5.positive": ["3", 0]})
    assert relinked["5"]["inputs"]["positive"] == ["3", 0]


def test_load_workflow_refuses_ui_format(tmp_path):
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    with pytest.raises(BatchError, match="UI workflow; export it in API format"):
        load_workflow(str(ui))
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(BatchError, match="bad.json"):
        load_workflow(str(bad))
    good = tmp_path / "api.json"
    good.write_text(json.dumps(WORKFLOW))
    assert load_workflow(str(good)) == WORKFLOW


# --------------------------------------------------------------------------- manifest writing


def test_write_json_atomic(tmp_path):
    path = tmp_path / "sub" / "manifest.json"
    write_json_atomic(str(path), {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        write_json_atomic(str(path), {"a": object()})  # fails half-way through json.dump
    assert json.loads(path.read_text()) == {"a": 1}  # old content intact
    assert sorted(os.listdir(path.parent)) == ["manifest.json"]  # no temp file left


# --------------------------------------------------------------------------- websocket frames


@pytest.mark.parametrize("size", [0, 5, 125, 126, 300, 65535, 70000])
def test_frame_round_trip(size):
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    frame = encode_frame(0x1, payload, mask=b"\x01\x02\x03\x04")
    assert frame[1] & 0x80  # client frames are masked
    assert decode_frame(frame) == (True, 0x1, payload, len(frame))
    assert decode_frame(frame[:-1] if size else frame[:1]) is None  # incomplete
    assert decode_frame(frame + b"\x81")[3] == len(frame)  # stops at the frame's end


def server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    head += bytes([n]) if n < 126 else bytes([126]) + struct.pack("!H", n)
    return head + payload


# --------------------------------------------------------------------------- fake ComfyUI


class FakeComfy(ThreadingHTTPServer):
    """/queue, /prompt (validates KSampler.steps >= 1), /history/<id> and /ws like ComfyUI: the history
    entry appears just before the final 'executing node=None' message, as in ComfyUI's prompt_worker."""
    daemon_threads = True

    def __init__(self, websocket=True):
        super().__init__(("127.0.0.1", 0), FakeHandler)
        self.websocket = websocket
        self.lock = threading.Lock()
        self.received = []
        self.history = {}
        self.clients = {}
        self.closing = False
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def execute(self, prompt_id, prompt, client_id):
        sampler = prompt["5"]["inputs"]
        steps, seed = sampler["steps"], sampler["seed"]
        now = int(time.time() * 1000)
        events = [("execution_start", {"prompt_id": prompt_id, "timestamp": now})]
        events += [("progress", {"value": i, "max": steps, "prompt_id": prompt_id, "node": "5"})
                   for i in range(1, steps + 1)]
        if seed == FAIL_SEED:
            error = {"prompt_id": prompt_id, "node_id": "5", "node_type": "KSampler", "exception_type": "RuntimeError",
                     "exception_message": "boom: bad seed\n", "timestamp": now + 5}
            events.append(("execution_error", error))
            entry = {"outputs": {}, "status": {"status_str": "error", "completed": False,
                                               "messages": [list(events[0]), ["execution_error", error]]}}
        else:
            name = f"{prompt['7']['inputs']['filename_prefix']}_{seed:05d}_.png"
            done = {"prompt_id": prompt_id, "timestamp": now + 7}
            events.append(("execution_success", done))
            entry = {"outputs": {"7": {"images": [{"filename": name, "subfolder": "", "type": "output"}]}},
                     "status": {"status_str": "success", "completed": True,
                                "messages": [list(events[0]), ["execution_success", done]]}}
        with self.lock:
            channel = self.clients.get(client_id)
        if channel is None:
            self.history[prompt_id] = entry
            return
        for kind, data in events:
            channel.put({"type": kind, "data": data})
        channel.put(("publish", prompt_id, entry))
        channel.put({"type": "executing", "data": {"node": None, "prompt_id": prompt_id}})


class FakeHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send_json(self, data, code=200):
        body = json.dumps(data).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/queue":
            return self._send_json({"queue_running": [], "queue_pending": []})
        if self.path.startswith("/history/"):
            pid = self.path.split("/")[-1]
            entry = self.server.history.get(pid)
            return self._send_json({pid: entry} if entry else {})
        if self.path.startswith("/ws?clientId=") and self.server.websocket:
            return self._websocket(self.path.split("=", 1)[1])
        self.send_error(404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["prompt"]
        self.server.received.append(body)
        steps = prompt["5"]["inputs"]["steps"]
        if not isinstance(steps, int) or steps < 1:
            return self._send_json({
                "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                          "details": "", "extra_info": {}},
                "node_errors": {"5": {"errors": [{"type": "value_smaller_than_min",
                                                  "message": "Value 0 smaller than min of 1",
                                                  "details": "steps", "extra_info": {"input_name": "steps"}}],
                                      "dependent_outputs": ["7"], "class_type": "KSampler"}}}, code=400)
        pid = f"p{len(self.server.received)}"
        self._send_json({"prompt_id": pid, "number": 0, "node_errors": {}})
        self.server.execute(pid, prompt, body["client_id"])

    def _websocket(self, client_id):
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + api_batch.WS_GUID).encode()).digest()).decode()
        channel = queue.Queue()
        with self.server.lock:  # registered before the handshake answer: no prompt can slip past it
            self.server.clients[client_id] = channel
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        status = json.dumps({"type": "status", "data": {"sid": client_id}}).encode()
        # a binary preview, a ping and a fragmented text message: all must be handled
        self.wfile.write(server_frame(0x2, b"\x00\x01preview") + server_frame(0x9, b"hi")
                         + server_frame(0x1, status[:10], fin=False) + server_frame(0x0, status[10:]))
        self.wfile.flush()
        try:
            while not self.server.closing:
                try:
                    item = channel.get(timeout=0.05)
                except queue.Empty:
                    continue
                if isinstance(item, tuple):
                    self.server.history[item[1]] = item[2]
                    continue
                self.wfile.write(server_frame(0x1, json.dumps(item).encode()))
                self.wfile.flush()
        except OSError:
            pass


@pytest.fixture(params=[True, False], ids=["websocket", "polling"])
def fake(request):
    server = FakeComfy(websocket=request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.closing = True
    server.shutdown()
    server.server_close()


JOBS = [
    '{"id": "s1", "set": {"KSampler.seed": 1, "Positive.text": "a red cat"}}',
    '{"id": "s2", "set": {"5.seed": 2}}',
    '{"id": "bad-steps", "set": {"KSampler.steps": 0}}',
    '{"id": "boom", "set": {"KSampler.seed": %d}}' % FAIL_SEED,
    '{"id": "typo", "set": {"KSampler.sead": 3}}',
    '{"id": "s3", "set": {"KSampler.seed": 3, "KSampler.steps": 5}}',
]


def test_run_batch_against_fake_server(fake, tmp_path):
    logs = []
    out = tmp_path / "manifest.json"
    manifest = run_batch(fake.url, WORKFLOW, parse_jobs(JOBS), str(out), timeout=30, poll_interval=0.2,
                         log=logs.append)
    assert json.loads(out.read_text()) == manifest and manifest["complete"]
    jobs = {j["id"]: j for j in manifest["jobs"]}
    assert list(jobs) == ["s1", "s2", "bad-steps", "boom", "typo", "s3"]
    assert manifest["summary"] == {"failed": 1, "invalid": 1, "rejected": 1, "success": 3}
    for job_id, seed in (("s1", 1), ("s2", 2), ("s3", 3)):
        job = jobs[job_id]
        assert job["status"] == "success" and job["error"] is None and job["prompt_id"]
        assert job["outputs"] == [{"node": "7", "kind": "images", "filename": f"smoke_{seed:05d}_.png",
                                   "subfolder": "", "type": "output"}]
        timings = job["timings"]
        assert timings["run_s"] == pytest.approx(0.007) and timings["total_s"] >= 0
    assert jobs["s1"]["overrides"] == {"5.seed": 1, "2.text": "a red cat"}
    # what the server received: the overrides applied, the template otherwise unchanged, our client id
    sent = [b["prompt"] for b in fake.received]  # s1, s2, bad-steps, boom, s3
    assert sent[0]["2"]["inputs"]["text"] == "a red cat" and sent[0]["3"]["inputs"]["text"] == "blurry"
    assert [p["5"]["inputs"]["seed"] for p in sent] == [1, 2, 1, FAIL_SEED, 3]
    assert [p["5"]["inputs"]["steps"] for p in sent] == [3, 3, 0, 3, 5]
    assert {b["client_id"] for b in fake.received} == {manifest["client_id"]}
    assert len(fake.received) == 5  # the invalid job was never queued
    rejected = jobs["bad-steps"]
    assert rejected["prompt_id"] is None and "node 5 (KSampler): Value 0 smaller than min of 1: steps" in \
        rejected["error"]["message"]
    assert rejected["node_errors"]["5"]["errors"][0]["type"] == "value_smaller_than_min"
    assert jobs["boom"]["status"] == "failed" and jobs["boom"]["prompt_id"]
    assert jobs["boom"]["error"] == {"message": "boom: bad seed", "node_id": "5", "node_type": "KSampler",
                                     "exception_type": "RuntimeError"}
    assert jobs["typo"]["status"] == "invalid" and "has no input 'sead'" in jobs["typo"]["error"]["message"]
    progress = [m for m in logs if "5 (KSampler): " in m and "/" in m]
    if fake.websocket:
        # step-by-step progress only comes through the websocket
        assert "[s3] 5 (KSampler): 5/5" in progress and "[s1] running" in logs
    else:
        assert progress == [] and any("polling /history instead" in m for m in logs)


def test_cli_exit_codes_and_dry_run(fake, tmp_path, capsys):
    wf = tmp_path / "wf_api.json"
    wf.write_text(json.dumps(WORKFLOW))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(JOBS[:2]) + "\n")
    out = tmp_path / "m.json"
    base = ["--workflow", str(wf), "--overrides", str(jobs), "--out", str(out), "--poll", "0.1", "--quiet"]
    assert main(["--server", fake.url, *base]) == 0
    assert [j["status"] for j in json.loads(out.read_text())["jobs"]] == ["success", "success"]
    jobs.write_text("\n".join(JOBS) + "\n")
    assert main(["--server", fake.url, *base]) == 1
    # nothing listening: exit 2 before anything is queued
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    out.unlink()
    assert main(["--server", dead, *base]) == 2 and not out.exists()
    assert "cannot reach ComfyUI" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["--server", dead, *base, "--dry-run"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[1]["prompt"]["5"]["inputs"]["seed"] == 2 and "has no input 'sead'" in lines[4]["error"]
    jobs.write_text('{"id": "x", "set": {}}\n{oops\n')
    assert main(["--server", fake.url, *base]) == 2
    assert "jobs.jsonl:2: not valid JSON" in capsys.readouterr().err
