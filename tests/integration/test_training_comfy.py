"""Dual-Process Tune in a real ComfyUI: the tiny SD1.5 checkpoint is tuned for a few steps with a tiny random
Qwen2-VL judge (saved into models/vlm for the test), the LoRA is saved with Save Trained LoRA, and the file
loads with the core LoraLoader (no "lora key not loaded"), giving the same image as the node's MODEL output.
A second run with the same run_name resumes from the checkpoint."""
import importlib.util
import json
import re
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

pytestmark = pytest.mark.integration

_spec = importlib.util.spec_from_file_location("vlm_tiny", Path(__file__).resolve().parents[1] / "vlm_tiny.py")
vlm_tiny = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("vlm_tiny", vlm_tiny)
_spec.loader.exec_module(vlm_tiny)


@pytest.fixture
def tiny_vlm(comfy_server):
    root = comfy_server.comfy_dir / "models" / "vlm"
    created_root = not root.exists()
    folder = root / f"poe_itest_train_qwen2_vl_{uuid.uuid4().hex[:8]}"
    try:
        vlm_tiny.build_tiny_vlm("qwen2_vl", folder)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if created_root and root.exists() and not any(root.iterdir()):
            root.rmdir()


def sample_nodes(model_ref, prefix):
    return {
        "5": {"class_type": "KSampler", "inputs": {
            "model": model_ref, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 42,
            "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def tune_nodes(vlm_name, run_name, steps, save_name, eval_images=1):
    return {
        "10": {"class_type": "PoEVLMLoader", "inputs": {
            "model_name": vlm_name, "dtype": "float32", "trust_remote_code": False, "allow_pickle": False}},
        "11": {"class_type": "PoEVLMJudge", "inputs": {
            "vlm": ["10", 0], "questions": "Is there a cat in the image? | Yes", "mode": "dual_process",
            "weight": 1.0, "visual_prompt": "hline: 0.5", "batch_size": 1}},
        "20": {"class_type": "PoEDualProcessTune", "inputs": {
            "model": ["1", 0], "vae": ["1", 2], "positive": ["2", 0], "judges": ["11", 0], "latent": ["4", 0],
            "steps": steps, "sampling_steps": 2, "scheduler": "normal", "cfg": 1.0, "lr": 0.05, "rank": 4,
            "alpha": 4.0, "lora_scale": 2.0, "targets": "attention+feedforward", "custom_targets": "", "seed": 3,
            "pixel_range": "minmax", "gradient_checkpointing": True, "precision": "auto", "grad_clip": 1.0,
            "noise_pool": 100, "eval_images": eval_images, "run_name": run_name, "checkpoint_every": 1, "resume": True}},
        "21": {"class_type": "PoESaveTrainedLoRA", "inputs": {"lora": ["20", 1], "save_name": save_name,
                                                              "overwrite": False}},
        "22": {"class_type": "SaveImage", "inputs": {"images": ["20", 2], "filename_prefix": "poe_itest_curves"}},
    }


def image(server, entry, node):
    (item,) = entry["outputs"][node]["images"]
    path = server.output_dir / item.get("subfolder", "") / item["filename"]
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def test_training_nodes_are_registered(comfy_server):
    nodes = comfy_server.pack_nodes()
    for name in ("PoEDualProcessTune", "PoESaveTrainedLoRA", "PoELoadTrainedLoRA"):
        assert name in nodes, sorted(nodes)
    assert nodes["PoEDualProcessTune"]["output"] == ["MODEL", "LORA_MODEL", "IMAGE", "STRING"]
    for spec in nodes["PoEDualProcessTune"]["input"]["required"].values():
        assert spec[1].get("tooltip"), spec


def test_dual_process_tune_saves_a_lora_loraloader_loads(comfy_server, tiny_checkpoint_name, tiny_vlm, lora_folder, prompt_nodes):
    ck = tiny_checkpoint_name
    run_name = f"itest_{uuid.uuid4().hex[:8]}"
    save_name = f"{lora_folder.name}/tuned"
    log_start = len(comfy_server.log_text())
    base = image(comfy_server, comfy_server.run({**prompt_nodes(ck), **sample_nodes(["1", 0], "poe_train_base")},
                                                timeout=600), "7")

    prompt = {**prompt_nodes(ck), **tune_nodes(tiny_vlm.name, run_name, 3, save_name),
              **sample_nodes(["20", 0], "poe_train_node")}
    entry = comfy_server.run(prompt, timeout=900)
    report = entry["outputs"]["20"]["text"][0]
    print(report)
    assert re.search(r"Dual-Process tuning: 3 steps \(3 run now\)", report), report
    assert "judge score on 1 sampled images" in report
    node_img = image(comfy_server, entry, "7")
    curves = image(comfy_server, entry, "22")
    assert curves.shape[1] == 640 and curves.std() > 5

    saved = lora_folder / "tuned.safetensors"
    assert saved.is_file() and entry["outputs"]["21"]["text"][0].startswith("saved ")
    with safe_open(str(saved), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert keys and all(k.startswith("diffusion_model.") for k in keys)
    assert any(k.endswith("attn2.to_k.lora_up.weight") for k in keys) and any(".ff.net.2." in k for k in keys)
    recipe = json.loads(meta["comfy_poe.training"])
    assert recipe["method"] == "dual_process" and recipe["rank"] == 4
    from comfy_poe.lora import load_lora_file, parse_state_dict
    parsed = parse_state_dict(load_lora_file(saved).tensors)
    assert not parsed.skipped and all(m.rank == 4 for m in parsed.modules.values())

    # the saved file through the core LoraLoader == the node's MODEL output, and it changed the image
    loader = {"L": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
              "lora_name": f"{save_name}.safetensors", "strength_model": 1.0, "strength_clip": 1.0}}}
    loader_img = image(comfy_server, comfy_server.run(
        {**prompt_nodes(ck), **loader, **sample_nodes(["L", 0], "poe_train_loader")}, timeout=600), "7")
    changed = np.abs(node_img - base).mean()
    print(f"mean |Δ| vs base {changed:.3f}/255")
    assert changed > 0.5, "the tuned LoRA does not change the image"
    assert np.abs(node_img - loader_img).max() <= 1.0

    log = comfy_server.log_text()[log_start:]
    not_loaded = [line for line in log.splitlines() if "lora key not loaded" in line or "NOT LOADED" in line]
    assert not not_loaded, "\n".join(not_loaded[:20])

    # same run_name, more steps: resumes from the step-3 checkpoint
    prompt = {**prompt_nodes(ck), **tune_nodes(tiny_vlm.name, run_name, 4, f"{lora_folder.name}/tuned4", 0)}
    entry = comfy_server.run(prompt, timeout=900)
    report = entry["outputs"]["20"]["text"][0]
    assert "resumed from step 3" in report and "(1 run now" in report, report
    info = comfy_server.object_info("PoELoadTrainedLoRA")["PoELoadTrainedLoRA"]["input"]["required"]["lora_name"]
    assert f"run: {run_name}" in json.dumps(info)
    shutil.rmtree(comfy_server.output_dir / "comfy_poe_training" / run_name, ignore_errors=True)

    # a traversal save name is refused when the prompt is queued (Save Trained LoRA's validate_inputs), not after
    # the training; ComfyUI still runs the outputs that validated (the tuner is an output node itself)
    prompt = {**prompt_nodes(ck), **tune_nodes(tiny_vlm.name, "", 1, "../../evil", 0)}
    prompt_id, resp = comfy_server.submit(prompt)
    errors = json.dumps(resp.get("node_errors", {}))
    assert "PoESaveTrainedLoRA" in errors and "leave the LoRA folder" in errors, resp
    if prompt_id is not None:
        comfy_server.wait(prompt_id, timeout=600)
    assert not (comfy_server.comfy_dir / "models" / "evil.safetensors").exists()
