"""Batch runs over one or more ComfyUI servers: one API workflow, one JSONL of overrides, one manifest.

    python -m comfy_poe.api_batch --server http://gpu0:8188 --server http://gpu1:8188 \\
        --workflow workflows/api/X_api.json --overrides jobs.jsonl --out manifest.json

--workflow is an API-format workflow (ComfyUI menu: Export (API)): {node_id: {"class_type", "inputs",
"_meta": {"title"}}}. Each JSONL line is one job:

    {"id": "cat-42", "set": {"5.seed": 42, "KSampler.steps": 20, "Positive.text": "a cat"}}

A key is <selector>.<input name>; the selector is a node id, or else every node whose class_type or title
(_meta.title) equals it. A key that matches no node or no input makes that job invalid (never queued).
A value for the image input of an image-loading node (LoadImage, LoadImageMask) that names a local file is
uploaded to each server through /upload/image before the job is queued there.

Scheduling: each server takes at most --per-server jobs at a time (counting what its own queue already
holds), the next job goes to the server with the most free slots. A server that stops answering (HTTP /
websocket errors and a failed /queue probe) is dropped, and its unfinished jobs are queued again on the
others (at most --retries times per job). A job that fails because of its own inputs (rejected by
ComfyUI's validation, or an error while executing) is not retried. Progress comes from each server's
websocket (/ws?clientId=...), with /history as the authoritative result; the manifest (per job: server,
prompt_id, status, output files, error, timings, lost attempts) is rewritten atomically after every change,
and --resume MANIFEST skips the jobs that manifest lists as success with the same overrides.

HTTP and websocket come from aiohttp (in every ComfyUI environment; elsewhere: pip install 'comfy-poe[batch]').
Exit status: 0 all jobs succeeded, 1 some failed, 2 bad arguments / files / no server reachable.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import copy
import hashlib
import json
import os
import sys
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field

from .cli import nonnegative_int, positive_float, positive_int
from .extras import require_extra
from .fileio import OutputPathError, atomic_write_text, check_output_file

JOB_KEYS = {"id", "set"}
FINAL_STATUSES = ("success", "failed", "interrupted", "rejected", "invalid", "error", "timeout")
# image-loading nodes whose image input may name a local file to upload: class_type -> input names
IMAGE_LOADERS = {"LoadImage": ("image",), "LoadImageMask": ("image",)}
UPLOAD_SUBFOLDER = "comfy_poe_batch"


class BatchError(ValueError):
    """Bad workflow, job file, override, server list or manifest: the message names the file, line or key."""


# --------------------------------------------------------------------------- workflow and overrides


@dataclass
class Job:
    id: str
    overrides: dict
    line: int = 0


def load_workflow(path: str) -> dict:
    """Read an API-format workflow (node id -> {class_type, inputs}); refuses the UI (graph) format."""
    try:
        with open(path, encoding="utf-8") as f:
            workflow = json.load(f)
    except (OSError, ValueError) as err:
        raise BatchError(f"workflow {path}: {err}") from err
    if isinstance(workflow, dict) and "nodes" in workflow and "links" in workflow:
        raise BatchError(f"workflow {path} is a UI workflow; export it in API format (menu: Export (API))")
    if not isinstance(workflow, dict) or not workflow or not all(
            isinstance(n, dict) and isinstance(n.get("class_type"), str) for n in workflow.values()):
        raise BatchError(f"workflow {path} is not an API-format workflow ({{node_id: {{class_type, inputs}}}})")
    return workflow


def parse_jobs(lines, source: str = "<jobs>") -> list[Job]:
    """Jobs from JSONL lines; blank lines and lines starting with '#' are skipped; ids default to job<line>."""
    jobs, seen = [], set()
    for number, text in enumerate(lines, 1):
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{source}:{number}"
        try:
            entry = json.loads(text)
        except ValueError as err:
            raise BatchError(f"{where}: not valid JSON ({err})") from err
        if not isinstance(entry, dict) or set(entry) - JOB_KEYS:
            raise BatchError(f"{where}: expected an object with keys {sorted(JOB_KEYS)}, got {text[:80]}")
        job_id = str(entry.get("id", f"job{number}"))
        overrides = entry.get("set", {})
        if not isinstance(overrides, dict):
            raise BatchError(f"{where}: 'set' must be an object of '<node>.<input>': value")
        if job_id in seen:
            raise BatchError(f"{where}: duplicate job id {job_id!r}")
        seen.add(job_id)
        jobs.append(Job(job_id, overrides, number))
    if not jobs:
        raise BatchError(f"{source}: no jobs (one JSON object per line)")
    return jobs


def load_jobs(path: str) -> list[Job]:
    try:
        with open(path, encoding="utf-8") as f:
            return parse_jobs(f.read().splitlines(), source=path)
    except OSError as err:
        raise BatchError(f"overrides {path}: {err}") from err


def _node_label(workflow: dict, node_id: str) -> str:
    node = workflow[node_id]
    title = node.get("_meta", {}).get("title")
    return f"{node_id} ({node['class_type']}{'' if not title or title == node['class_type'] else ', ' + title})"


def _sorted_ids(ids):
    return sorted(ids, key=lambda i: (0, int(i), "") if str(i).isdigit() else (1, 0, str(i)))


def resolve_key(workflow: dict, key: str) -> list[tuple[str, str]]:
    """"<selector>.<input>" -> [(node id, input name)]: a node id, else all nodes whose class_type or
    _meta.title equals the selector. Raises BatchError when nothing (or a node without that input) matches."""
    if not isinstance(key, str) or "." not in key.strip("."):
        raise BatchError(f"override key {key!r}: use '<node id, class or title>.<input name>', e.g. '5.seed'")
    selector, name = key.rsplit(".", 1)
    if selector in workflow:
        node_ids = [selector]
    else:
        node_ids = [nid for nid, node in workflow.items()
                    if selector in (node["class_type"], node.get("_meta", {}).get("title"))]
    if not node_ids:
        listing = ", ".join(_node_label(workflow, n) for n in _sorted_ids(workflow))
        raise BatchError(f"override {key!r}: no node with id, class_type or title {selector!r} (nodes: {listing})")
    for nid in node_ids:
        inputs = workflow[nid].get("inputs", {})
        if name not in inputs:
            raise BatchError(f"override {key!r}: node {_node_label(workflow, nid)} has no input {name!r} "
                             f"(inputs: {', '.join(sorted(inputs)) or 'none'})")
    return [(nid, name) for nid in _sorted_ids(node_ids)]


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def apply_overrides(workflow: dict, overrides: dict) -> tuple[dict, dict]:
    """A copy of workflow with the overrides set, and {"<node id>.<input>": value} of what was set.

    Replacing a link ([node_id, output]) by a constant is refused: it would silently cut the graph."""
    prompt = copy.deepcopy(workflow)
    applied = {}
    for key, value in overrides.items():
        for nid, name in resolve_key(workflow, key):
            old = prompt[nid]["inputs"][name]
            if _is_link(old) and not _is_link(value):
                raise BatchError(f"override {key!r}: input {name!r} of node {_node_label(workflow, nid)} is "
                                 f"connected to node {old[0]}; a constant would cut that link")
            prompt[nid]["inputs"][name] = copy.deepcopy(value)
            applied[f"{nid}.{name}"] = value
    return prompt, applied


# --------------------------------------------------------------------------- manifest


def write_json_atomic(path: str, data) -> None:
    """Write JSON atomically (see :mod:`comfy_poe.fileio`): readers never see half a file."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def format_rejection(response: dict) -> str:
    """One readable line from a /prompt 400 answer: the error plus each node's input errors."""
    error = response.get("error") or {}
    parts = [error.get("message", "prompt rejected") if isinstance(error, dict) else str(error)]
    if isinstance(error, dict) and error.get("details"):
        parts[0] += f": {error['details']}"
    for nid, info in (response.get("node_errors") or {}).items():
        for e in info.get("errors", []):
            text = f"{e.get('message', '')}: {e.get('details', '')}".strip(": ")
            parts.append(f"node {nid} ({info.get('class_type', '?')}): {text}")
    return "; ".join(parts)


