"""Batch runs through ComfyUI's HTTP + websocket API: one API workflow, one JSONL of overrides, one manifest.

    python -m comfy_poe.api_batch --server http://127.0.0.1:8188 \\
        --workflow workflows/api/X_api.json --overrides jobs.jsonl --out manifest.json

``--workflow`` is an API-format workflow (ComfyUI menu: Export (API)): ``{node_id: {"class_type",
"inputs", "_meta": {"title"}}}``. Each JSONL line is one job::

    {"id": "cat-42", "set": {"5.seed": 42, "KSampler.steps": 20, "Positive.text": "a cat"}}

A key is ``<selector>.<input name>``; the selector is a node id, or else every node whose
``class_type`` or title (``_meta.title``) equals it. A key that matches no node or no input is an error
for that job (it is not queued). Jobs are queued together, progress is read from the websocket
(``/ws?clientId=…``; a minimal RFC 6455 client, text frames only) with ``/history`` polling as the
fallback and safety net, and the manifest (per job: prompt_id, status, output files, error, timings)
is rewritten atomically after every finished job. Standard library only; no proxies are used.
Exit status: 0 all jobs succeeded, 1 some failed, 2 bad arguments / files / unreachable server.
"""
from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import os
import socket
import ssl
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field

from .fileio import atomic_write_text

JOB_KEYS = {"id", "set"}
FINAL_STATUSES = ("success", "failed", "interrupted")
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3


class BatchError(ValueError):
    """Bad workflow, job file or override: the message names the file, line or key."""


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
    """``"<selector>.<input>"`` -> [(node id, input name)]: a node id, else all nodes whose class_type or
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
    """A copy of ``workflow`` with the overrides set, and {"<node id>.<input>": value} of what was set.

    Replacing a link (``[node_id, output]``) by a constant is refused: it would silently cut the graph."""
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


# --------------------------------------------------------------------------- HTTP and websocket clients

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ComfyClient:
    """The few HTTP calls a batch needs: POST /prompt, GET /history/<id>."""

    def __init__(self, server: str, timeout: float = 30.0):
        self.server = server.rstrip("/")
        parsed = urllib.parse.urlparse(self.server)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise BatchError(f"--server {server!r}: expected http://host:port")
        self.timeout = timeout

    def _json(self, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        with _OPENER.open(req, timeout=self.timeout) as resp:
            return json.loads(resp.read() or b"null")

    def check(self) -> None:
        """Raises URLError / OSError when no ComfyUI answers at ``server``."""
        self._json("/queue")

    def submit(self, prompt: dict, client_id: str) -> tuple[str | None, dict]:
        """(prompt_id, response); (None, response) when the server rejects the prompt (HTTP 400)."""
        try:
            resp = self._json("/prompt", {"prompt": prompt, "client_id": client_id})
        except urllib.error.HTTPError as err:
            if err.code != 400:
                raise
            try:
                return None, json.loads(err.read() or b"{}")
            except ValueError:
                return None, {"error": {"message": f"HTTP 400 {err.reason}"}}
        return resp["prompt_id"], resp

    def history(self, prompt_id: str) -> dict | None:
        """The finished history entry of a prompt, or None while it is queued / running."""
        entry = (self._json(f"/history/{urllib.parse.quote(prompt_id)}") or {}).get(prompt_id)
        return entry if entry and entry.get("status") is not None else None


class WebSocketClosed(ConnectionError):
    pass


def encode_frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final frame; clients must mask (RFC 6455 5.3), so a random key is used unless given."""
    mask = os.urandom(4) if mask is None else mask
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def decode_frame(buf: bytes):
    """(fin, opcode, payload, bytes used) of the first complete frame in ``buf``, or None if incomplete."""
    if len(buf) < 2:
        return None
    fin, opcode = bool(buf[0] & 0x80), buf[0] & 0x0F
    masked, n, pos = bool(buf[1] & 0x80), buf[1] & 0x7F, 2
    if n == 126:
        if len(buf) < 4:
            return None
        n, pos = struct.unpack("!H", buf[2:4])[0], 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n, pos = struct.unpack("!Q", buf[2:10])[0], 10
    key = b""
    if masked:
        if len(buf) < pos + 4:
            return None
        key, pos = buf[pos:pos + 4], pos + 4
    if len(buf) < pos + n:
        return None
    payload = buf[pos:pos + n]
    if masked:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return fin, opcode, payload, pos + n


