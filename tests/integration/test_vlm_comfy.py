"""VLM-Judge nodes in a real ComfyUI: a tiny random Qwen2-VL and a tiny CLIP are saved into models/vlm,
then a workflow generates a batch with the tiny SD1.5 checkpoint, scores and ranks it (best-of-N)."""
import importlib.util
import json
import re
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.integration

_spec = importlib.util.spec_from_file_location("vlm_tiny", Path(__file__).resolve().parents[1] / "vlm_tiny.py")
vlm_tiny = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("vlm_tiny", vlm_tiny)
_spec.loader.exec_module(vlm_tiny)

QUESTIONS = "Is there a cat in the image? | Yes | 1\nIs the image blurry? | No | 0.5"
VISUAL_PROMPT = "hline: 0.5"


@pytest.fixture
def tiny_models(comfy_server):
    """(vlm name, clip name) saved under ComfyUI's models/vlm for the duration of the test."""
    root = comfy_server.comfy_dir / "models" / "vlm"
    created_root = not root.exists()
    tag = uuid.uuid4().hex[:8]
    vlm_dir, clip_dir = root / f"poe_itest_qwen2_vl_{tag}", root / f"poe_itest_clip_{tag}"
    try:
        vlm_tiny.build_tiny_vlm("qwen2_vl", vlm_dir)
        vlm_tiny.build_tiny_vlm("clip", clip_dir)
        yield vlm_dir, clip_dir
    finally:
        shutil.rmtree(vlm_dir, ignore_errors=True)
        shutil.rmtree(clip_dir, ignore_errors=True)
        if created_root and root.exists() and not any(root.iterdir()):
            root.rmdir()


def workflow(checkpoint: str, vlm_name: str, clip_name: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 56, "height": 56, "batch_size": 3}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 7,
            "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "10": {"class_type": "PoEVLMLoader", "inputs": {
            "model_name": vlm_name, "dtype": "float32", "trust_remote_code": False, "allow_pickle": False}},
        "11": {"class_type": "PoEVLMJudge", "inputs": {
            "vlm": ["10", 0], "questions": QUESTIONS, "mode": "yes_no", "weight": 1.0,
            "visual_prompt": VISUAL_PROMPT, "batch_size": 2}},
        "12": {"class_type": "PoECLIPJudge", "inputs": {
            "model_name": clip_name, "prompts": "a red cat | 0.25", "negatives": "a dog", "weight": 1.0,
            "dtype": "float32", "trust_remote_code": False, "allow_pickle": False, "judges": ["11", 0]}},
        "13": {"class_type": "PoEVLMScore", "inputs": {"images": ["6", 0], "judges": ["12", 0], "top_k": 2}},
        "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 1], "filename_prefix": "poe_itest_vlm_top"}},
        "15": {"class_type": "PreviewAny", "inputs": {"source": ["13", 2]}},
        "16": {"class_type": "PoEVLMAsk", "inputs": {
            "vlm": ["10", 0], "image": ["13", 1], "question": "Describe the image.", "max_new_tokens": 3,
            "visual_prompt": ""}},
    }


def test_vlm_nodes_are_registered(comfy_server):
    nodes = comfy_server.pack_nodes()
    for name in ("PoEVLMLoader", "PoEVLMJudge", "PoECLIPJudge", "PoEVLMScore", "PoEVLMAsk"):
        assert name in nodes, sorted(nodes)
    outputs = nodes["PoEVLMScore"]["output"]
    assert outputs == ["IMAGE", "IMAGE", "STRING", "FLOAT"]
    assert nodes["PoEVLMJudge"]["output"] == ["POE_JUDGES"]


