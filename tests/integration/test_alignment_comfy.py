"""Alignment nodes in a real ComfyUI on the tiny SD1.5 checkpoint, kept small for CPU (64×64, 2 rollout steps,
1 training step each): a DAG-KL reward rollout with a latent-space reward, Diffusion-DPO on a pair folder,
pairs made by a brightness judge; the saved LoRAs load through the core LoraLoader without "lora key not
loaded"; a bad pair folder and a folder outside the input directory are refused naming the input."""
import json
import re
import shutil
import uuid

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

pytestmark = pytest.mark.integration

ALIGNMENT_NODES = ("PoEPreferencePairsFromFolder", "PoEPreferencePairsFromJudge", "PoEPreferenceTrainer",
                   "PoERewardRolloutTrainer")


@pytest.fixture
def pair_folders(comfy_server):
    """A valid 2-pair folder (bright chosen, dark rejected) and a broken one, inside the input directory."""
    root = comfy_server.input_dir / f"poe_pairs_{uuid.uuid4().hex[:8]}"
    good, bad = root / "good", root / "bad"
    for i in range(2):
        pair = good / f"p{i}"
        pair.mkdir(parents=True)
        (pair / "prompt.txt").write_text("a photo of a cat")
        rng = np.random.default_rng(i)
        Image.fromarray((200 + rng.integers(0, 50, (64, 64, 3))).astype(np.uint8)).save(pair / "chosen.png")
        Image.fromarray(rng.integers(0, 50, (64, 64, 3)).astype(np.uint8)).save(pair / "rejected.png")
    broken = bad / "only_chosen"
    broken.mkdir(parents=True)
    (broken / "prompt.txt").write_text("a cat")
    shutil.copy(good / "p0" / "chosen.png", broken / "chosen.png")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def run_settings(run_name, save_name, trainer_id):
    return {"seed": 3, "gradient_checkpointing": False, "precision": "auto", "run_name": run_name,
            "checkpoint_every": 1, "resume": True}, {
        f"{trainer_id}s": {"class_type": "PoESaveTrainedLoRA", "inputs": {"lora": [trainer_id, 1],
                                                                         "save_name": save_name, "overwrite": False}}}


def rollout_nodes(run_name, save_name, steps=1):
    settings, save = run_settings(run_name, save_name, "20")
    return {
        # latent-space reward: −mean‖x‖² against the empty (zero) latent — no VAE decode needed
        "10": {"class_type": "PoEProximityJudge", "inputs": {"reference_latent": ["4", 0], "weight": 1.0}},
        "20": {"class_type": "PoERewardRolloutTrainer", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "judges": ["10", 0], "latent": ["4", 0],
            "method": "DAG-KL", "steps": steps, "trajectories": 2, "rollout_steps": 2, "scheduler": "normal",
            "cfg": 1.0, "timestep_fraction": 0.5, "lr": 1e-3, "rank": 2, "alpha": 2.0, "targets": "attention",
            "reward_beta": 1.0, "proximal": 1.0, **settings}},
        **save,
    }


def preference_nodes(folder, run_name, save_name, method="DPO"):
    settings, save = run_settings(run_name, save_name, "30")
    return {
        "25": {"class_type": "PoEPreferencePairsFromFolder", "inputs": {"folder": folder, "size": 0, "max_pairs": 0}},
        "30": {"class_type": "PoEPreferenceTrainer", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "pairs": ["25", 0], "method": method, "steps": 1,
            "batch_size": 2, "lr": 1e-3, "rank": 2, "alpha": 2.0, "targets": "attention", "beta_mapo": 0.1,
            "beta_dpo": 5000.0, "flip": True, **settings}},
        **save,
    }


