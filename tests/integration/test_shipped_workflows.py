"""Every API workflow the pack ships (workflows/*_api.json) runs on the tiny SD1.5 checkpoint."""
import pytest

pytestmark = pytest.mark.integration


def test_shipped_api_workflow_runs(comfy_server, api_workflow, shipped_workflow):
    prompt = api_workflow(shipped_workflow)
    entry = comfy_server.run(prompt, timeout=600)
    assert entry["outputs"], f"{shipped_workflow.name} produced no output"
    for path in comfy_server.output_files(entry):
        assert path.is_file() and path.stat().st_size > 0, f"{shipped_workflow.name}: missing {path}"
