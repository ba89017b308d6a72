"""Every API workflow the pack ships (workflows/*_api.json) runs on the tiny SD1.5 checkpoint."""
import pytest

pytestmark = pytest.mark.integration

# Shipped workflows carry real SD1.5 values (512-768 px, 20+ steps); on the tiny CPU checkpoint we keep
# their graph and aspect ratios but shrink sizes 8x and cut steps and particles.
PIXEL_INPUTS = {"EmptyLatentImage": ("width", "height"), "SolidMask": ("width", "height"), "MaskComposite": ("x", "y")}
CAPS = {"steps": 3, "particles": 2, "mcmc_steps": 1, "batch_size": 1}


def shrink_for_cpu(prompt: dict) -> dict:
    for node in prompt.values():
        inputs = node["inputs"]
        for name in PIXEL_INPUTS.get(node["class_type"], ()):
            if isinstance(inputs.get(name), int):
                inputs[name] = max(inputs[name] // 8, 0 if name in ("x", "y") else 8)
        for name, cap in CAPS.items():
            if isinstance(inputs.get(name), int):
                inputs[name] = min(inputs[name], cap)
    return prompt


def test_shipped_api_workflow_runs(comfy_server, api_workflow, shipped_workflow):
    prompt = shrink_for_cpu(api_workflow(shipped_workflow))
    entry = comfy_server.run(prompt, timeout=600)
    assert entry["outputs"], f"{shipped_workflow.name} produced no output"
    for path in comfy_server.output_files(entry):
        assert path.is_file() and path.stat().st_size > 0, f"{shipped_workflow.name}: missing {path}"
