"""Integration fixtures: a real ComfyUI server (CPU, loopback only) with comfy-poe linked in.

Everything in this folder is skipped unless ``COMFY_POE_COMFYUI_DIR`` names a ComfyUI checkout.
``COMFY_POE_COMFYUI_PYTHON`` is the python of that checkout's venv (default: this interpreter);
``COMFY_POE_COMFYUI_ARGS`` adds extra ``main.py`` arguments; ``COMFY_POE_COMFYUI_START_TIMEOUT``
(seconds, default 180) bounds the start-up wait.

The session fixture ``comfy_server`` starts ``main.py --cpu --listen 127.0.0.1 --port <free port>``
in that checkout, makes sure ``custom_nodes/`` holds a link to this repository (created, and
removed again afterwards, only if missing), waits for ``/object_info``, and stops the server by
its PID at the end. Outputs, temp files and the server log go to a pytest temp folder, so the
checkout's own ``output/`` stays untouched. HTTP goes through ``urllib`` with proxies disabled:
only loopback traffic.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

COMFY_DIR_ENV = "COMFY_POE_COMFYUI_DIR"
COMFY_PYTHON_ENV = "COMFY_POE_COMFYUI_PYTHON"
COMFY_ARGS_ENV = "COMFY_POE_COMFYUI_ARGS"
START_TIMEOUT_ENV = "COMFY_POE_COMFYUI_START_TIMEOUT"

INTEGRATION_DIR = Path(__file__).resolve().parent
REPO_ROOT = INTEGRATION_DIR.parents[1]
DATA_DIR = INTEGRATION_DIR / "data"
WORKFLOWS_DIR = REPO_ROOT / "workflows"
PACK_LINK_NAME = "comfy_poe"
TINY_CHECKPOINT = "tiny_random_sd15.safetensors"

SKIP_REASON = (
    f"{COMFY_DIR_ENV} is not set: integration tests need a ComfyUI checkout "
    f"(and {COMFY_PYTHON_ENV} = its venv python); see docs/contributing.md, section Tests"
)

# A direct opener: no proxy handler, so requests can only ever reach 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _comfy_dir_from_env() -> Path | None:
    value = os.environ.get(COMFY_DIR_ENV, "").strip()
    return Path(value).expanduser().resolve() if value else None


def pytest_collection_modifyitems(config, items):
    """Mark every test in this folder ``integration``; skip them all when no ComfyUI is configured."""
    skip = None if _comfy_dir_from_env() else pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if INTEGRATION_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)
            if skip is not None:
                item.add_marker(skip)


def pytest_generate_tests(metafunc):
    """A test taking ``shipped_workflow`` runs once per ``workflows/api/*_api.json`` (a Path)."""
    if "shipped_workflow" in metafunc.fixturenames:
        paths = shipped_api_workflows()
        metafunc.parametrize("shipped_workflow", paths, ids=[p.stem for p in paths])


# --------------------------------------------------------------------------- pure helpers


def free_loopback_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_pack_link(custom_nodes: Path) -> Path | None:
    """The entry of ``custom_nodes`` that resolves to this repository, if any."""
    if not custom_nodes.is_dir():
        return None
    for entry in sorted(custom_nodes.iterdir()):
        try:
            if entry.resolve() == REPO_ROOT:
                return entry
        except OSError:  # dangling or looping link
            continue
    return None


def load_api_workflow(path: str | Path, checkpoint_name: str | None = None) -> dict:
    """Read an API-format workflow; point every ``ckpt_name`` input at ``checkpoint_name``.

    API format is ``{node_id: {"class_type": str, "inputs": {name: value | [src_id, out_idx]}}}``.
    Only constant string ``ckpt_name`` inputs are rewritten (links are left alone).
    """
    path = Path(path)
    prompt = json.loads(path.read_text())
    if not isinstance(prompt, dict) or not all(
        isinstance(node, dict) and "class_type" in node for node in prompt.values()
    ):
        raise ValueError(f"{path} is not an API-format workflow (export it with 'Save (API)')")
    if checkpoint_name is not None:
        for node in prompt.values():
            inputs = node.get("inputs", {})
            if isinstance(inputs.get("ckpt_name"), str):
                inputs["ckpt_name"] = checkpoint_name
    return prompt


def shipped_api_workflows() -> list[Path]:
    """Every API-format workflow the pack ships (``workflows/api/*_api.json``), sorted."""
    return sorted((WORKFLOWS_DIR / "api").glob("*_api.json"))


# Shipped workflows carry real SD1.5 values (512-768 px, 20+ steps); on the tiny CPU checkpoint we keep
# their graph and aspect ratios but shrink sizes 8x and cut steps and particles.
PIXEL_INPUTS = {"EmptyLatentImage": ("width", "height"), "SolidMask": ("width", "height"),
                "MaskComposite": ("x", "y"), "PoESelmaSkillDataset": ("width", "height"),
                "EmptySD3LatentImage": ("width", "height"), "EmptyHunyuanLatentVideo": ("width", "height"),
                "CLIPTextEncodeSDXL": ("width", "height", "crop_w", "crop_h", "target_width", "target_height")}
CPU_CAPS = {"steps": 3, "particles": 2, "mcmc_steps": 1, "batch_size": 1, "length": 5, "trajectories": 2,
            "rollout_steps": 2, "eval_images": 1}


def shrink_for_cpu(prompt: dict, **caps: int) -> dict:
    """Shrink an API workflow in place for the tiny CPU checkpoint: pixel sizes / 8 (positions may be 0,
    sizes stay ≥ 8) and integer inputs named in ``CPU_CAPS`` (or ``caps``, which override them) capped.
    A 0 stays 0 (nodes where 0 means "the preset's value" must be set explicitly by the caller)."""
    caps = {**CPU_CAPS, **caps}
    for node in prompt.values():
        inputs = node["inputs"]
        for name in PIXEL_INPUTS.get(node["class_type"], ()):
            if isinstance(inputs.get(name), int):
                inputs[name] = max(inputs[name] // 8, 0 if name in ("x", "y") else 8)
        for name, cap in caps.items():
            if isinstance(inputs.get(name), int) and not isinstance(inputs.get(name), bool):
                inputs[name] = min(inputs[name], cap)
    return prompt


# --------------------------------------------------------------------------- model families
# Tiny random models of every family (built by make_fixtures.py into the server's models folders) and the
# file names users have, so shipped workflows (real names) run on the fixtures.

FIXTURE_FILES = {  # family -> file name in its models folder (as make_fixtures.py writes it)
    "flux": "tiny_flux_dev.safetensors", "sd3": "tiny_sd3.safetensors", "wan21": "tiny_wan21_t2v.safetensors",
    "sdxl": "tiny_sdxl.safetensors", "clip_l": "tiny_clip_l.safetensors", "ae16": "tiny_ae16.safetensors",
    "wan21_vae": "tiny_wan21_vae.safetensors",
}
# A lone CLIP-L through CLIPLoader type "sd3" gives a 4096-wide (zero-padded) context and a 2048-wide pooled
# vector: what the tiny Flux, SD3 and Wan fixtures take, so no T5 / UMT5 (4.7 B / 5.7 B parameters) is needed.
TINY_TEXT_ENCODER = {"class_type": "CLIPLoader",
                     "inputs": {"clip_name": FIXTURE_FILES["clip_l"], "type": "sd3", "device": "default"}}


def fixture_for_file(name: str) -> str | None:
    """The fixture family standing in for a user's model file name (None: not a family file we swap)."""
    n = name.lower()
    if n.startswith("tiny"):
        return None
    if "flux" in n:
        return "flux"
    if "wan" in n and "vae" in n:
        return "wan21_vae"
    if "wan" in n:
        return "wan21"
    if n in ("ae.safetensors", "ae.sft") or "flux_vae" in n or "sd3_vae" in n or "sd3.5_vae" in n:
        return "ae16"
    if "sd3" in n:
        return "sd3"
    if "xl" in n:
        return "sdxl"
    return None


def use_tiny_models(prompt: dict, sd15_checkpoint: str | None = None) -> dict:
    """Point a workflow written with users' file names at the tiny fixtures, in place:
    UNETLoader (flux1-dev / schnell, sd3, wan2.1 …) -> the tiny diffusion model of that family; DualCLIPLoader /
    TripleCLIPLoader / CLIPLoader (t5xxl, clip_l, umt5 …) -> CLIPLoader(tiny CLIP-L, type sd3); VAELoader (ae,
    wan_2.1_vae …) -> the tiny VAE; CheckpointLoaderSimple: SDXL names -> tiny SDXL, others -> ``sd15_checkpoint``."""
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "UNETLoader" and fixture_for_file(inputs.get("unet_name", "")):
            inputs["unet_name"] = FIXTURE_FILES[fixture_for_file(inputs["unet_name"])]
            inputs["weight_dtype"] = "default"
        elif kind in ("DualCLIPLoader", "TripleCLIPLoader", "CLIPLoader"):
            names = [v for k, v in inputs.items() if k.startswith("clip_name") and isinstance(v, str)]
            if not all(n.startswith("tiny") for n in names):
                node["class_type"] = TINY_TEXT_ENCODER["class_type"]
                node["inputs"] = dict(TINY_TEXT_ENCODER["inputs"])
        elif kind == "VAELoader" and fixture_for_file(inputs.get("vae_name", "")):
            inputs["vae_name"] = FIXTURE_FILES[fixture_for_file(inputs["vae_name"])]
        elif kind == "CheckpointLoaderSimple" and isinstance(inputs.get("ckpt_name"), str):
            if fixture_for_file(inputs["ckpt_name"]) == "sdxl":
                inputs["ckpt_name"] = FIXTURE_FILES["sdxl"]
            elif sd15_checkpoint is not None:
                inputs["ckpt_name"] = sd15_checkpoint
    return prompt


def combo_options(spec) -> list:
    """Options of a combo input from /object_info, for both the V1 ([list, {...}]) and the
    V3 ("COMBO", {"options": [...]}) spellings."""
    kind = spec[0]
    if isinstance(kind, list):
        return kind
    if len(spec) > 1 and isinstance(spec[1], dict):
        return list(spec[1].get("options", []))
    return []


# --------------------------------------------------------------------------- server


class ComfyServer:
    """A running ComfyUI server on loopback, driven over its HTTP API."""

    def __init__(self, comfy_dir: Path, python: str, port: int, work_dir: Path,
                 pack_link: Path, extra_args: list[str] | None = None):
        self.comfy_dir = comfy_dir
        self.python = python
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.pack_link = pack_link
        self.pack_module = f"custom_nodes.{pack_link.name}"
        self.output_dir = work_dir / "output"
        self.input_dir = work_dir / "input"
        self.temp_base = work_dir / "tmp"
        self.log_path = work_dir / "comfyui.log"
        self.client_id = str(uuid.uuid4())
        self.extra_args = list(extra_args or [])
        self.process: subprocess.Popen | None = None
        self.start_seconds: float | None = None

    # -- lifecycle
    def start(self, timeout: float = 180.0) -> None:
        for d in (self.output_dir, self.input_dir, self.temp_base):
            d.mkdir(parents=True, exist_ok=True)
        cmd = [
            self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--output-directory", str(self.output_dir), "--input-directory", str(self.input_dir),
            "--temp-directory", str(self.temp_base), *self.extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        while time.monotonic() - t0 < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode} during start-up "
                                   f"({shlex.join(cmd)}); log tail:\n{self.log_tail()}")
            try:
                with _OPENER.open(self.url + "/object_info", timeout=10) as resp:
                    if resp.status == 200:
                        json.load(resp)
                        self.start_seconds = time.monotonic() - t0
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"ComfyUI not ready after {timeout:.0f}s; log tail:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the server by its PID: SIGTERM, then SIGKILL after 15 s."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)

    # -- logs
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- HTTP
    def _request(self, path: str, body: dict | None = None, timeout: float = 60.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        with _OPENER.open(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw.strip() else None

    def get_json(self, path: str, timeout: float = 60.0):
        return self._request(path, timeout=timeout)

    def post_json(self, path: str, body: dict, timeout: float = 60.0):
        return self._request(path, body, timeout=timeout)

    def object_info(self, node_class: str | None = None) -> dict:
        """/object_info (all nodes) or /object_info/<node_class> (``{node_class: info}``)."""
        return self.get_json("/object_info" + (f"/{node_class}" if node_class else ""))

    def pack_nodes(self) -> dict:
        """The /object_info entries registered by this pack."""
        def ours(module: str) -> bool:
            return module == self.pack_module or module.startswith(self.pack_module + ".")
        return {name: info for name, info in self.object_info().items()
                if ours(str(info.get("python_module", "")))}

    def submit(self, prompt: dict) -> tuple[str | None, dict]:
        """POST /prompt. Returns ``(prompt_id, response)``; on HTTP 400 (validation failed)
        ``(None, response)`` with ``response["error"]`` and ``response["node_errors"]``."""
        try:
            resp = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as err:
            if err.code == 400:
                return None, json.loads(err.read() or b"{}")
            raise
        return resp["prompt_id"], resp

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Poll /history until the prompt finished (success, error or interrupted); its entry."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None and entry.get("status") is not None:
                return entry
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}; log tail:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f}s; log tail:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """Submit and wait; asserts the prompt was accepted and executed successfully."""
        prompt_id, resp = self.submit(prompt)
        assert prompt_id is not None, f"prompt rejected: {json.dumps(resp, indent=1)[:4000]}"
        entry = self.wait(prompt_id, timeout)
        status = entry["status"]
        if status.get("status_str") != "success":
            details = [m for m in status.get("messages", [])
                       if m[0] in ("execution_error", "execution_interrupted")]
            raise AssertionError(f"prompt {prompt_id} failed: {json.dumps(details, indent=1)[:6000]}\n"
                                 f"log tail:\n{self.log_tail()}")
        return entry

    def interrupt(self, prompt_id: str | None = None) -> None:
        self.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        self.post_json("/free", {"unload_models": unload_models, "free_memory": free_memory})

    def output_files(self, history_entry: dict) -> list[Path]:
        """Files listed under ``images`` by the output nodes of a finished prompt."""
        roots = {"output": self.output_dir, "temp": self.temp_base / "temp", "input": self.input_dir}
        files = []
        for out in history_entry.get("outputs", {}).values():
            for item in out.get("images", []):
                files.append(roots[item.get("type", "output")] / item.get("subfolder", "") / item["filename"])
        return files


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def comfy_dir() -> Path:
    path = _comfy_dir_from_env()
    if path is None:
        pytest.skip(SKIP_REASON)
    if not (path / "main.py").is_file():
        pytest.fail(f"{COMFY_DIR_ENV}={path} is not a ComfyUI checkout (no main.py)")
    return path


@pytest.fixture(scope="session")
def comfy_server(comfy_dir, tmp_path_factory):
    python = os.environ.get(COMFY_PYTHON_ENV, "").strip() or sys.executable
    custom_nodes = comfy_dir / "custom_nodes"
    link = find_pack_link(custom_nodes)
    created_link = None
    if link is None:
        link = custom_nodes / PACK_LINK_NAME
        if link.exists() or link.is_symlink():
            pytest.fail(f"{link} exists but is not a link to {REPO_ROOT}; remove it or link the repo yourself")
        custom_nodes.mkdir(exist_ok=True)
        link.symlink_to(REPO_ROOT, target_is_directory=True)
        created_link = link
    server = ComfyServer(comfy_dir, python, free_loopback_port(), tmp_path_factory.mktemp("comfyui"),
                         link, shlex.split(os.environ.get(COMFY_ARGS_ENV, "")))
    try:
        server.start(timeout=float(os.environ.get(START_TIMEOUT_ENV, "180")))
        yield server
    finally:
        server.stop()
        if created_link is not None and created_link.is_symlink():
            created_link.unlink()


@pytest.fixture(scope="session")
def tiny_checkpoint_name(comfy_server) -> str:
    """Name (as ComfyUI lists it) of the tiny random SD1.5 checkpoint in models/checkpoints."""
    spec = comfy_server.object_info("CheckpointLoaderSimple")["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"]
    names = [n for n in combo_options(spec) if Path(n).name.startswith("tiny") and n.endswith(".safetensors")]
    if TINY_CHECKPOINT in names:
        return TINY_CHECKPOINT
    if not names:
        pytest.skip(f"no tiny*.safetensors checkpoint in {comfy_server.comfy_dir / 'models' / 'checkpoints'}; "
                    "make one with make_tiny_ckpt.py (see /work/shared/comfyui-harness/README.md)")
    return sorted(names)[0]


@pytest.fixture(scope="session")
def model_fixtures(comfy_server) -> dict:
    """Family -> file name of the tiny random models (Flux, SD3, Wan 2.1, SDXL, CLIP-L, VAEs), built once into
    the server's models folders by make_fixtures.py (in ComfyUI's venv; kept while its content hash matches)."""
    cmd = [comfy_server.python, str(INTEGRATION_DIR / "make_fixtures.py"), "--comfy-dir", str(comfy_server.comfy_dir)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"make_fixtures.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    built = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    print(f"model fixtures ready in {time.monotonic() - t0:.0f}s: " +
          ", ".join(f"{b['family']} {b['mib']} MiB{' (cached)' if b.get('cached') else ''}" for b in built))
    return dict(FIXTURE_FILES)


@pytest.fixture
def api_workflow(tiny_checkpoint_name, model_fixtures):
    """``api_workflow(path) -> prompt`` with every model file pointed at its tiny fixture (SD1.5 checkpoints at
    the tiny SD1.5, SDXL / Flux / SD3 / Wan files and their text encoders and VAEs at :func:`use_tiny_models`)."""
    return lambda path: use_tiny_models(load_api_workflow(path), tiny_checkpoint_name)


@pytest.fixture
def cpu_api_workflow(api_workflow):
    """``cpu_api_workflow(path, **caps) -> prompt``: the tiny checkpoint, then :func:`shrink_for_cpu`."""
    return lambda path, **caps: shrink_for_cpu(api_workflow(path), **caps)


@pytest.fixture
def lora_folder(comfy_server):
    """A fresh folder under the server's models/loras (LoRA names are "<folder>/<file>"), removed afterwards."""
    folder = comfy_server.comfy_dir / "models" / "loras" / f"comfy_poe_test_{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def text_to_image_nodes(ckpt: str) -> dict:
    """Nodes 1-4 of the tests' text-to-image graphs: checkpoint, positive "a photo of a cat", negative
    "blurry", a 64×64 empty latent (a fresh dict per call)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }


@pytest.fixture
def prompt_nodes():
    """``prompt_nodes(ckpt) -> dict``: :func:`text_to_image_nodes` for tests (conftest is not importable)."""
    return text_to_image_nodes
