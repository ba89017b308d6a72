"""SELMA nodes in a real ComfyUI: a programmed tiny LLM in models/LLM writes skill prompts, the tiny
SD1.5 checkpoint generates them into a dataset folder that a second run extends (resume), and the Skill
LoRA Trainer trains on a dataset made in-test and its LoRA is saved with Save Trained LoRA."""
import importlib.util
import json
import shutil
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

_spec = importlib.util.spec_from_file_location("selma_unit_tests", Path(__file__).resolve().parents[1] / "test_selma.py")
selma_unit = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("selma_unit_tests", selma_unit)
_spec.loader.exec_module(selma_unit)

SKILL = selma_unit.TINY_SKILL


@pytest.fixture
def tiny_llm(comfy_server):
    root = comfy_server.comfy_dir / "models" / "LLM"
    created_root = not root.exists()
    folder = root / f"poe_itest_llm_{uuid.uuid4().hex[:8]}"
    try:
        selma_unit.build_tiny_llm(folder, selma_unit.TINY_ANSWER)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if created_root and root.exists() and not any(root.iterdir()):
            root.rmdir()


def workflow(checkpoint: str, llm_name: str, dataset: str, images_per_prompt: int) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "PoESelmaSkillPrompts", "inputs": {
            "llm_name": llm_name, "skill": "custom", "description": SKILL.description,
            "rules": "\n".join(SKILL.rules), "examples": "\n".join(SKILL.examples), "count": 2, "seed": 0,
            "max_words": SKILL.max_words, "rouge_threshold": 0.8, "max_attempts": 3, "temperature": 1.0,
            "max_new_tokens": 16, "save_name": f"{dataset.strip('./')}_prompts", "dtype": "float32",
            "trust_remote_code": False, "allow_pickle": False}},
        "3": {"class_type": "PoESelmaSkillDataset", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "prompts": ["2", 0], "prompts_file": "",
            "dataset_name": dataset, "images_per_prompt": images_per_prompt, "seed": 3, "steps": 2, "cfg": 4.0,
            "sampler_name": "euler", "scheduler": "normal", "width": 64, "height": 64, "batch_size": 2,
            "negative": "", "threshold": 0.0, "filter_images": True}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 2]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["3", 1], "filename_prefix": "poe_itest_selma"}},
    }


def test_selma_nodes_are_registered(comfy_server):
    nodes = comfy_server.pack_nodes()
    assert nodes["PoESelmaSkillPrompts"]["output"] == ["STRING", "STRING", "STRING"]
    assert nodes["PoESelmaSkillPrompts"]["output_is_list"] == [False, True, False]
    assert nodes["PoESelmaSkillDataset"]["output"] == ["STRING", "IMAGE", "STRING"]
    assert nodes["PoESelmaSkillLoRATrainer"]["output"] == ["MODEL", "LORA_MODEL", "IMAGE", "STRING"]
    options = nodes["PoESelmaSkillPrompts"]["input"]["required"]["skill"][1]["options"]
    assert {"count", "spatial", "text_rendering", "long_prompts", "commonsense_defying", "custom"} <= set(options)


def test_prompts_then_dataset_then_resume(comfy_server, tiny_checkpoint_name, tiny_llm):
    info = comfy_server.object_info("PoESelmaSkillPrompts")["PoESelmaSkillPrompts"]["input"]["required"]["llm_name"]
    assert tiny_llm.name in json.dumps(info), "a folder dropped into models/LLM is listed without a restart"
    name = f"poe_itest_{uuid.uuid4().hex[:8]}"
    entry = comfy_server.run(workflow(tiny_checkpoint_name, tiny_llm.name, name, 1), timeout=300)
    prompts_txt = comfy_server.output_dir / "selma" / f"{name}_prompts.txt"
    assert prompts_txt.read_text().splitlines() == ["Two frogs on a sofa.", "A fox under a desk."]
    root = comfy_server.output_dir / "selma" / name
    records = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["sample"]) for r in records] == [("Two frogs on a sofa.", 0), ("A fox under a desk.", 0)]
    assert all(r["accepted"] and (root / r["image"]).is_file() for r in records)
    assert len(comfy_server.output_files(entry)) == 2
    # resume/extend: a second image per prompt generates only the two missing ones
    entry = comfy_server.run(workflow(tiny_checkpoint_name, tiny_llm.name, name, 2), timeout=300)
    report = entry["outputs"]["4"]["text"][0]
    assert "2 images generated this run" in report and "2 of 4 already done" in report, report
    records = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert sorted((r["prompt"], r["sample"]) for r in records) == sorted(
        (p, k) for p in ("Two frogs on a sofa.", "A fox under a desk.") for k in (0, 1))
    assert len({r["seed"] for r in records}) == 4


def test_bad_dataset_name_is_refused(comfy_server, tiny_checkpoint_name, tiny_llm):
    prompt = workflow(tiny_checkpoint_name, tiny_llm.name, "../escape", 1)
    prompt_id, resp = comfy_server.submit(prompt)
    assert prompt_id is not None
    entry = comfy_server.wait(prompt_id)
    messages = json.dumps(entry["status"].get("messages", []))
    assert entry["status"]["status_str"] == "error", messages
    assert "PoESelmaSkillDataset" in messages and "dataset_name" in messages and "'..'" in messages, messages
    assert not (comfy_server.output_dir / "escape").exists()


def test_skill_lora_trainer_trains_and_the_lora_is_saved(comfy_server, tiny_checkpoint_name):
    import torch

    from comfy_poe.lora import load_lora_file, parse_state_dict
    from comfy_poe.selma.dataset import SkillDataset

    name = f"poe_itest_train_{uuid.uuid4().hex[:8]}"
    dataset = SkillDataset(comfy_server.output_dir / "selma" / name)
    g = torch.Generator().manual_seed(0)
    for i, caption in enumerate(["two red apples", "three blue cups"]):
        dataset.append(caption, 0, i, torch.rand(64, 64, 3, generator=g), True)
    save_name = f"comfy_poe_selma_test_{uuid.uuid4().hex[:8]}/skill"
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint_name}},
        "2": {"class_type": "PoESelmaSkillLoRATrainer", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset_path": name, "preset": "tiny",
            "steps": 2, "lr": 1e-3, "rank": 4, "batch_size": 2, "seed": 0, "run_name": "",
            "checkpoint_every": 0, "gradient_checkpointing": True, "precision": "off"}},
        "3": {"class_type": "PoESaveTrainedLoRA", "inputs": {"lora": ["2", 1], "save_name": save_name,
                                                             "overwrite": False}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["2", 3]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["2", 2]}},
    }
    folder = comfy_server.comfy_dir / "models" / "loras" / save_name.split("/")[0]
    try:
        entry = comfy_server.run(prompt, timeout=600)
        report = entry["outputs"]["4"]["text"][0]
        assert "2 pairs (2 captions), 2 steps" in report and "rank 4" in report, report
        data = load_lora_file(folder / "skill.safetensors")
        parsed = parse_state_dict(data.tensors)
        assert parsed.modules and not parsed.skipped
        assert all(m.rank == 4 and m.name.key.startswith("diffusion_model.") for m in parsed.modules.values())
        assert json.loads(data.metadata["comfy_poe.training"])["method"] == "selma_skill"
        # two AdamW steps moved the zero-initialised up factors
        assert any(float(m.up.abs().max()) > 0 for m in parsed.modules.values())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(comfy_server.output_dir / "selma" / name, ignore_errors=True)
