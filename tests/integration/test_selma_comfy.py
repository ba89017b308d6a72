"""SELMA nodes in a real ComfyUI: a programmed tiny LLM in models/LLM writes skill prompts, the tiny
SD1.5 checkpoint generates them into a dataset folder that a second run extends (resume), and the Skill
LoRA Trainer trains on a dataset made in-test and its LoRA is saved with Save Trained LoRA.

The shipped chain (workflows/api/selma_chain_api.json: prompts → dataset → skill LoRA → save, per skill, then
LoRA Stack → LoRA Merge → sample) runs end to end at tiny sizes; the merged file is checked against the
skill LoRAs and through the core LoraLoader."""
import contextlib
import importlib.util
import json
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration

_spec = importlib.util.spec_from_file_location("selma_unit_tests", Path(__file__).resolve().parents[1] / "test_selma.py")
selma_unit = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("selma_unit_tests", selma_unit)
_spec.loader.exec_module(selma_unit)

SKILL = selma_unit.TINY_SKILL


@contextlib.contextmanager
def programmed_llm_in_models(comfy_server, answer_lines):
    """A programmed tiny Llama (see test_selma.build_tiny_llm) in models/LLM, removed afterwards."""
    root = comfy_server.comfy_dir / "models" / "LLM"
    created_root = not root.exists()
    folder = root / f"poe_itest_llm_{uuid.uuid4().hex[:8]}"
    try:
        selma_unit.build_tiny_llm(folder, answer_lines)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if created_root and root.exists() and not any(root.iterdir()):
            root.rmdir()


@pytest.fixture
def tiny_llm(comfy_server):
    with programmed_llm_in_models(comfy_server, selma_unit.TINY_ANSWER) as folder:
        yield folder


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


def node_errors(comfy_server, prompt) -> str:
    """The validation errors of a prompt (JSON text). ComfyUI still queues the outputs that validated (here
    the SELMA nodes that are output nodes themselves); wait for those so that nothing runs on afterwards."""
    prompt_id, resp = comfy_server.submit(prompt)
    if prompt_id is not None:
        comfy_server.wait(prompt_id, timeout=600)
    return json.dumps(resp.get("node_errors", {}))


def test_bad_dataset_name_is_refused(comfy_server, tiny_checkpoint_name, tiny_llm):
    """Names that would leave output/selma are refused when the prompt is validated, before any node runs."""
    prompt = workflow(tiny_checkpoint_name, tiny_llm.name, "../escape", 1)
    prompt["2"]["inputs"]["save_name"] = "prompts_ok"
    errors = node_errors(comfy_server, prompt)
    assert "PoESelmaSkillDataset" in errors and "dataset_name" in errors and "'..'" in errors, errors
    assert not (comfy_server.output_dir / "escape").exists()
    prompt = workflow(tiny_checkpoint_name, tiny_llm.name, "ok_dataset", 1)
    prompt["2"]["inputs"]["save_name"] = "/tmp/abs_prompts"
    prompt_id, resp = comfy_server.submit(prompt)  # nothing valid is left to queue
    errors = json.dumps(resp.get("node_errors", {}))
    assert prompt_id is None and "PoESelmaSkillPrompts" in errors and "save_name" in errors, resp
    prompt = workflow(tiny_checkpoint_name, tiny_llm.name, "ok_dataset", 1)
    prompt["2"]["inputs"].update(skill="custom", description="")
    prompt_id, resp = comfy_server.submit(prompt)
    assert prompt_id is None and "skill" in json.dumps(resp.get("node_errors", {})), resp
    assert not (comfy_server.output_dir / "selma" / "ok_dataset").exists()


def test_bad_run_and_save_names_are_refused_before_training(comfy_server, tiny_checkpoint_name):
    """run_name (trainer) and save_name (Save Trained LoRA) are checked when the prompt is queued, not after
    the training has run."""
    def prompt(run_name, save_name):
        return {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint_name}},
            "2": {"class_type": "PoESelmaSkillLoRATrainer", "inputs": {
                "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset_path": "unused", "preset": "tiny",
                "steps": 2, "lr": 1e-3, "rank": 4, "batch_size": 2, "seed": 0, "run_name": run_name,
                "checkpoint_every": 0, "gradient_checkpointing": True, "precision": "off"}},
            "3": {"class_type": "PoESaveTrainedLoRA", "inputs": {"lora": ["2", 1], "save_name": save_name,
                                                                 "overwrite": False}},
        }

    errors = node_errors(comfy_server, prompt("../outside", "ok/name"))
    assert "run_name" in errors and "'..'" in errors, errors
    # the trainer itself is valid (and an output node, so ComfyUI still runs it: it fails on the missing dataset)
    errors = node_errors(comfy_server, prompt("", "../../evil"))
    assert "PoESaveTrainedLoRA" in errors and "save_name" in errors, errors
    assert not (comfy_server.comfy_dir / "models" / "evil.safetensors").exists()


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