def collect_outputs(entry: dict) -> list[dict]:
    """Files listed by the output nodes of a history entry (images, gifs, audio, ...)."""
    files = []
    for node_id, output in _sorted_items(entry.get("outputs") or {}):
        for kind, items in output.items():
            if isinstance(items, list):
                for item in items:
                    if isinstance(item, dict) and "filename" in item:
                        files.append({"node": node_id, "kind": kind, "filename": item["filename"],
                                      "subfolder": item.get("subfolder", ""), "type": item.get("type", "output")})
    return files


def _sorted_items(mapping: dict):
    return [(k, mapping[k]) for k in _sorted_ids(mapping)]


def summarize_history(entry: dict) -> dict:
    """status, error and server-side timestamps (seconds) from a finished /history entry."""
    status = entry.get("status") or {}
    events = {name: data for name, data in status.get("messages", []) if isinstance(data, dict)}
    result = {"status": "success" if status.get("status_str") == "success" else "failed", "error": None}
    if "execution_interrupted" in events:
        result["status"] = "interrupted"
        data = events["execution_interrupted"]
        result["error"] = {"message": "interrupted", "node_id": data.get("node_id"), "node_type": data.get("node_type")}
    elif "execution_error" in events:
        data = events["execution_error"]
        result["error"] = {"message": data.get("exception_message", "").strip(), "node_id": data.get("node_id"),
                           "node_type": data.get("node_type"), "exception_type": data.get("exception_type")}
    elif result["status"] != "success":
        result["error"] = {"message": f"status {status.get('status_str')!r} without an error message"}
    stamps = {name: data["timestamp"] / 1000.0 for name, data in events.items() if "timestamp" in data}
    result["started"] = stamps.get("execution_start")
    result["finished"] = max(stamps.values()) if stamps else None
    return result


