"""Every API workflow the pack ships (workflows/api/*_api.json) runs on the tiny models: SD1.5 graphs on the tiny
SD1.5 checkpoint, SDXL / Flux / Wan graphs on the tiny fixtures of their family (users' file names swapped by
conftest.use_tiny_models), VLM-judge graphs on a tiny random Qwen2-VL saved into models/vlm, trainers' LoRAs
into a throw-away folder under models/loras, MaPO's pair folder made in the server's input directory."""
import importlib.util
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration

_spec = importlib.util.spec_from_file_location("vlm_tiny", Path(__file__).resolve().parents[1] / "vlm_tiny.py")
vlm_tiny = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("vlm_tiny", vlm_tiny)
_spec.loader.exec_module(vlm_tiny)

# Combo inputs naming a user-supplied model folder that no test server has (the SELMA chain needs an
# instruction LLM in models/LLM; nothing may be downloaded): such workflows are skipped, naming the folder.
# (The SELMA chain runs end to end on a programmed tiny LLM in test_selma_comfy.py; the reward-model
# workflow on tiny converted reward models in test_reward_comfy.py.) The LoRA merge template names the
# user's LoRA files; merging real files in ComfyUI is covered by test_lora_comfy.py.
USER_MODEL_INPUTS = {"PoESelmaSkillPrompts": "llm_name", "PoELoraStack": "lora_name", "PoERewardJudge": "model_name"}


def missing_user_models(comfy_server, prompt: dict) -> list[str]:
    missing = []
    for node in prompt.values():
        name = USER_MODEL_INPUTS.get(node["class_type"])
        if name is None:
            continue
        spec = comfy_server.object_info(node["class_type"])[node["class_type"]]["input"]["required"][name]
        options = spec[0] if isinstance(spec[0], list) else spec[1].get("options", [])  # V1 / V3 combo
        if node["inputs"].get(name) not in options:
            missing.append(f"{node['class_type']}.{name} = {node['inputs'].get(name)!r}")
    return list(dict.fromkeys(missing))


@pytest.fixture(scope="module")
def tiny_vlm_name(comfy_server):
    """A tiny random Qwen2-VL under models/vlm for the VLM-judge workflows (removed afterwards)."""
    root = comfy_server.comfy_dir / "models" / "vlm"
    created_root = not root.exists()
    folder = root / f"poe_itest_shipped_qwen2_vl_{uuid.uuid4().hex[:8]}"
    vlm_tiny.build_tiny_vlm("qwen2_vl", folder)
    yield folder.name
    shutil.rmtree(folder, ignore_errors=True)
    if created_root and root.exists() and not any(root.iterdir()):
        root.rmdir()


def make_pair_folder(folder: Path, pairs: int = 2, size: int = 64) -> None:
    """``folder/<pair>/{chosen,rejected}.png + prompt.txt`` (bright chosen, dark rejected)."""
    for i in range(pairs):
        pair = folder / f"pair{i}"
        pair.mkdir(parents=True, exist_ok=True)
        (pair / "prompt.txt").write_text("a photo of a cat")
        rng = np.random.default_rng(i)
        Image.fromarray((200 + rng.integers(0, 50, (size, size, 3))).astype(np.uint8)).save(pair / "chosen.png")
        Image.fromarray(rng.integers(0, 50, (size, size, 3)).astype(np.uint8)).save(pair / "rejected.png")


def for_test_server(comfy_server, prompt: dict, vlm_name: str, lora_subfolder: str) -> dict:
    """Tiny VLM, LoRAs saved under ``lora_subfolder``, pair folders created in the input directory."""
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "PoEVLMLoader":
            inputs.update(model_name=vlm_name, dtype="float32")
        elif kind == "PoESaveTrainedLoRA":
            inputs["save_name"] = f"{lora_subfolder}/{Path(inputs['save_name']).name}"
        elif kind == "PoEPreferencePairsFromFolder":
            folder = comfy_server.input_dir / inputs["folder"]
            if not folder.exists():
                make_pair_folder(folder)
    return prompt


def test_shipped_api_workflow_runs(comfy_server, cpu_api_workflow, shipped_workflow, request):
    prompt = cpu_api_workflow(shipped_workflow)
    missing = missing_user_models(comfy_server, prompt)
    if missing:
        pytest.skip(f"{shipped_workflow.name} needs model folders this server does not have: {', '.join(missing)}")
    vlm_name = request.getfixturevalue("tiny_vlm_name") if any(
        n["class_type"] == "PoEVLMLoader" for n in prompt.values()) else ""
    lora_subfolder = f"comfy_poe_shipped_{uuid.uuid4().hex[:8]}"
    for_test_server(comfy_server, prompt, vlm_name, lora_subfolder)
    try:
        entry = comfy_server.run(prompt, timeout=900)
        assert entry["outputs"], f"{shipped_workflow.name} produced no output"
        for path in comfy_server.output_files(entry):
            assert path.is_file() and path.stat().st_size > 0, f"{shipped_workflow.name}: missing {path}"
        saves = [k for k, n in prompt.items() if n["class_type"] == "PoESaveTrainedLoRA"]
        for folder in (comfy_server.comfy_dir / "models" / "loras" / lora_subfolder,):
            if saves:
                assert any(folder.glob("*.safetensors")), f"{shipped_workflow.name}: no LoRA saved in {folder}"
    finally:
        shutil.rmtree(comfy_server.comfy_dir / "models" / "loras" / lora_subfolder, ignore_errors=True)
        comfy_server.free()