# ------------------------------------------------------------------ the shipped chain, end to end

CHAIN_WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "api" / "selma_chain_api.json"
# Every line passes the 'count' (a number word ≤ 3) and 'spatial' preset filters; the second is a
# near-duplicate of the first (ROUGE-L), so each skill collects exactly these two prompts.
CHAIN_ANSWER = ["4. Two frogs on a sofa.\n", "5. Two small frogs on a sofa.\n", "6. One fox under a desk.\n"]
CHAIN_PROMPTS = ["Two frogs on a sofa.", "One fox under a desk."]
TRAIN_STEPS, LR = 1, 5e-3  # one step at a large lr: the LoRA must visibly change the image
# The input through which each per-skill node descends from its skill's Skill Prompts node.
SKILL_LINK = {"PoESelmaSkillDataset": "prompts", "PoESelmaSkillLoRATrainer": "dataset_path",
              "PoESaveTrainedLoRA": "lora", "PoELoraStack": "saved_lora"}


def skill_of(prompt: dict, node_id: str) -> str | None:
    node = prompt[node_id]
    if node["class_type"] == "PoESelmaSkillPrompts":
        return node["inputs"]["skill"]
    link = node["inputs"].get(SKILL_LINK.get(node["class_type"], ""))
    return skill_of(prompt, link[0]) if isinstance(link, list) else None


def shrink_selma_chain(prompt: dict, llm_name: str, tag: str) -> dict[str, dict[str, str]]:
    """Point the (already CPU-shrunk) chain at the tiny LLM, 2 prompts per skill, TRAIN_STEPS steps of a
    rank-4 LoRA, and put every file it writes under a ``tag`` folder. The programmed LLM writes the same
    prompts for every skill, so each skill's dataset gets its own seed (else the skill LoRAs would be
    identical and the merge check trivial). Returns {skill: {class_type: node id}}."""
    per_skill: dict[str, dict[str, str]] = {}
    skills = sorted(n["inputs"]["skill"] for n in prompt.values() if n["class_type"] == "PoESelmaSkillPrompts")
    for node_id, node in prompt.items():
        kind, inputs, skill = node["class_type"], node["inputs"], skill_of(prompt, node_id)
        if skill is not None:
            per_skill.setdefault(skill, {})[kind] = node_id
        if kind == "PoESelmaSkillPrompts":
            inputs.update(llm_name=llm_name, count=2, max_attempts=3, max_new_tokens=16, dtype="float32",
                          save_name=f"{tag}/prompts/{skill}")
        elif kind == "PoESelmaSkillDataset":
            inputs.update(dataset_name=f"{tag}/{skill}", seed=skills.index(skill))
        elif kind == "PoESelmaSkillLoRATrainer":
            inputs.update(steps=TRAIN_STEPS, lr=LR, rank=4, batch_size=2, run_name=f"{tag}/{skill}")
        elif kind == "PoESaveTrainedLoRA":
            inputs.update(save_name=f"{tag}/{skill}")
        elif kind == "PoELoraStack":
            inputs.update(lora_name=f"{tag}/{skill}.safetensors")
        elif kind == "PoELoraMerge":
            inputs.update(save_name=f"{tag}/merged")
        elif kind == "SaveImage":
            inputs.update(filename_prefix=f"{tag}/{inputs['filename_prefix']}")
    return per_skill


def relink(nodes: dict, old: str, new: str) -> dict:
    """A copy of ``nodes`` with every link from node ``old`` redirected to node ``new``."""
    nodes = json.loads(json.dumps(nodes))
    for node in nodes.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and value[0] == old:
                node["inputs"][name] = [new, value[1]]
    return nodes


