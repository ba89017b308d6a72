"""api_batch CLI against real ComfyUI servers: the tiny txt2img workflow, three seeds and one job ComfyUI rejects;
then two servers, one killed (SIGKILL) while it holds jobs: every job ends success, each exactly once in the
manifest, with its output files on the server that ran it, and the local input image uploaded to each server
through /upload/image. The second server runs from the same ComfyUI checkout as the session's comfy_server with
its own port, output / input / temp / user folders and database, so the two never share a file."""
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DATA_DIR = Path(__file__).resolve().parent / "data"
REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration

SEEDS = (11, 12, 13)
N_JOBS = 8


def test_api_batch_cli_runs_jobs_and_reports_failures(comfy_server, api_workflow, tmp_path):
    workflow = api_workflow(DATA_DIR / "txt2img_tiny_sd15_api.json")
    workflow["2"]["_meta"] = {"title": "Positive"}
    wf_path = tmp_path / "txt2img_api.json"
    wf_path.write_text(json.dumps(workflow))
    jobs = [{"id": f"seed{s}", "set": {"KSampler.seed": s, "SaveImage.filename_prefix": f"batch/seed{s}"}}
            for s in SEEDS]
    jobs[0]["set"]["Positive.text"] = "a photo of a dog"  # selected by title
    jobs.insert(2, {"id": "bad-sampler", "set": {"5.sampler_name": "no_such_sampler", "KSampler.seed": 99}})
    jobs_path = tmp_path / "jobs.jsonl"
    jobs_path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    manifest_path = tmp_path / "out" / "manifest.json"

    proc = subprocess.run(
        [sys.executable, "-m", "comfy_poe.api_batch", "--server", comfy_server.url, "--workflow", str(wf_path),
         "--overrides", str(jobs_path), "--out", str(manifest_path), "--timeout", "600", "--verbose"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=700)
    assert proc.returncode == 1, proc.stderr  # one job failed
    manifest = json.loads(manifest_path.read_text())
    assert manifest["complete"] and manifest["summary"] == {"rejected": 1, "success": 3}
    by_id = {j["id"]: j for j in manifest["jobs"]}

    pixels = []
    for seed in SEEDS:
        job = by_id[f"seed{seed}"]
        assert job["status"] == "success" and job["error"] is None, job
        expected = {"5.seed": seed, "7.filename_prefix": f"batch/seed{seed}"}
        if seed == SEEDS[0]:
            expected["2.text"] = "a photo of a dog"
        assert job["overrides"] == expected
        assert len(job["outputs"]) == 1
        out = job["outputs"][0]
        assert (out["node"], out["type"], out["subfolder"]) == ("7", "output", "batch")
        path = comfy_server.output_dir / out["subfolder"] / out["filename"]
        assert path.is_file() and out["filename"].startswith(f"seed{seed}_")
        with Image.open(path) as img:
            assert img.size == (64, 64)
            sent = json.loads(img.info["prompt"])  # the prompt ComfyUI ran, embedded by SaveImage
            assert sent["5"]["inputs"]["seed"] == seed
            assert sent["2"]["inputs"]["text"] == expected.get("2.text", "a photo of a cat")
            pixels.append(np.asarray(img.convert("RGB"), dtype=np.int16))
        t = job["timings"]
        assert t["submitted"] <= t["started"] <= t["finished"] and t["run_s"] >= 0 and t["total_s"] > 0
    assert len({job["prompt_id"] for job in manifest["jobs"] if job["prompt_id"]}) == 3

    bad = by_id["bad-sampler"]
    assert bad["status"] == "rejected" and bad["prompt_id"] is None and bad["outputs"] == []
    assert "node 5 (KSampler)" in bad["error"]["message"] and "no_such_sampler" in bad["error"]["message"]
    assert bad["node_errors"]["5"]["errors"][0]["extra_info"]["input_name"] == "sampler_name"

    # progress came through the websocket (per-step lines), and the run summary was printed
    assert "[seed13] 5 (KSampler): 4/4" in proc.stderr, proc.stderr
    assert "4 job(s): 1 rejected, 3 success" in proc.stderr
    # the overrides and the sampler did something: the three seeds are not identical images
    assert (pixels[0] != pixels[1]).any() or (pixels[1] != pixels[2]).any()

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def second_server(comfy_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("comfyui_second")
    (work / "user").mkdir()
    server = type(comfy_server)(comfy_server.comfy_dir, comfy_server.python, _free_port(), work,
                                comfy_server.pack_link,
                                [*comfy_server.extra_args, "--user-directory", str(work / "user"),
                                 "--database-url", f"sqlite:///{work / 'comfyui.db'}"])
    try:
        server.start(timeout=240)
        yield server
    finally:
        server.stop()


def img2img_workflow(api_workflow) -> dict:
    workflow = api_workflow(DATA_DIR / "txt2img_tiny_sd15_api.json")
    workflow["8"] = {"class_type": "LoadImage", "inputs": {"image": "example.png"}}
    workflow["9"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["8", 0], "vae": ["1", 2]}}
    workflow["5"]["inputs"]["latent_image"] = ["9", 0]
    del workflow["4"]
    return workflow


def test_batch_survives_a_killed_server(comfy_server, second_server, api_workflow, tmp_path):
    image = tmp_path / "input.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(image)
    wf_path = tmp_path / "img2img_api.json"
    wf_path.write_text(json.dumps(img2img_workflow(api_workflow)))
    jobs = [{"id": f"job{i}", "set": {"KSampler.seed": 500 + i, "LoadImage.image": str(image),
                                      "SaveImage.filename_prefix": f"multi/job{i}"}} for i in range(N_JOBS)]
    jobs_path = tmp_path / "jobs.jsonl"
    jobs_path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    servers_file = tmp_path / "servers.txt"
    servers_file.write_text(f"# two servers\n{second_server.url}\n{comfy_server.url}\n")
    manifest_path = tmp_path / "manifest.json"
    log_path = tmp_path / "batch.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "comfy_poe.api_batch", "--servers-file", str(servers_file),
             "--workflow", str(wf_path), "--overrides", str(jobs_path), "--out", str(manifest_path),
             "--per-server", "2", "--poll", "0.5", "--timeout", "900"],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        # kill the second server as soon as it holds a job that has not finished
        killed_holding = None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                manifest = json.loads(manifest_path.read_text())
            except (OSError, ValueError):
                manifest = None
            held = [j["id"] for j in (manifest or {}).get("jobs", [])
                    if j["server"] == second_server.url and j["status"] in ("queued", "running")]
            if held:
                second_server.process.kill()  # a crash: no clean shutdown
                second_server.process.wait(timeout=30)
                killed_holding = held
                break
            time.sleep(0.2)
        assert killed_holding, f"the second server never held a job; log:\n{log_path.read_text()}"
        proc.wait(timeout=800)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log_text = log_path.read_text()
    assert proc.returncode == 0, log_text
    manifest = json.loads(manifest_path.read_text())
    assert manifest["complete"] and manifest["summary"] == {"success": N_JOBS}, log_text
    assert [j["id"] for j in manifest["jobs"]] == [f"job{i}" for i in range(N_JOBS)]  # each once
    state = {s["url"]: s for s in manifest["servers"]}
    assert state[second_server.url]["alive"] is False and state[comfy_server.url]["alive"] is True
    roots = {comfy_server.url: comfy_server.output_dir, second_server.url: second_server.output_dir}
    for job in manifest["jobs"]:
        assert job["status"] == "success" and len(job["outputs"]) == 1, job
        out = job["outputs"][0]
        path = roots[job["server"]] / out["subfolder"] / out["filename"]
        assert path.is_file() and out["filename"].startswith(f"{job['id']}_"), job
        with Image.open(path) as img:
            sent = json.loads(img.info["prompt"])  # the prompt that server ran
        seed = 500 + int(job["id"][3:])
        assert sent["5"]["inputs"]["seed"] == seed
        assert sent["8"]["inputs"]["image"].startswith("comfy_poe_batch/") and job["uploads"] == {"8.image": str(image)}
    # the jobs the killed server held were run again on the other one, their lost tries listed
    for job_id in killed_holding:
        job = next(j for j in manifest["jobs"] if j["id"] == job_id)
        assert job["server"] == comfy_server.url
        assert [a["server"] for a in job["attempts"]] == [second_server.url]
    # the upload reached the surviving server's input folder
    assert list((comfy_server.input_dir / "comfy_poe_batch").glob("*_input.png"))
    assert "stopped answering" in log_text