# --------------------------------------------------------------------------- uploads


def local_uploads(workflow: dict, applied: dict) -> dict:
    """{"<node id>.<input>": absolute path} for the overridden image inputs of image-loading nodes whose
    value names an existing local file (those are uploaded; other values are ComfyUI input names)."""
    uploads = {}
    for key, value in applied.items():
        nid, name = key.rsplit(".", 1)
        if (name in IMAGE_LOADERS.get(workflow[nid]["class_type"], ()) and isinstance(value, str)
                and os.path.isfile(value)):
            uploads[key] = os.path.abspath(value)
    return uploads


def upload_name(path: str, data: bytes) -> str:
    """The file name an upload gets on the server: content hash + original name (same file, same name:
    uploads are idempotent and two different files never collide)."""
    return f"{hashlib.sha256(data).hexdigest()[:16]}_{os.path.basename(path)}"


# --------------------------------------------------------------------------- servers


def parse_server(text: str, limit: int) -> tuple[str, int]:
    """'http://host:port' or 'http://host:port LIMIT' -> (base URL, per-server limit)."""
    parts = text.split()
    if not parts or len(parts) > 2:
        raise BatchError(f"server {text!r}: expected 'http://host:port' or 'http://host:port LIMIT'")
    url = parts[0].rstrip("/")
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise BatchError(f"server {text!r}: expected http://host:port")
    if len(parts) == 2:
        try:
            limit = int(parts[1])
        except ValueError:
            limit = 0
        if limit < 1:
            raise BatchError(f"server {text!r}: the limit must be a positive integer")
    return url, limit


def load_servers(values, path: str | None, limit: int) -> list[tuple[str, int]]:
    """Servers from repeated --server values and a servers file (one 'URL [LIMIT]' a line, '#' comments)."""
    entries = [(v, f"--server {v!r}") for v in values or []]
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as err:
            raise BatchError(f"servers file {path}: {err}") from err
        entries += [(line.strip(), f"{path}:{n}") for n, line in enumerate(lines, 1)
                    if line.strip() and not line.strip().startswith("#")]
    servers, seen = [], set()
    for text, where in entries:
        try:
            url, n = parse_server(text, limit)
        except BatchError as err:
            raise BatchError(f"{where}: {err}") from None
        if url in seen:
            raise BatchError(f"{where}: server {url} is listed twice")
        seen.add(url)
        servers.append((url, n))
    return servers or [("http://127.0.0.1:8188", limit)]