class WebSocket:
    """Minimal RFC 6455 client: handshake, text messages (fragments joined), ping -> pong, close.
    Binary messages (ComfyUI's preview images) are read and dropped."""

    def __init__(self, url: str, timeout: float = 10.0):
        parsed = urllib.parse.urlparse(url)
        secure = parsed.scheme in ("wss", "https")
        port = parsed.port or (443 if secure else 80)
        self.sock = socket.create_connection((parsed.hostname, port), timeout=timeout)
        if secure:
            self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=parsed.hostname)
        key = base64.b64encode(os.urandom(16)).decode()
        path = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {parsed.hostname}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            if not chunk or len(buf) > 65536:
                self.close()
                raise WebSocketClosed("websocket handshake: connection closed")
            buf += chunk
        head, self._buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        if " 101 " not in lines[0] + " " or headers.get("sec-websocket-accept") != accept:
            self.close()
            raise WebSocketClosed(f"websocket handshake refused: {lines[0]}")
        self._parts: list[bytes] = []
        self._text = False

    def recv(self, timeout: float) -> str | None:
        """The next text message, or None after ``timeout`` seconds without a complete one."""
        deadline = time.monotonic() + timeout
        while True:
            frame = decode_frame(self._buf)
            if frame is not None:
                fin, opcode, payload, used = frame
                self._buf = self._buf[used:]
                if opcode == 0x8:
                    self.close()
                    raise WebSocketClosed("websocket closed by the server")
                if opcode == 0x9:
                    self.sock.sendall(encode_frame(0xA, payload))
                elif opcode in (0x0, 0x1, 0x2):
                    if opcode != 0x0:
                        self._parts, self._text = [], opcode == 0x1
                    self._parts.append(payload)
                    if fin:
                        data, self._parts = b"".join(self._parts), []
                        if self._text:
                            return data.decode("utf-8", errors="replace")
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                return None
            if not chunk:
                raise WebSocketClosed("websocket connection lost")
            self._buf += chunk

    def close(self) -> None:
        try:
            self.sock.sendall(encode_frame(0x8, b""))
        except OSError:
            pass
        self.sock.close()


# --------------------------------------------------------------------------- batch runner


@dataclass
class JobRecord:
    job: Job
    prompt: dict | None = None
    applied: dict = field(default_factory=dict)
    prompt_id: str | None = None
    status: str = "pending"
    error: dict | None = None
    node_errors: dict | None = None
    outputs: list = field(default_factory=list)
    submitted: float | None = None
    started: float | None = None
    finished: float | None = None

    def to_json(self) -> dict:
        timings = {"submitted": self.submitted, "started": self.started, "finished": self.finished,
                   "queued_s": _delta(self.submitted, self.started), "run_s": _delta(self.started, self.finished),
                   "total_s": _delta(self.submitted, self.finished)}
        out = {"id": self.job.id, "line": self.job.line, "prompt_id": self.prompt_id, "status": self.status,
               "overrides": self.applied, "outputs": self.outputs, "error": self.error, "timings": timings}
        if self.node_errors:
            out["node_errors"] = self.node_errors
        return out


