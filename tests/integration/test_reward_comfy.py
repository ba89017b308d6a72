"""Reward-model judges in a real ComfyUI: tiny random ImageReward and aesthetic models are converted
from official-layout pickles into models/reward, then the shipped "FK steering vs best-of-N" workflow
runs on the tiny SD1.5 checkpoint (the reward judges steer an SMC run and rank a best-of-N batch)."""
import importlib.util
import re
import shutil
import sys
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.integration

_spec = importlib.util.spec_from_file_location("reward_tiny", Path(__file__).resolve().parents[1] / "reward_tiny.py")
reward_tiny = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("reward_tiny", reward_tiny)
_spec.loader.exec_module(reward_tiny)

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "api" / "poe_fk_steering_vs_best_of_n_api.json"


@pytest.fixture
def reward_models(comfy_server, tmp_path):
    """(ImageReward folder, aesthetic folder) converted into the server's models/reward, removed afterwards."""
    from comfy_poe.experts.reward import convert_reward

    root = comfy_server.comfy_dir / "models" / "reward"
    created_root = not root.exists()
    tag = uuid.uuid4().hex[:8]
    ir_dir, aes_dir = root / f"poe_itest_ImageReward_{tag}", root / f"poe_itest_aesthetic_{tag}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pt, base = reward_tiny.build_imagereward(tmp_path)
            convert_reward("imagereward", pt, ir_dir, base=base, allow_pickle=True)
            pth, base = reward_tiny.build_aesthetic(tmp_path)
            convert_reward("aesthetic", pth, aes_dir, base=base, allow_pickle=True)
        yield ir_dir, aes_dir
    finally:
        shutil.rmtree(ir_dir, ignore_errors=True)
        shutil.rmtree(aes_dir, ignore_errors=True)
        if created_root and root.exists() and not any(root.iterdir()):
            root.rmdir()


def test_reward_nodes_are_registered(comfy_server):
    nodes = comfy_server.pack_nodes()
    assert nodes["PoERewardJudge"]["output"] == ["POE_JUDGES"]
    assert nodes["PoERewardJudge"]["category"] == "poe/judges"
    assert nodes["PoEFKSteeringSampler"]["output"] == ["SAMPLER"]


def test_fk_steering_vs_best_of_n_workflow(comfy_server, cpu_api_workflow, reward_models):
    ir_dir, aes_dir = reward_models
    spec = comfy_server.object_info("PoERewardJudge")["PoERewardJudge"]["input"]["required"]["model_name"]
    assert ir_dir.name in str(spec) and aes_dir.name in str(spec), "folders in models/reward are listed"

    prompt = cpu_api_workflow(WORKFLOW, steps=8, particles=3, batch_size=3)
    prompt["5"]["inputs"]["model_name"] = ir_dir.name
    prompt["5"]["inputs"]["dtype"] = "float32"
    # a second, chained reward (the aesthetic predictor needs no prompt) steers the FK run too
    prompt["20"] = {"class_type": "PoERewardJudge", "inputs": {
        "model_name": aes_dir.name, "prompt": "", "weight": 0.5, "dtype": "float32", "batch_size": 2,
        "judges": ["5", 0]}}
    prompt["9"]["inputs"].update(interval=2, start=2, end=6, judges=["20", 0])
    entry = comfy_server.run(prompt, timeout=600)

    report = entry["outputs"]["19"]["text"][0]
    rows = re.findall(r"rank (\d+): image (\d+)\s+score (-?[\d.]+(?:e-?\d+)?)", report)
    assert len(rows) == 3, report
    scores = [float(s) for _, _, s in rows]
    assert scores == sorted(scores, reverse=True) and all(np.isfinite(scores))
    assert "imagereward:" in report

    files = comfy_server.output_files(entry)
    assert len(files) == 2 and all(f.stat().st_size > 0 for f in files), entry["outputs"]
    best = [f for f in files if f.name.startswith("poe_best_of_n")]
    assert len(best) == 1
    # the saved best-of-N image re-scored outside ComfyUI with the same engine (8-bit PNG rounding)
    from comfy_poe.experts.reward import RewardJudge, load_reward_model

    image = torch.from_numpy(np.array(Image.open(best[0]).convert("RGB"))).float()[None] / 255
    judge = RewardJudge(load_reward_model(ir_dir, dtype="float32"), prompt["5"]["inputs"]["prompt"])
    with torch.no_grad():
        assert judge(image).item() == pytest.approx(scores[0], abs=0.02)


def test_pickle_only_folder_is_refused_with_the_converter_command(comfy_server, tiny_checkpoint_name, tmp_path):
    root = comfy_server.comfy_dir / "models" / "reward"
    created_root = not root.exists()
    folder = root / f"poe_itest_pickle_{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    try:
        torch.save(reward_tiny.random_head_state_dict(16), folder / "sac+logos+ava1-l14-linearMSE.pth")
        prompt = {"1": {"class_type": "PoERewardJudge", "inputs": {
                      "model_name": folder.name, "prompt": "", "weight": 1.0, "dtype": "auto", "batch_size": 1}},
                  "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
        with pytest.raises(Exception, match="convert-reward"):
            comfy_server.run(prompt, timeout=120)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if created_root and root.exists() and not any(root.iterdir()):
            root.rmdir()


def test_reward_judge_tunes_a_lora_with_dual_process(comfy_server, tiny_checkpoint_name, reward_models, prompt_nodes):
    """The same socket feeds the trainers: the aesthetic reward is the differentiable Dual-Process loss."""
    _, aes_dir = reward_models
    prompt = {**prompt_nodes(tiny_checkpoint_name),
              "11": {"class_type": "PoERewardJudge", "inputs": {
                  "model_name": aes_dir.name, "prompt": "", "weight": 1.0, "dtype": "float32", "batch_size": 1}},
              "20": {"class_type": "PoEDualProcessTune", "inputs": {
                  "model": ["1", 0], "vae": ["1", 2], "positive": ["2", 0], "judges": ["11", 0], "latent": ["4", 0],
                  "steps": 2, "sampling_steps": 2, "scheduler": "normal", "cfg": 1.0, "lr": 0.05, "rank": 4,
                  "alpha": 4.0, "lora_scale": 2.0, "targets": "attention+feedforward", "custom_targets": "", "seed": 3,
                  "pixel_range": "minmax", "gradient_checkpointing": True, "precision": "auto", "grad_clip": 1.0,
                  "noise_pool": 100, "eval_images": 1, "run_name": f"itest_reward_{uuid.uuid4().hex[:8]}",
                  "checkpoint_every": 1, "resume": False}},
              "21": {"class_type": "PreviewAny", "inputs": {"source": ["20", 3]}}}
    entry = comfy_server.run(prompt, timeout=900)
    report = entry["outputs"]["21"]["text"][0]
    assert re.search(r"Dual-Process tuning: 2 steps", report), report
    assert "judge score on 1 sampled images" in report
