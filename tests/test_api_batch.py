"""comfy_poe.api_batch without ComfyUI: override parsing / matching, server lists, manifest writing, and whole
batches against fake ComfyUI servers (aiohttp.test_utils.TestServer on 127.0.0.1, one event loop in a thread):
one server with and without websocket, a server that dies mid-batch (its jobs re-queued on the other), no
retry for jobs that fail on their own inputs, bounded retries, --resume, exactly-once manifests, uploads of
local images, the per-server limit, the CLI's exit codes / dry run / help."""
import asyncio
import json
import os
import socket
import sys
import threading
import time

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402
from aiohttp.test_utils import TestServer  # noqa: E402

from comfy_poe import api_batch  # noqa: E402
from comfy_poe.api_batch import (  # noqa: E402
    BatchError, ServerDown, apply_overrides, load_servers, load_workflow, main, parse_jobs, resolve_key, run_batch,
    write_json_atomic,
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
    "12": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
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


def test_load_servers(tmp_path):
    assert load_servers(None, None, 2) == [("http://127.0.0.1:8188", 2)]
    listing = tmp_path / "servers.txt"
    listing.write_text("# gpus\nhttp://10.0.0.2:8188 4\n\nhttps://10.0.0.3:8188/\n")
    assert load_servers(["http://a:1/"], str(listing), 3) == [
        ("http://a:1", 3), ("http://10.0.0.2:8188", 4), ("https://10.0.0.3:8188", 3)]
    with pytest.raises(BatchError, match=r"servers.txt:2: .*limit must be a positive integer"):
        listing.write_text("http://a:1\nhttp://b:1 zero\n")
        load_servers(None, str(listing), 2)
    with pytest.raises(BatchError, match="listed twice"):
        load_servers(["http://a:1", "http://a:1/"], None, 2)
    with pytest.raises(BatchError, match="expected http://host:port"):
        load_servers(["ftp://a"], None, 2)


# --------------------------------------------------------------------------- fake ComfyUI


class FakeComfy:
    """/queue, /prompt (validates KSampler.steps >= 1), /history/<id>, /upload/image and /ws like ComfyUI: one
    prompt executes at a time (``delay`` s), status messages carry queue_remaining, the history entry appears
    just before the final 'executing node=None' message, as in ComfyUI's prompt_worker. ``die_on=k``: the
    server goes away (websockets closed, port closed) when it starts executing its k-th prompt."""

    def __init__(self, websocket=True, die_on=None, delay=0.02):
        self.websocket, self.die_on, self.delay = websocket, die_on, delay
        self.received, self.executed, self.uploads = [], [], []
        self.history, self.sockets = {}, {}
        self.max_queued = 0
        self.dead = False

    async def start(self):
        app = web.Application()
        app.router.add_get("/queue", self.get_queue)
        app.router.add_post("/prompt", self.post_prompt)
        app.router.add_get("/history/{pid}", self.get_history)
        app.router.add_post("/upload/image", self.upload)
        app.router.add_get("/ws", self.ws)
        self.queue = asyncio.Queue()
        self.pending = []
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        self.url = str(self.server.make_url("")).rstrip("/")
        self.worker = asyncio.ensure_future(self.work())

    async def get_queue(self, request):
        return web.json_response({"queue_running": [], "queue_pending": [[0, p] for p in self.pending]})

    async def get_history(self, request):
        pid = request.match_info["pid"]
        return web.json_response({pid: self.history[pid]} if pid in self.history else {})

    async def upload(self, request):
        post = await request.post()
        image = post["image"]
        self.uploads.append((post.get("subfolder"), image.filename, image.file.read()))
        return web.json_response({"name": image.filename, "subfolder": post.get("subfolder", ""), "type": "input"})

    async def broadcast_status(self):
        data = {"status": {"exec_info": {"queue_remaining": len(self.pending)}}}
        for sock in list(self.sockets.values()):
            if not sock.closed:
                await sock.send_json({"type": "status", "data": data})

    async def post_prompt(self, request):
        body = await request.json()
        self.received.append(body)
        prompt = body["prompt"]
        steps = prompt["5"]["inputs"]["steps"]
        if not isinstance(steps, int) or steps < 1:
            return web.json_response({
                "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                          "details": "", "extra_info": {}},
                "node_errors": {"5": {"errors": [{"type": "value_smaller_than_min",
                                                  "message": "Value 0 smaller than min of 1",
                                                  "details": "steps", "extra_info": {"input_name": "steps"}}],
                                      "dependent_outputs": ["7"], "class_type": "KSampler"}}}, status=400)
        pid = body.get("prompt_id") or f"p{len(self.received)}"
        self.pending.append(pid)
        self.max_queued = max(self.max_queued, len(self.pending))
        await self.queue.put((pid, prompt, body["client_id"]))
        await self.broadcast_status()
        return web.json_response({"prompt_id": pid, "number": len(self.received), "node_errors": {}})

    async def ws(self, request):
        if not self.websocket:
            raise web.HTTPNotFound()
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        self.sockets[request.query["clientId"]] = sock
        await sock.send_bytes(b"\x00\x01preview")  # binary previews must be ignored
        await self.broadcast_status()
        async for _ in sock:
            pass
        self.sockets.pop(request.query["clientId"], None)
        return sock

    async def kill(self):
        self.dead = True
        for sock in list(self.sockets.values()):
            await sock.close()
        await self.server.close()

    async def work(self):
        while True:
            pid, prompt, client_id = await self.queue.get()
            if self.die_on is not None and len(self.executed) + 1 >= self.die_on:
                await self.kill()
                return
            sock = self.sockets.get(client_id)
            sampler = prompt["5"]["inputs"]
            steps, seed = sampler["steps"], sampler["seed"]
            now = int(time.time() * 1000)
            events = [("execution_start", {"prompt_id": pid, "timestamp": now})]
            events += [("progress", {"value": i, "max": steps, "prompt_id": pid, "node": "5"})
                       for i in range(1, steps + 1)]
            if seed == FAIL_SEED:
                error = {"prompt_id": pid, "node_id": "5", "node_type": "KSampler", "exception_type": "RuntimeError",
                         "exception_message": "boom: bad seed\n", "timestamp": now + 5}
                events.append(("execution_error", error))
                entry = {"outputs": {}, "status": {"status_str": "error", "completed": False,
                                                   "messages": [list(events[0]), ["execution_error", error]]}}
            else:
                name = f"{prompt['7']['inputs']['filename_prefix']}_{seed:05d}_.png"
                done = {"prompt_id": pid, "timestamp": now + 7}
                events.append(("execution_success", done))
                entry = {"outputs": {"7": {"images": [{"filename": name, "subfolder": "", "type": "output"}]}},
                         "status": {"status_str": "success", "completed": True,
                                    "messages": [list(events[0]), ["execution_success", done]]}}
            await asyncio.sleep(self.delay)
            if sock is not None and not sock.closed:
                for kind, data in events:
                    await sock.send_json({"type": kind, "data": data})
            self.history[pid] = entry
            self.executed.append((pid, prompt))
            self.pending.remove(pid)
            if sock is not None and not sock.closed:
                await sock.send_json({"type": "executing", "data": {"node": None, "prompt_id": pid}})
            await self.broadcast_status()


class FakeServers:
    """Fake ComfyUI servers on one event loop in a background thread (the batch runner runs its own loop)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.fakes = []

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def start(self, **kwargs) -> FakeComfy:
        fake = FakeComfy(**kwargs)
        self.call(fake.start())
        self.fakes.append(fake)
        return fake

    def close(self):
        for fake in self.fakes:
            fake.worker.cancel()
            if not fake.dead:
                self.call(fake.kill())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture
def servers():
    pool = FakeServers()
    yield pool
    pool.close()


@pytest.fixture(params=[True, False], ids=["websocket", "polling"])
def fake(request, servers):
    return servers.start(websocket=request.param)


JOBS = [
    '{"id": "s1", "set": {"KSampler.seed": 1, "Positive.text": "a red cat"}}',
    '{"id": "s2", "set": {"5.seed": 2}}',
    '{"id": "bad-steps", "set": {"KSampler.steps": 0}}',
    '{"id": "boom", "set": {"KSampler.seed": %d}}' % FAIL_SEED,
    '{"id": "typo", "set": {"KSampler.sead": 3}}',
    '{"id": "s3", "set": {"KSampler.seed": 3, "KSampler.steps": 5}}',
]


def seed_jobs(n):
    return parse_jobs([json.dumps({"id": f"j{i}", "set": {"KSampler.seed": 100 + i}}) for i in range(n)])


def test_run_batch_against_fake_server(fake, tmp_path):
    logs = []
    out = tmp_path / "manifest.json"
    manifest = run_batch([fake.url], WORKFLOW, parse_jobs(JOBS), str(out), timeout=30, poll_interval=0.1,
                         log=logs.append, verbose=True)
    assert json.loads(out.read_text()) == manifest and manifest["complete"]
    jobs = {j["id"]: j for j in manifest["jobs"]}
    assert list(jobs) == ["s1", "s2", "bad-steps", "boom", "typo", "s3"]
    assert manifest["summary"] == {"failed": 1, "invalid": 1, "rejected": 1, "success": 3}
    assert manifest["servers"] == [{"url": fake.url, "limit": 2, "alive": True, "error": None, "jobs_done": 3}]
    for job_id, seed in (("s1", 1), ("s2", 2), ("s3", 3)):
        job = jobs[job_id]
        assert job["status"] == "success" and job["error"] is None and job["prompt_id"]
        assert job["server"] == fake.url and job["attempts"] == []
        assert job["outputs"] == [{"node": "7", "kind": "images", "filename": f"smoke_{seed:05d}_.png",
                                   "subfolder": "", "type": "output"}]
        assert job["timings"]["run_s"] == pytest.approx(0.007) and job["timings"]["total_s"] >= 0
    assert jobs["s1"]["overrides"] == {"5.seed": 1, "2.text": "a red cat"}
    # what the server received: the overrides applied, the template otherwise unchanged, our client id
    sent = {b["prompt_id"]: b["prompt"] for b in fake.received}
    assert sent[jobs["s1"]["prompt_id"]]["2"]["inputs"]["text"] == "a red cat"
    assert sent[jobs["s1"]["prompt_id"]]["3"]["inputs"]["text"] == "blurry"
    assert sorted(p["5"]["inputs"]["seed"] for p in sent.values()) == [1, 1, 2, 3, FAIL_SEED]
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
        assert "[s3] 5 (KSampler): 5/5" in progress and f"[s1] running on {fake.url}" in logs
    else:
        assert progress == [] and any("polling /history instead" in m for m in logs)


def test_dead_server_jobs_go_to_the_other_exactly_once(servers, tmp_path):
    """Server A dies when it starts its 3rd prompt: the jobs it held are re-queued on B; every job ends
    success, once, with its outputs, and the lost tries are listed."""
    a = servers.start(die_on=3, delay=0.05)
    b = servers.start(delay=0.05)
    logs = []
    out = tmp_path / "m.json"
    manifest = run_batch([a.url, b.url], WORKFLOW, seed_jobs(10), str(out), timeout=60, poll_interval=0.1,
                         log=logs.append)
    assert json.loads(out.read_text()) == manifest
    ids = [j["id"] for j in manifest["jobs"]]
    assert ids == [f"j{i}" for i in range(10)]  # each job once, in job-file order
    assert manifest["summary"] == {"success": 10}
    state = {s["url"]: s for s in manifest["servers"]}
    assert state[a.url]["alive"] is False and state[b.url]["alive"] is True
    # A ran 2 prompts before it died; a result it had not handed over yet is lost with it (run again on B)
    assert 1 <= state[a.url]["jobs_done"] <= 2 and state[a.url]["jobs_done"] + state[b.url]["jobs_done"] == 10
    executed = {a.url: {pid for pid, _ in a.executed}, b.url: {pid for pid, _ in b.executed}}
    lost = [j for j in manifest["jobs"] if j["attempts"]]
    assert lost and all(j["server"] == b.url and j["attempts"][0]["server"] == a.url for j in lost)
    for job in manifest["jobs"]:
        assert job["prompt_id"] in executed[job["server"]]  # the listed run is the one that executed
        seed = 100 + int(job["id"][1:])
        assert job["outputs"][0]["filename"] == f"smoke_{seed:05d}_.png"
    # B ran each job at most once, and only the ones A did not deliver; A's queue died with it
    seeds_b = [p["5"]["inputs"]["seed"] for _, p in b.executed]
    assert len(seeds_b) == len(set(seeds_b)) == state[b.url]["jobs_done"]
    assert len(a.executed) == 2
    assert any("stopped answering" in m for m in logs)


def test_no_retry_when_the_job_itself_fails(servers, tmp_path):
    a, b = servers.start(), servers.start()
    jobs = parse_jobs(JOBS)
    manifest = run_batch([a.url, b.url], WORKFLOW, jobs, str(tmp_path / "m.json"), timeout=30, poll_interval=0.1,
                         log=lambda _m: None)
    by_id = {j["id"]: j for j in manifest["jobs"]}
    assert by_id["bad-steps"]["status"] == "rejected" and by_id["boom"]["status"] == "failed"
    received = [b_["prompt"]["5"]["inputs"] for fake in (a, b) for b_ in fake.received]
    assert sum(r["steps"] == 0 for r in received) == 1  # rejected once, never sent again
    assert sum(r["seed"] == FAIL_SEED for r in received) == 1  # failed once, never sent again
    assert all(j["attempts"] == [] for j in manifest["jobs"])
    assert {j["server"] for j in manifest["jobs"] if j["status"] == "success"} <= {a.url, b.url}


def test_retries_are_bounded(servers, tmp_path):
    """With --retries 0 the jobs a dead server held end as error (not re-queued), the others run on B."""
    a = servers.start(die_on=1, delay=0.05)
    b = servers.start(delay=0.05)
    manifest = run_batch([(a.url, 1), (b.url, 1)], WORKFLOW, seed_jobs(4), str(tmp_path / "m.json"), retries=0,
                         timeout=30, poll_interval=0.1, log=lambda _m: None)
    by_status = {}
    for job in manifest["jobs"]:
        by_status.setdefault(job["status"], []).append(job)
    assert len(by_status["error"]) == 1 and len(by_status["success"]) == 3
    err = by_status["error"][0]
    assert err["attempts"][0]["server"] == a.url and "--retries 0" in err["error"]["message"]
    # all servers gone: what is left ends as error, nothing waits forever
    c = servers.start(die_on=1)
    manifest = run_batch([c.url], WORKFLOW, seed_jobs(2), None, retries=5, timeout=30, poll_interval=0.1,
                         log=lambda _m: None)
    assert manifest["summary"] == {"error": 2}


def test_resume_skips_jobs_done(servers, tmp_path):
    a = servers.start(die_on=3, delay=0.05)
    out = tmp_path / "m.json"
    first = run_batch([(a.url, 1)], WORKFLOW, seed_jobs(5), str(out), timeout=30, poll_interval=0.1,
                      log=lambda _m: None)
    assert first["summary"] == {"error": 3, "success": 2}
    b = servers.start()
    previous = api_batch.load_resume(str(out))
    jobs = seed_jobs(5)
    jobs[1].overrides = {"KSampler.seed": 999}  # changed since: runs again
    second = run_batch([b.url], WORKFLOW, jobs, str(out), resume=previous, timeout=30, poll_interval=0.1,
                       log=lambda _m: None)
    assert second["summary"] == {"success": 5} and [j["id"] for j in second["jobs"]] == [f"j{i}" for i in range(5)]
    done_first = {j["id"]: j for j in first["jobs"] if j["status"] == "success"}
    assert set(done_first) == {"j0", "j1"}
    assert second["jobs"][0] == done_first["j0"]  # kept as it was (server A, same prompt id)
    seeds_b = sorted(p["5"]["inputs"]["seed"] for _, p in b.executed)
    assert seeds_b == [102, 103, 104, 999]  # j0 skipped; j1 re-run with its new seed


def test_local_images_are_uploaded_once_per_server(servers, tmp_path):
    a = servers.start()
    image = tmp_path / "cat.png"
    image.write_bytes(b"\x89PNG fake bytes")
    lines = [json.dumps({"id": f"u{i}", "set": {"LoadImage.image": str(image), "5.seed": 10 + i}})
             for i in range(3)]
    lines.append(json.dumps({"id": "named", "set": {"LoadImage.image": "already_on_server.png"}}))
    manifest = run_batch([a.url], WORKFLOW, parse_jobs(lines), None, timeout=30, poll_interval=0.1,
                         log=lambda _m: None)
    assert manifest["summary"] == {"success": 4}
    assert len(a.uploads) == 1
    subfolder, name, data = a.uploads[0]
    assert subfolder == "comfy_poe_batch" and name.endswith("_cat.png") and data == image.read_bytes()
    images = {b["prompt"]["5"]["inputs"]["seed"]: b["prompt"]["12"]["inputs"]["image"] for b in a.received}
    assert images[10] == images[11] == images[12] == f"comfy_poe_batch/{name}"
    assert images[1] == "already_on_server.png"  # a name, not a local file: sent as it is
    assert manifest["jobs"][0]["uploads"] == {"12.image": str(image)}


def test_per_server_limit(servers, tmp_path):
    a = servers.start(delay=0.05)
    b = servers.start(delay=0.05)
    manifest = run_batch([(a.url, 1), (b.url, 3)], WORKFLOW, seed_jobs(12), None, timeout=30, poll_interval=0.1,
                         log=lambda _m: None)
    assert manifest["summary"] == {"success": 12}
    assert a.max_queued == 1 and b.max_queued <= 3
    assert len(b.executed) > len(a.executed) >= 1


def test_cli_exit_codes_dry_run_and_help(fake, tmp_path, capsys):
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
    # --resume: the successes of that run are kept, only the others are sent again
    received = len(fake.received)
    assert main(["--server", fake.url, *base[:4], "--resume", str(out), "--poll", "0.1", "--quiet"]) == 1
    assert len(fake.received) - received == 2  # bad-steps and boom again; s1, s2, s3 skipped
    # nothing listening: exit 2 before anything is queued
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    out.unlink()
    capsys.readouterr()
    assert main(["--server", dead, *base]) == 2 and not out.exists()
    assert "cannot reach ComfyUI" in capsys.readouterr().err
    # dry run: exit 1 when a job is invalid, 0 when all are valid
    assert main(["--server", dead, *base, "--dry-run"]) == 1
    captured = capsys.readouterr()
    lines = [json.loads(x) for x in captured.out.splitlines()]
    assert lines[1]["prompt"]["5"]["inputs"]["seed"] == 2 and "has no input 'sead'" in lines[4]["error"]
    assert "1 of 6 job(s) invalid" in captured.err
    jobs.write_text("\n".join(JOBS[:2]) + "\n")
    assert main(["--server", dead, *base, "--dry-run"]) == 0
    jobs.write_text('{"id": "x", "set": {}}\n{oops\n')
    assert main(["--server", fake.url, *base]) == 2
    assert "jobs.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_help_text(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m comfy_poe.api_batch ")
    assert "``" not in text and "--server URL" in text and "--resume MANIFEST" in text
    with pytest.raises(SystemExit) as exit_info:
        main(["--workflow", "w.json", "--overrides", "j.jsonl"])
    assert exit_info.value.code == 2 and "--out is required" in capsys.readouterr().err


def test_missing_aiohttp_names_the_extra(tmp_path, monkeypatch, capsys):
    wf = tmp_path / "wf_api.json"
    wf.write_text(json.dumps(WORKFLOW))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(JOBS[0] + "\n")
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # import aiohttp -> ImportError
    assert main(["--workflow", str(wf), "--overrides", str(jobs), "--out", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err
    assert "'batch' extra" in err and "missing: aiohttp" in err and "[batch]" in err and "ComfyUI's own Python" in err
    assert not os.path.exists(tmp_path / "m.json")


@pytest.mark.parametrize("bad", [["--out", "{dir}"], ["--out", "{file}/m.json"], ["--timeout", "nan"],
                                 ["--poll", "0"], ["--per-server", "0"], ["--retries", "-1"]])
def test_bad_options_are_refused_before_any_job(tmp_path, capsys, bad):
    wf = tmp_path / "wf_api.json"
    wf.write_text(json.dumps(WORKFLOW))
    args = ["--server", "http://127.0.0.1:9", "--workflow", str(wf), "--overrides", str(tmp_path / "j.jsonl"),
            "--out", str(tmp_path / "m.json")]
    args += [v.format(dir=tmp_path, file=wf) for v in bad]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and (bad[0] in err or "manifest" in err), err