def saved_image(server, entry) -> np.ndarray:
    (path,) = [p for p in server.output_files(entry) if p.is_relative_to(server.output_dir)]
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def test_shipped_selma_chain_runs_end_to_end(comfy_server, cpu_api_workflow):
    import torch

    from comfy_poe.lora import load_lora_file, parse_state_dict

    prompt = cpu_api_workflow(CHAIN_WORKFLOW, steps=1, batch_size=2)  # 64×64, 1 sampling step
    tag = f"comfy_poe_itest_selma_{uuid.uuid4().hex[:8]}"
    out, loras = comfy_server.output_dir, comfy_server.comfy_dir / "models" / "loras"
    entries = []
    with contextlib.ExitStack() as cleanup:
        llm = cleanup.enter_context(programmed_llm_in_models(comfy_server, CHAIN_ANSWER))
        for folder in (loras / tag, out / "selma" / tag, out / "comfy_poe_training" / tag, out / tag):
            cleanup.callback(shutil.rmtree, folder, ignore_errors=True)
        cleanup.callback(lambda: [p.unlink(missing_ok=True) for e in entries for p in comfy_server.output_files(e)])

        per_skill = shrink_selma_chain(prompt, llm.name, tag)
        assert sorted(per_skill) == ["count", "spatial"]
        assert all(len(nodes) == 5 for nodes in per_skill.values()), per_skill
        (merge_id,) = [i for i, n in prompt.items() if n["class_type"] == "PoELoraMerge"]
        log_start = len(comfy_server.log_text())
        entries.append(comfy_server.run(prompt, timeout=600))
        outputs = entries[-1]["outputs"]

        for skill, nodes in per_skill.items():
            # prompts from the local LLM, saved next to their .jsonl
            assert (out / "selma" / tag / "prompts" / f"{skill}.txt").read_text().splitlines() == CHAIN_PROMPTS
            # the dataset: one accepted image + caption pair per prompt
            root = out / "selma" / tag / skill
            records = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
            assert [(r["prompt"], r["accepted"]) for r in records] == [(p, True) for p in CHAIN_PROMPTS]
            for r in records:
                assert (root / r["caption"]).read_text().strip() == r["prompt"]
                assert Image.open(root / r["image"]).size == (64, 64)
            # the skill LoRA trained on it, saved in models/loras
            report = outputs[nodes["PoESelmaSkillLoRATrainer"]]["text"][0]
            assert f"2 pairs (2 captions), {TRAIN_STEPS} steps" in report and "rank 4" in report, report
            assert outputs[nodes["PoESaveTrainedLoRA"]]["text"][0].startswith(f"saved {tag}/{skill}.safetensors")
            data = load_lora_file(loras / tag / f"{skill}.safetensors")
            parsed = parse_state_dict(data.tensors)
            assert parsed.modules and not parsed.skipped
            assert all(m.rank == 4 and m.name.key.startswith("diffusion_model.") for m in parsed.modules.values())
            recipe = json.loads(data.metadata["comfy_poe.training"])
            assert (recipe["method"], recipe["dataset"], recipe["pairs"], recipe["steps"]) == (
                "selma_skill", skill, 2, TRAIN_STEPS)
            assert any(float(m.up.abs().max()) > 0 for m in parsed.modules.values())  # training moved up

        # the merge: concat of both skill LoRAs at weight 0.5 each, exact up to fp16 storage
        report = outputs[merge_id]["text"][0]
        assert "NOT MERGED" not in report and "match no layer" not in report, report
        merged = load_lora_file(loras / tag / "merged.safetensors")
        recipe = json.loads(merged.metadata["comfy_poe.lora_merge"])
        assert recipe["method"] == "concat" and len(recipe["inputs"]) == 2, recipe
        skills = {s: parse_state_dict(load_lora_file(loras / tag / f"{s}.safetensors").tensors).modules
                  for s in per_skill}
        modules = parse_state_dict(merged.tensors).modules
        assert set(modules) == set(skills["count"]) == set(skills["spatial"])
        assert any(not torch.equal(skills["count"][k].up, skills["spatial"][k].up) for k in modules)
        for key, module in modules.items():
            assert module.rank == 8
            expected = 0.5 * skills["count"][key].delta() + 0.5 * skills["spatial"][key].delta()
            assert (module.delta() - expected).abs().max() <= 2e-3 * expected.abs().max() + 1e-8, key

        # the final image, sampled with the merged MODEL/CLIP ...
        chain_img = saved_image(comfy_server, entries[-1])
        assert chain_img.shape == (64, 64, 3)
        # ... equals the merged file through the core LoraLoader, and differs from the base model
        tail = {i: n for i, n in prompt.items() if n["class_type"] in (
            "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode", "SaveImage")}
        (ckpt_id,) = [i for i, n in prompt.items() if n["class_type"] == "CheckpointLoaderSimple"]
        loader = {"L": {"class_type": "LoraLoader", "inputs": {
            "model": [ckpt_id, 0], "clip": [ckpt_id, 1], "lora_name": f"{tag}/merged.safetensors",
            "strength_model": 1.0, "strength_clip": 1.0}}}
        entries.append(comfy_server.run({ckpt_id: prompt[ckpt_id], **loader, **relink(tail, merge_id, "L")}))
        loader_img = saved_image(comfy_server, entries[-1])
        entries.append(comfy_server.run({ckpt_id: prompt[ckpt_id], **relink(tail, merge_id, ckpt_id)}))
        base_img = saved_image(comfy_server, entries[-1])
        changed = np.abs(chain_img - base_img).mean()
        print(f"merged skill LoRA vs base: mean |Δ| {changed:.3f}/255")
        assert np.abs(chain_img - loader_img).max() <= 1.0
        assert changed > 0.5, f"the merged skill LoRA does not change the image (mean |Δ| {changed:.3f}/255)"

        log = comfy_server.log_text()[log_start:]
        not_loaded = [line for line in log.splitlines() if "lora key not loaded" in line or "NOT LOADED" in line]
        assert not not_loaded, "\n".join(not_loaded[:20])