def _delta(a, b):
    return None if a is None or b is None else round(b - a, 3)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_batch(server: str, workflow: dict, jobs: list[Job], out: str | None = None, *, timeout: float = 3600.0,
              poll_interval: float = 1.0, use_websocket: bool = True, log=_stderr, workflow_path: str = "") -> dict:
    """Queue every job, follow progress, collect outputs; returns (and writes to ``out``) the manifest."""
    client = ComfyClient(server)
    client_id = uuid.uuid4().hex
    records = [JobRecord(job) for job in jobs]
    manifest = {"server": client.server, "workflow": workflow_path, "client_id": client_id,
                "created": time.time(), "complete": False, "jobs": []}

    def save():
        manifest["jobs"] = [r.to_json() for r in records]
        manifest["summary"] = {s: sum(r.status == s for r in records) for s in sorted({r.status for r in records})}
        if out:
            write_json_atomic(out, manifest)

    client.check()  # unreachable server: fail before anything is queued
    for record in records:
        try:
            record.prompt, record.applied = apply_overrides(workflow, record.job.overrides)
        except BatchError as err:
            record.status, record.error = "invalid", {"message": str(err)}
            log(f"[{record.job.id}] invalid: {err}")

    ws = None
    if use_websocket:  # connect before queueing, so no message of ours is missed
        scheme = "wss" if client.server.startswith("https") else "ws"
        try:
            ws = WebSocket(f"{scheme}{client.server[client.server.index(':'):]}/ws?clientId={client_id}")
        except (OSError, WebSocketClosed) as err:
            log(f"websocket unavailable ({err}); polling /history instead")

    by_prompt: dict[str, JobRecord] = {}
    for record in records:
        if record.prompt is None:
            continue
        record.submitted = time.time()
        try:
            prompt_id, response = client.submit(record.prompt, client_id)
        except (OSError, urllib.error.URLError, ValueError, KeyError) as err:
            record.status, record.error = "error", {"message": f"could not queue: {err}"}
            log(f"[{record.job.id}] could not queue: {err}")
            continue
        if prompt_id is None:
            record.status = "rejected"
            record.error = {"message": format_rejection(response)}
            record.node_errors = response.get("node_errors") or None
            log(f"[{record.job.id}] rejected: {record.error['message']}")
            continue
        record.prompt_id, record.status = prompt_id, "queued"
        by_prompt[prompt_id] = record
        log(f"[{record.job.id}] queued as {prompt_id}")
    save()

    def finish(record: JobRecord) -> bool:
        try:
            entry = client.history(record.prompt_id)
        except (OSError, urllib.error.URLError, ValueError) as err:
            log(f"[{record.job.id}] /history failed ({err}); retrying")
            return False
        if entry is None:
            return False
        summary = summarize_history(entry)
        record.status, record.error = summary["status"], summary["error"]
        record.started, record.finished = summary["started"] or record.started, summary["finished"] or time.time()
        record.outputs = collect_outputs(entry)
        detail = f"{len(record.outputs)} file(s)" if record.status == "success" else record.error["message"]
        log(f"[{record.job.id}] {record.status}: {detail}")
        del by_prompt[record.prompt_id]
        save()
        return True

    deadline = time.monotonic() + timeout
    last_sweep = time.monotonic()
    while by_prompt and time.monotonic() < deadline:
        done_hint, text = None, None
        if ws is not None:
            try:
                text = ws.recv(timeout=poll_interval)
            except (OSError, WebSocketClosed) as err:
                log(f"websocket lost ({err}); polling /history instead")
                ws = None
                continue
            message = _parse_message(text)
            record = by_prompt.get((message.get("data") or {}).get("prompt_id")) if message else None
            if record is not None:
                done_hint = _follow(record, message, workflow, log)
        else:
            time.sleep(poll_interval)
        # ask /history for the job the websocket reported finished, and sweep all periodically
        # (the safety net for missed messages; /history is the authoritative result)
        if done_hint is not None and done_hint.prompt_id in by_prompt:
            finish(done_hint)
        # with the websocket, sweep when it is idle (after 5 polls), or at the latest after 30 polls
        since = time.monotonic() - last_sweep
        if ws is None or (text is None and since >= 5 * poll_interval) or since >= 30 * poll_interval:
            last_sweep = time.monotonic()
            for record in list(by_prompt.values()):
                finish(record)
    for record in by_prompt.values():
        record.status, record.error = "timeout", {"message": f"not finished after {timeout:.0f} s"}
        log(f"[{record.job.id}] timeout")
    if ws is not None:
        ws.close()
    manifest["complete"] = True
    save()
    return manifest


def _parse_message(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        message = json.loads(text)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _follow(record: JobRecord, message: dict, workflow: dict, log) -> JobRecord | None:
    """Log one websocket event of a job; returns the record when the event says the job ended."""
    kind, data = message.get("type"), message.get("data") or {}
    if kind == "execution_start":
        record.status, record.started = "running", data.get("timestamp", time.time() * 1000) / 1000.0
        log(f"[{record.job.id}] running")
    elif kind == "progress":
        node = str(data.get("node"))
        label = _node_label(workflow, node) if node in workflow else node
        log(f"[{record.job.id}] {label}: {data.get('value')}/{data.get('max')}")
    elif kind in ("execution_success", "execution_error", "execution_interrupted"):
        return record
    elif kind == "executing" and data.get("node") is None:
        return record
    return None


# --------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comfy_poe.api_batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI base URL")
    parser.add_argument("--workflow", required=True, help="API-format workflow JSON (Export (API))")
    parser.add_argument("--overrides", required=True,
                        help='JSONL, one job per line: {"id": ..., "set": {"<node>.<input>": value}}')
    parser.add_argument("--out", required=True, help="manifest JSON to write (atomically, after every job)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the whole batch")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between /history checks")
    parser.add_argument("--no-websocket", action="store_true", help="poll /history only")
    parser.add_argument("--dry-run", action="store_true",
                        help="resolve the overrides, print the prompts (JSONL), queue nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    try:
        workflow = load_workflow(args.workflow)
        jobs = load_jobs(args.overrides)
        if args.dry_run:
            for job in jobs:
                try:
                    prompt, applied = apply_overrides(workflow, job.overrides)
                    print(json.dumps({"id": job.id, "overrides": applied, "prompt": prompt}))
                except BatchError as err:
                    print(json.dumps({"id": job.id, "error": str(err)}))
            return 0
        manifest = run_batch(args.server, workflow, jobs, args.out, timeout=args.timeout, poll_interval=args.poll,
                             use_websocket=not args.no_websocket, workflow_path=args.workflow,
                             log=(lambda _m: None) if args.quiet else _stderr)
    except BatchError as err:
        _stderr(f"error: {err}")
        return 2
    except (urllib.error.URLError, OSError) as err:
        _stderr(f"error: cannot reach ComfyUI at {args.server}: {err}")
        return 2
    counts = ", ".join(f"{n} {s}" for s, n in manifest["summary"].items())
    _stderr(f"{len(jobs)} job(s): {counts}; manifest {args.out}")
    return 0 if all(j["status"] == "success" for j in manifest["jobs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