def loader_nodes(lora_name, prefix):
    return {
        "L": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name,
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["L", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 1,
            "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def check_saved_lora(path, method):
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert keys and all(k.startswith("diffusion_model.") for k in keys)
    assert any(k.endswith("attn1.to_q.lora_up.weight") for k in keys), sorted(keys)[:5]
    assert not any("flow" in k or k.startswith("aux") for k in keys)  # the GFlowNet flow is not exported
    assert json.loads(meta["comfy_poe.training"])["method"] == method


def error_text(comfy_server, prompt):
    prompt_id, response = comfy_server.submit(prompt)
    if prompt_id is None:
        return "validation", json.dumps(response)
    status = comfy_server.wait(prompt_id, timeout=600)["status"]
    assert status["status_str"] == "error", status
    return "execution", json.dumps(status["messages"])


def test_alignment_nodes_are_registered(comfy_server):
    nodes = comfy_server.pack_nodes()
    for name in ALIGNMENT_NODES:
        assert name in nodes, sorted(nodes)
        assert nodes[name]["category"] == "poe/training"
        for section in ("required", "optional"):
            for spec in nodes[name]["input"].get(section, {}).values():
                assert spec[1].get("tooltip"), (name, spec)
    for name in ("PoEPreferenceTrainer", "PoERewardRolloutTrainer"):
        assert nodes[name]["output"] == ["MODEL", "LORA_MODEL", "IMAGE", "STRING"]
    assert nodes["PoEPreferencePairsFromFolder"]["output"][0] == "POE_PREFERENCE_PAIRS"
    assert nodes["PoEPreferenceTrainer"]["input"]["required"]["pairs"][0] == "POE_PREFERENCE_PAIRS"
    assert nodes["PoERewardRolloutTrainer"]["input"]["required"]["judges"][0] == "POE_JUDGES"


def test_alignment_trainers_run_and_loras_load(comfy_server, tiny_checkpoint_name, lora_folder, pair_folders, prompt_nodes):
    ck = tiny_checkpoint_name
    log_start = len(comfy_server.log_text())
    run_name = f"itest_align_{uuid.uuid4().hex[:8]}"

    # DAG-KL on a latent reward, 1 step, checkpointed (resume itself is covered by the engine tests and the
    # Dual-Process integration test, which share the checkpoint code; one more CPU step here costs ~60 s)
    entry = comfy_server.run({**prompt_nodes(ck), **rollout_nodes(run_name, f"{lora_folder.name}/dag")}, timeout=600)
    report = entry["outputs"]["20"]["text"][0]
    print(report)
    assert re.search(r"DAG-KL reward training, 2 trajectories/step: 1 steps \(1 run now\)", report), report
    assert re.search(r"reward +first 10%: -?\d", report), report
    check_saved_lora(lora_folder / "dag.safetensors", "dag-kl")
    run_dir = comfy_server.output_dir / "comfy_poe_training" / run_name
    state = json.loads((run_dir / "state.json").read_text())
    assert state["step"] == 1 and any(p.startswith("aux.flow.") for p in state["params"])  # flow net checkpointed
    assert (run_dir / "lora.safetensors").is_file()
    shutil.rmtree(run_dir, ignore_errors=True)

    # Diffusion-DPO on the pair folder (reference = the model without the LoRA)
    folder = f"{pair_folders.name}/good"
    entry = comfy_server.run({**prompt_nodes(ck), **preference_nodes(folder, "", f"{lora_folder.name}/dpo")},
                             timeout=600)
    report = entry["outputs"]["30"]["text"][0]
    print(report)
    assert "DPO preference training on 2 pairs: 1 steps" in report, report
    assert "margin mean(L_rej − L_cho) on 2 pairs" in report
    check_saved_lora(lora_folder / "dpo.safetensors", "dpo")

    # pairs made by a brightness judge: 2 groups of 2 flat images (bright vs dark) -> 2 pairs, bright chosen
    judge_prompt = {
        "40": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0xE0E0E0}},
        "41": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x202020}},
        "42": {"class_type": "ImageBatch", "inputs": {"image1": ["40", 0], "image2": ["41", 0]}},
        "43": {"class_type": "ImageBatch", "inputs": {"image1": ["41", 0], "image2": ["42", 0]}},
        "44": {"class_type": "ImageBatch", "inputs": {"image1": ["43", 0], "image2": ["40", 0]}},  # D B D B
        "45": {"class_type": "PoEImageStatisticsJudge", "inputs": {"brightness": 1.0, "contrast": -1.0,
                                                                   "saturation": -1.0, "tolerance": 0.2, "weight": 1.0}},
        "46": {"class_type": "PoEPreferencePairsFromJudge", "inputs": {
            "images": ["44", 0], "prompts": "a bright room\na dark room", "judges": ["45", 0],
            "images_per_prompt": 2, "min_gap": 0.0}},
        "47": {"class_type": "SaveImage", "inputs": {"images": ["46", 1], "filename_prefix": "poe_itest_pairs"}},
    }
    entry = comfy_server.run(judge_prompt, timeout=300)
    (item1, item2) = entry["outputs"]["47"]["images"]
    for item in (item1, item2):
        preview = np.asarray(Image.open(comfy_server.output_dir / item.get("subfolder", "") / item["filename"]))
        assert preview.shape[:2] == (64, 128)  # chosen | rejected
        assert preview[:, :64].mean() > 200 and preview[:, 64:].mean() < 50

    # both saved files through the core LoraLoader: every key maps onto the model
    for name in ("dag", "dpo"):
        comfy_server.run({**prompt_nodes(ck), **loader_nodes(f"{lora_folder.name}/{name}.safetensors",
                                                           f"poe_itest_align_{name}")}, timeout=600)
    log = comfy_server.log_text()[log_start:]
    not_loaded = [line for line in log.splitlines() if "lora key not loaded" in line or "NOT LOADED" in line]
    assert not not_loaded, "\n".join(not_loaded[:20])


def test_bad_pair_folders_are_refused(comfy_server, tiny_checkpoint_name, pair_folders, prompt_nodes):
    def prompt(folder):
        return {"25": {"class_type": "PoEPreferencePairsFromFolder",
                       "inputs": {"folder": folder, "size": 0, "max_pairs": 0}},
                "26": {"class_type": "SaveImage", "inputs": {"images": ["25", 1], "filename_prefix": "poe_bad"}}}

    stage, text = error_text(comfy_server, prompt(f"{pair_folders.name}/bad"))
    assert stage == "execution" and "folder:" in text and "only_chosen" in text and "rejected" in text, text
    stage, text = error_text(comfy_server, prompt("../../etc"))
    assert stage == "validation" and "folder" in text and "leaves ComfyUI's input directory" in text, text
    stage, text = error_text(comfy_server, prompt(f"{pair_folders.name}/missing"))
    assert stage == "validation" and "does not exist" in text, text
    stage, text = error_text(comfy_server, {**prompt_nodes(tiny_checkpoint_name), **preference_nodes(
        f"{pair_folders.name}/good", "", "unused", method="KTO")})
    assert stage == "validation" and "method must be one of" in text, text
    # a run_name that would leave output/comfy_poe_training: refused at validation, for both trainers
    stage, text = error_text(comfy_server, {**prompt_nodes(tiny_checkpoint_name), **preference_nodes(
        f"{pair_folders.name}/good", "../../escape", "unused")})
    assert stage == "validation" and "run_name" in text and "'..'" in text, text
    stage, text = error_text(comfy_server, {**prompt_nodes(tiny_checkpoint_name), **rollout_nodes("/abs/run", "unused")})
    assert stage == "validation" and "run_name" in text and "absolute path" in text, text