def load_resume(path: str) -> dict:
    """{job id: manifest entry} of a previous manifest (--resume)."""
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        return {str(j["id"]): j for j in manifest["jobs"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BatchError(f"--resume {path}: not a readable batch manifest ({err})") from err


def _require_aiohttp():
    require_extra("batch", "The batch runner", modules=("aiohttp",), error=BatchError,
                  hint="or run it with ComfyUI's own Python, which has aiohttp")
    import aiohttp

    return aiohttp


class ServerDown(ConnectionError):
    """The server did not answer (connection refused / reset / timed out, websocket gone, HTTP 5xx)."""


@dataclass
class JobRecord:
    job: Job
    prompt: dict | None = None
    applied: dict = field(default_factory=dict)
    uploads: dict = field(default_factory=dict)
    server: str | None = None
    prompt_id: str | None = None
    status: str = "pending"
    error: dict | None = None
    node_errors: dict | None = None
    outputs: list = field(default_factory=list)
    attempts: list = field(default_factory=list)  # earlier tries lost with their server
    submitted: float | None = None
    started: float | None = None
    finished: float | None = None
    resumed: bool = False
    event: asyncio.Event | None = None
    previous: dict | None = None  # the manifest entry kept by --resume

    def to_json(self) -> dict:
        if self.previous is not None:
            return self.previous
        timings = {"submitted": self.submitted, "started": self.started, "finished": self.finished,
                   "queued_s": _delta(self.submitted, self.started), "run_s": _delta(self.started, self.finished),
                   "total_s": _delta(self.submitted, self.finished)}
        out = {"id": self.job.id, "line": self.job.line, "server": self.server, "prompt_id": self.prompt_id,
               "status": self.status, "overrides": self.applied, "outputs": self.outputs, "error": self.error,
               "timings": timings, "attempts": self.attempts}
        if self.uploads:
            out["uploads"] = self.uploads
        if self.node_errors:
            out["node_errors"] = self.node_errors
        return out


def _delta(a, b):
    return None if a is None or b is None else round(b - a, 3)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Server:
    """One ComfyUI server: HTTP calls, its websocket, its slots, alive or dropped."""

    def __init__(self, url: str, limit: int, session, runner: "BatchRunner"):
        self.url, self.limit, self.session, self.runner = url, limit, session, runner
        self.alive, self.error = True, None
        self.in_flight = 0
        self.queue_remaining = 0  # from the websocket's status messages: includes other clients' prompts
        self.dead = asyncio.Event()
        self.ws = None
        self.ws_task = None
        self.uploaded: dict[str, asyncio.Future] = {}
        self.done = 0

    @property
    def free(self) -> int:
        return self.limit - max(self.in_flight, self.queue_remaining)

    async def request(self, method: str, path: str, *, timeout=None, **kwargs):
        """(HTTP status, JSON body or None); network trouble and 5xx answers raise ServerDown."""
        aiohttp = self.runner.aiohttp
        if self.dead.is_set():
            raise ServerDown(f"{self.url} was dropped: {self.error}")
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            async with self.session.request(method, self.url + path, **kwargs) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
            raise ServerDown(f"{method} {path}: {type(err).__name__}: {err}") from err
        if status >= 500:
            raise ServerDown(f"{method} {path}: HTTP {status}")
        try:
            return status, (json.loads(raw) if raw.strip() else None)
        except ValueError:
            return status, None

    async def probe(self) -> bool:
        """True when GET /queue answers (two tries, a second apart)."""
        aiohttp = self.runner.aiohttp
        for attempt in range(2):
            if self.dead.is_set():
                return False
            try:
                status, _ = await self.request("GET", "/queue", timeout=aiohttp.ClientTimeout(total=5))
                if status == 200:
                    return True
            except ServerDown:
                pass
            if attempt == 0:
                await asyncio.sleep(1.0)
        return False

    async def confirm_down(self, reason: str) -> bool:
        """After a failed call: probe; drop the server when it does not answer. True when dropped."""
        if not self.dead.is_set() and await self.probe():
            return False
        self.drop(reason)
        return True

    def drop(self, reason: str) -> None:
        if self.dead.is_set():
            return
        self.alive, self.error = False, reason
        self.dead.set()
        self.runner.log(f"server {self.url} stopped answering ({reason}); its unfinished jobs go to the others")
        self.runner.wake.set()

    async def connect_websocket(self, client_id: str) -> None:
        scheme = "wss" if self.url.startswith("https") else "ws"
        url = f"{scheme}{self.url[self.url.index(':'):]}/ws?clientId={client_id}"
        try:
            self.ws = await self.session.ws_connect(url, heartbeat=self.runner.heartbeat, max_msg_size=0)
        except (self.runner.aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
            self.runner.log(f"{self.url}: websocket unavailable ({err}); polling /history instead")
            return
        self.ws_task = asyncio.ensure_future(self._read_websocket())

    async def _read_websocket(self) -> None:
        aiohttp = self.runner.aiohttp
        try:
            async for msg in self.ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    try:
                        message = json.loads(msg.data)
                    except ValueError:
                        continue
                    if isinstance(message, dict):
                        self.runner.on_message(self, message)
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass
        if self.runner.closing:
            return
        self.ws, self.queue_remaining = None, 0
        if not self.dead.is_set():
            self.runner.log(f"{self.url}: websocket lost; polling /history instead")
            await self.confirm_down("websocket closed and /queue does not answer")

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.ws_task is not None:
            self.ws_task.cancel()


class BatchRunner:
    """Spreads job records over servers; see the module docstring for the rules."""

    def __init__(self, workflow: dict, records: list[JobRecord], manifest: dict, out: str | None, *,
                 retries: int, poll_interval: float, use_websocket: bool, heartbeat: float, log, verbose: bool,
                 bar):
        self.aiohttp = _require_aiohttp()
        self.workflow, self.records, self.manifest, self.out = workflow, records, manifest, out
        self.retries, self.poll, self.use_websocket = retries, poll_interval, use_websocket
        self.heartbeat, self.log, self.verbose, self.bar = heartbeat, log, verbose, bar
        self.servers: list[Server] = []
        self.by_prompt: dict[str, JobRecord] = {}
        self.wake = asyncio.Event()
        self.closing = False
        self.file_hashes: dict[str, tuple[str, bytes]] = {}

    # -- manifest
    def save(self) -> None:
        self.manifest["servers"] = [{"url": s.url, "limit": s.limit, "alive": s.alive, "error": s.error,
                                     "jobs_done": s.done} for s in self.servers]
        self.manifest["jobs"] = [r.to_json() for r in self.records]
        statuses = [j["status"] for j in self.manifest["jobs"]]
        self.manifest["summary"] = {s: statuses.count(s) for s in sorted(set(statuses))}
        if self.out:
            write_json_atomic(self.out, self.manifest)

    def finish(self, record: JobRecord, status: str, error: dict | None = None) -> None:
        record.status, record.error = status, error
        record.finished = record.finished or time.time()
        if status == "success":
            detail = f"{len(record.outputs)} file(s) from {record.server}"
        else:
            detail = (error or {}).get("message", status)
        self.log(f"[{record.job.id}] {status}: {detail}")
        if self.bar is not None:
            self.bar.update(1)
        self.save()

    # -- websocket events
    def on_message(self, server: Server, message: dict) -> None:
        kind, data = message.get("type"), message.get("data") or {}
        if kind == "status":
            remaining = ((data.get("status") or {}).get("exec_info") or {}).get("queue_remaining")
            if isinstance(remaining, int):
                server.queue_remaining = remaining
                self.wake.set()
            return
        record = self.by_prompt.get(data.get("prompt_id"))
        if record is None:
            return
        if kind == "execution_start":
            record.status, record.started = "running", data.get("timestamp", time.time() * 1000) / 1000.0
            self.log(f"[{record.job.id}] running on {server.url}")
        elif kind == "progress":
            node = str(data.get("node"))
            label = _node_label(self.workflow, node) if node in self.workflow else node
            text = f"[{record.job.id}] {label}: {data.get('value')}/{data.get('max')}"
            if self.verbose:
                self.log(text)
            if self.bar is not None:
                self.bar.set_postfix_str(text, refresh=False)
        elif kind in ("execution_success", "execution_error", "execution_interrupted") or (
                kind == "executing" and data.get("node") is None):
            record.event.set()

    # -- one job on one server
    async def _call(self, server: Server, record: JobRecord, what: str, make_call):
        """``await make_call()``; a failure that the server survives (its /queue still answers) is retried
        up to 3 times, otherwise the server is dropped and ServerDown propagates."""
        for attempt in range(3):
            try:
                return await make_call()
            except ServerDown as err:
                if await server.confirm_down(str(err)) or attempt == 2:
                    server.drop(str(err))
                    raise
                self.log(f"[{record.job.id}] {what} on {server.url} failed ({err}); retrying")
                await asyncio.sleep(self.poll)

    async def _upload(self, server: Server, path: str) -> str:
        if path not in self.file_hashes:
            with open(path, "rb") as f:
                data = f.read()
            self.file_hashes[path] = (upload_name(path, data), data)
        name, data = self.file_hashes[path]

        async def upload():
            form = self.aiohttp.FormData()
            form.add_field("image", data, filename=name, content_type="application/octet-stream")
            form.add_field("subfolder", UPLOAD_SUBFOLDER)
            form.add_field("type", "input")
            form.add_field("overwrite", "true")
            status, body = await server.request("POST", "/upload/image", data=form)
            if status != 200 or not isinstance(body, dict) or "name" not in body:
                raise BatchError(f"upload of {path} to {server.url} refused (HTTP {status})")
            return f"{body.get('subfolder') or ''}/{body['name']}".lstrip("/")

        if name not in server.uploaded:  # one upload per file and server, shared by concurrent jobs
            server.uploaded[name] = asyncio.ensure_future(upload())
        try:
            return await asyncio.shield(server.uploaded[name])
        except BaseException:
            if server.uploaded[name].done():
                server.uploaded.pop(name, None)  # failed: the next job tries again
            raise

    async def _submit(self, server: Server, record: JobRecord, prompt: dict) -> tuple[int, dict | None]:
        """POST /prompt with our own prompt id; when the answer was lost but the server took the prompt
        (its /queue or /history knows the id), that is a success, so a prompt is never queued twice."""
        tries = []

        async def post():
            tries.append(1)
            if len(tries) > 1 and (record.event.is_set() or await self._known(server, record.prompt_id)):
                return 200, {"prompt_id": record.prompt_id}
            return await server.request("POST", "/prompt", json={
                "prompt": prompt, "client_id": self.manifest["client_id"], "prompt_id": record.prompt_id})
        return await self._call(server, record, "queueing", post)

    async def _known(self, server: Server, prompt_id: str) -> bool:
        status, history = await server.request("GET", f"/history/{urllib.parse.quote(prompt_id)}")
        if isinstance(history, dict) and prompt_id in history:
            return True
        status, queue = await server.request("GET", "/queue")
        items = (queue or {}).get("queue_running", []) + (queue or {}).get("queue_pending", [])
        return any(isinstance(i, list) and len(i) > 1 and i[1] == prompt_id for i in items)

    async def _history(self, server: Server, record: JobRecord) -> dict | None:
        async def get():
            return await server.request("GET", f"/history/{urllib.parse.quote(record.prompt_id)}")
        _, body = await self._call(server, record, "/history", get)
        entry = (body or {}).get(record.prompt_id) if isinstance(body, dict) else None
        return entry if entry and entry.get("status") is not None else None

    async def execute(self, server: Server, record: JobRecord) -> None:
        """Upload, queue, follow and collect one job on ``server``; raises ServerDown when it is dropped."""
        prompt = copy.deepcopy(record.prompt)
        for key, path in record.uploads.items():
            nid, name = key.rsplit(".", 1)
            prompt[nid]["inputs"][name] = await self._call(server, record, "upload",
                                                           lambda p=path: self._upload(server, p))
        record.server, record.prompt_id = server.url, uuid.uuid4().hex
        record.event = asyncio.Event()
        record.submitted, record.started, record.finished = time.time(), None, None
        self.by_prompt[record.prompt_id] = record
        status, response = await self._submit(server, record, prompt)
        if status != 200:
            response = response if isinstance(response, dict) else {}
            record.node_errors = response.get("node_errors") or None
            message = format_rejection(response) if response else f"HTTP {status}"
            record.prompt_id = None
            self.finish(record, "rejected", {"message": message})
            return
        answered = (response or {}).get("prompt_id") if isinstance(response, dict) else None
        if answered and answered != record.prompt_id:  # a server that ignores client prompt ids
            self.by_prompt.pop(record.prompt_id, None)
            record.prompt_id = answered
            self.by_prompt[answered] = record
        record.status = "queued"
        self.log(f"[{record.job.id}] queued on {server.url} as {record.prompt_id}")
        self.save()
        while True:
            waiter = asyncio.ensure_future(record.event.wait())
            dead = asyncio.ensure_future(server.dead.wait())
            await asyncio.wait([waiter, dead], timeout=self.poll, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            dead.cancel()
            if server.dead.is_set():
                raise ServerDown(f"{server.url} was dropped: {server.error}")
            record.event.clear()
            entry = await self._history(server, record)
            if entry is not None:
                break
        summary = summarize_history(entry)
        record.started = summary["started"] or record.started
        record.finished = summary["finished"] or time.time()
        record.outputs = collect_outputs(entry)
        if summary["status"] == "success":
            server.done += 1
        self.finish(record, summary["status"], summary["error"])

    async def run_job(self, server: Server, record: JobRecord, pending: collections.deque) -> None:
        try:
            await self.execute(server, record)
        except ServerDown as err:
            self.by_prompt.pop(record.prompt_id, None)
            record.attempts.append({"server": server.url, "prompt_id": record.prompt_id, "error": str(err)})
            record.server = record.prompt_id = None
            record.status = "pending"
            if len(record.attempts) > self.retries:
                self.finish(record, "error", {"message": f"{len(record.attempts)} server(s) stopped answering "
                                                         f"while running it (--retries {self.retries})"})
            else:
                self.log(f"[{record.job.id}] lost with {server.url}; queued again")
                pending.appendleft(record)
                self.save()
        except BatchError as err:  # an upload the server refused: the job's own input
            self.finish(record, "error", {"message": str(err)})
        finally:
            if record.prompt_id is not None:
                self.by_prompt.pop(record.prompt_id, None)
            server.in_flight -= 1
            self.wake.set()

    # -- the batch
    async def run(self, servers: list[tuple[str, int]], timeout: float, request_timeout: float) -> None:
        aiohttp = self.aiohttp
        session_timeout = aiohttp.ClientTimeout(total=request_timeout)
        async with aiohttp.ClientSession(timeout=session_timeout, trust_env=False) as session:
            self.servers = [Server(url, limit, session, self) for url, limit in servers]
            answering = await asyncio.gather(*(s.probe() for s in self.servers))
            for server, ok in zip(self.servers, answering):
                if not ok:
                    server.drop("not reachable at the start")
            if not any(answering):
                raise ServerDown(", ".join(s.url for s in self.servers))
            if self.use_websocket:  # before queueing, so no message of ours is missed
                await asyncio.gather(*(s.connect_websocket(self.manifest["client_id"])
                                       for s in self.servers if s.alive))
            pending = collections.deque(r for r in self.records if r.status == "pending")
            self.save()
            tasks: set = set()
            deadline = time.monotonic() + timeout
            try:
                while (pending or tasks) and time.monotonic() < deadline:
                    tasks = {t for t in tasks if not t.done()}
                    alive = [s for s in self.servers if s.alive]
                    if not alive:
                        break
                    candidates = [s for s in alive if s.free > 0]
                    if pending and candidates:
                        server = max(candidates, key=lambda s: s.free)  # first listed wins ties
                        server.in_flight += 1
                        tasks.add(asyncio.ensure_future(self.run_job(server, pending.popleft(), pending)))
                        continue
                    self.wake.clear()
                    try:
                        await asyncio.wait_for(self.wake.wait(), timeout=min(self.poll, max(
                            deadline - time.monotonic(), 0.01)))
                    except asyncio.TimeoutError:
                        pass
            finally:
                self.closing = True
                for task in tasks:
                    task.cancel()
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
                for record in self.records:
                    if record.status not in FINAL_STATUSES:
                        if not any(s.alive for s in self.servers):
                            self.finish(record, "error", {"message": "no server left that answers"})
                        else:
                            self.finish(record, "timeout", {"message": f"not finished after {timeout:.0f} s"})
                await asyncio.gather(*(s.close() for s in self.servers), return_exceptions=True)


def prepare_records(workflow: dict, jobs: list[Job], previous: dict | None = None, log=_stderr) -> list[JobRecord]:
    """Resolve every job's overrides (invalid ones are final) and take over --resume successes."""
    records = []
    for job in jobs:
        record = JobRecord(job)
        try:
            record.prompt, record.applied = apply_overrides(workflow, job.overrides)
            record.uploads = local_uploads(workflow, record.applied)
        except BatchError as err:
            record.status, record.error = "invalid", {"message": str(err)}
            log(f"[{job.id}] invalid: {err}")
        old = (previous or {}).get(job.id)
        if (record.status == "pending" and old and old.get("status") == "success"
                and old.get("overrides") == json.loads(json.dumps(record.applied))):
            record.status, record.previous, record.resumed = "success", old, True
        records.append(record)
    return records


def run_batch(servers, workflow: dict, jobs: list[Job], out: str | None = None, *, timeout: float = 3600.0,
              poll_interval: float = 1.0, use_websocket: bool = True, retries: int = 2, per_server: int = 2,
              request_timeout: float = 30.0, heartbeat: float = 20.0, resume: dict | None = None, log=_stderr,
              verbose: bool = False, progress_bar: bool = False, workflow_path: str = "") -> dict:
    """Run ``jobs`` over ``servers`` (URLs, or (URL, limit) pairs); returns (and writes to ``out``) the manifest.

    Raises ServerDown when no server answers at the start (nothing is queued or written then)."""
    if isinstance(servers, str):
        servers = [servers]
    servers = [parse_server(s, per_server) if isinstance(s, str) else tuple(s) for s in servers]
    records = prepare_records(workflow, jobs, resume, log)
    manifest = {"servers": [], "workflow": workflow_path, "client_id": uuid.uuid4().hex, "created": time.time(),
                "complete": False, "jobs": []}
    bar = None
    if progress_bar:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            bar = tqdm(total=len(records), initial=sum(r.status != "pending" for r in records), unit="job",
                       file=sys.stderr, dynamic_ncols=True)
            plain_log = log
            log = lambda message: bar.write(message, file=sys.stderr) if plain_log is _stderr else plain_log(message)  # noqa: E731
    try:
        runner = BatchRunner(workflow, records, manifest, out, retries=retries, poll_interval=poll_interval,
                             use_websocket=use_websocket, heartbeat=heartbeat, log=log, verbose=verbose, bar=bar)
        for record in records:
            if record.resumed:
                log(f"[{record.job.id}] success in the resumed manifest; skipped")
        asyncio.run(runner.run(servers, timeout, request_timeout))
    finally:
        if bar is not None:
            bar.close()
    manifest["complete"] = True
    runner.save()
    return manifest


# --------------------------------------------------------------------------- CLI




def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m comfy_poe.api_batch", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0],
        epilog="Example:\n" + __doc__.split("\n\n")[1] + "\n\nSee docs/scale_out.md.")
    parser.add_argument("--server", action="append", metavar="URL",
                        help="ComfyUI base URL; repeat for several servers (default http://127.0.0.1:8188)")
    parser.add_argument("--servers-file", metavar="FILE",
                        help="file with one server a line: 'URL' or 'URL LIMIT' ('#' comments); adds to --server")
    parser.add_argument("--per-server", type=positive_int, default=2, metavar="N",
                        help="jobs queued on a server at a time, counting its own queue (default 2: one running, "
                             "one waiting)")
    parser.add_argument("--workflow", required=True, help="API-format workflow JSON (ComfyUI menu: Export (API))")
    parser.add_argument("--overrides", required=True,
                        help='JSONL, one job per line: {"id": ..., "set": {"<node>.<input>": value}}')
    parser.add_argument("--out", help="manifest JSON to write (atomically, after every change); "
                                      "default: the --resume manifest")
    parser.add_argument("--resume", metavar="MANIFEST",
                        help="skip the jobs this earlier manifest lists as success with the same overrides")
    parser.add_argument("--retries", type=nonnegative_int, default=2,
                        help="times a job is queued again after its server stopped answering (default 2)")
    parser.add_argument("--timeout", type=positive_float, default=3600.0,
                        help="seconds to wait for the whole batch")
    parser.add_argument("--request-timeout", type=positive_float, default=30.0,
                        help="seconds one HTTP request may take before the server counts as not answering")
    parser.add_argument("--poll", type=positive_float, default=1.0, help="seconds between /history checks")
    parser.add_argument("--no-websocket", action="store_true", help="poll /history only")
    parser.add_argument("--dry-run", action="store_true",
                        help="resolve the overrides, print the prompts (JSONL), queue nothing; "
                             "exit 1 if a job is invalid")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or lines on stderr")
    parser.add_argument("--verbose", action="store_true", help="also print every sampling step of every job")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.out and not args.resume:
        parser.error("--out is required (or --resume MANIFEST, which is then rewritten)")
    out = args.out or args.resume
    try:
        check_output_file(out, "manifest (--out)")  # a directory or a path under a file: refused before any job
    except OutputPathError as err:
        parser.error(str(err))
    try:
        workflow = load_workflow(args.workflow)
        jobs = load_jobs(args.overrides)
        if args.dry_run:
            bad = 0
            for job in jobs:
                try:
                    prompt, applied = apply_overrides(workflow, job.overrides)
                    line = {"id": job.id, "overrides": applied, "prompt": prompt}
                    uploads = local_uploads(workflow, applied)
                    if uploads:
                        line["uploads"] = uploads
                    print(json.dumps(line))
                except BatchError as err:
                    bad += 1
                    print(json.dumps({"id": job.id, "error": str(err)}))
            if bad:
                _stderr(f"{bad} of {len(jobs)} job(s) invalid")
            return 1 if bad else 0
        servers = load_servers(args.server, args.servers_file, args.per_server)
        previous = load_resume(args.resume) if args.resume else None
        _require_aiohttp()
        manifest = run_batch(servers, workflow, jobs, out, timeout=args.timeout, poll_interval=args.poll,
                             use_websocket=not args.no_websocket, retries=args.retries,
                             request_timeout=args.request_timeout, resume=previous, workflow_path=args.workflow,
                             verbose=args.verbose, progress_bar=not args.quiet,
                             log=(lambda _m: None) if args.quiet else _stderr)
    except BatchError as err:
        _stderr(f"error: {err}")
        return 2
    except ServerDown as err:
        _stderr(f"error: cannot reach ComfyUI at {err}")
        return 2
    counts = ", ".join(f"{n} {s}" for s, n in manifest["summary"].items())
    _stderr(f"{len(jobs)} job(s): {counts}; manifest {out}")
    return 0 if all(j["status"] == "success" for j in manifest["jobs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