def test_workflow_scores_and_ranks_a_generated_batch(comfy_server, tiny_checkpoint_name, tiny_models):
    vlm_dir, clip_dir = tiny_models
    info = comfy_server.object_info("PoEVLMLoader")["PoEVLMLoader"]["input"]["required"]["model_name"]
    assert vlm_dir.name in json.dumps(info), "a folder dropped into models/vlm is listed without a restart"

    entry = comfy_server.run(workflow(tiny_checkpoint_name, vlm_dir.name, clip_dir.name), timeout=300)
    report = entry["outputs"]["15"]["text"][0]
    rows = re.findall(r"rank (\d+): image (\d+)\s+score (-?[\d.]+(?:e-?\d+)?)", report)
    assert len(rows) == 3, report
    ranks = [int(r) for r, _, _ in rows]
    order = [int(i) for _, i, _ in rows]
    scores = [float(s) for _, _, s in rows]
    assert ranks == [1, 2, 3] and sorted(order) == [0, 1, 2]
    assert scores == sorted(scores, reverse=True) and all(np.isfinite(scores))
    assert "vlm:" in report and "clip:" in report, "both chained judges are reported"
    assert isinstance(entry["outputs"]["16"]["text"][0], str)

    files = comfy_server.output_files(entry)
    assert len(files) == 2, entry["outputs"]
    # Re-score the saved top-k images outside ComfyUI with the same engine: ranks and scores agree
    # (up to the 8-bit PNG rounding).
    from comfy_poe.experts.clip_judge import CLIPJudge, load_clip
    from comfy_poe.experts.overlays import parse_visual_prompt
    from comfy_poe.experts.vlm import load_vlm
    from comfy_poe.experts.vlm_judge import VLMJudge, parse_questions

    saved = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).float() / 255 for f in files])
    vlm = VLMJudge(load_vlm(vlm_dir, dtype="float32"), parse_questions(QUESTIONS),
                   overlays=parse_visual_prompt(VISUAL_PROMPT))
    clip = CLIPJudge(*load_clip(clip_dir, dtype="float32"), [("a red cat", 0.25)], ["a dog"])
    with torch.no_grad():
        local = (vlm(saved) + clip(saved)).tolist()
    assert local == pytest.approx(scores[:2], abs=0.02)


def test_empty_questions_and_prompts_are_refused_when_queued(comfy_server, tiny_checkpoint_name, tiny_models):
    vlm_dir, clip_dir = tiny_models
    for node, key, value, words in (("11", "questions", "  \n# only a comment\n", "at least one question"),
                                    ("11", "visual_prompt", "circle: 0.5", "visual prompt line"),
                                    ("12", "prompts", "\n", "at least one prompt")):
        prompt = workflow(tiny_checkpoint_name, vlm_dir.name, clip_dir.name)
        prompt[node]["inputs"][key] = value
        prompt_id, resp = comfy_server.submit(prompt)
        assert prompt_id is None, f"{key}={value!r} was queued"
        assert words in json.dumps(resp["node_errors"]), resp


def test_unsafe_model_folders_are_refused_when_queued(comfy_server, tiny_checkpoint_name, tiny_models):
    """Custom code (auto_map) and pickle-only weights are refused at queue time, naming model_name and the
    switch that would allow them; nothing is loaded or executed."""
    vlm_dir, clip_dir = tiny_models
    remote, pickled = vlm_dir.with_name(vlm_dir.name + "_remote"), clip_dir.with_name(clip_dir.name + "_pickle")
    try:
        shutil.copytree(vlm_dir, remote)
        config = json.loads((remote / "config.json").read_text())
        (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling_evil.Evil"}}))
        shutil.copytree(clip_dir, pickled)
        for weights in pickled.glob("*.safetensors"):
            weights.rename(weights.with_suffix(".bin"))
        for name_vlm, name_clip, words in ((remote.name, clip_dir.name, "trust_remote_code"),
                                           (vlm_dir.name, pickled.name, "allow_pickle")):
            prompt_id, resp = comfy_server.submit(workflow(tiny_checkpoint_name, name_vlm, name_clip))
            assert prompt_id is None, f"{name_vlm} / {name_clip} was queued"
            text = json.dumps(resp["node_errors"])
            assert "model_name" in text and words in text, resp
    finally:
        shutil.rmtree(remote, ignore_errors=True)
        shutil.rmtree(pickled, ignore_errors=True)
