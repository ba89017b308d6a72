"""Every API workflow the pack ships (workflows/api/*_api.json) runs on the tiny SD1.5 checkpoint."""
import pytest

pytestmark = pytest.mark.integration

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


def test_shipped_api_workflow_runs(comfy_server, cpu_api_workflow, shipped_workflow):
    prompt = cpu_api_workflow(shipped_workflow)
    missing = missing_user_models(comfy_server, prompt)
    if missing:
        pytest.skip(f"{shipped_workflow.name} needs model folders this server does not have: {', '.join(missing)}")
    entry = comfy_server.run(prompt, timeout=600)
    assert entry["outputs"], f"{shipped_workflow.name} produced no output"
    for path in comfy_server.output_files(entry):
        assert path.is_file() and path.stat().st_size > 0, f"{shipped_workflow.name}: missing {path}"
