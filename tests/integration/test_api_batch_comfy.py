"""api_batch CLI against a real ComfyUI: the tiny txt2img workflow, three seeds and one job ComfyUI rejects."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DATA_DIR = Path(__file__).resolve().parent / "data"
REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration

SEEDS = (11, 12, 13)


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
         "--overrides", str(jobs_path), "--out", str(manifest_path), "--timeout", "600"],
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
