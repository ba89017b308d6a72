"""A LoRA trained by the diffusers trainer (python -m comfy_poe.training) on a diffusers UNet with the tiny SD1.5
checkpoint's architecture loads in a real ComfyUI's core LoraLoader: no "lora key not loaded" in the server
log, and the LoRA changes the image."""
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusers_tiny import build_pairs, build_tiny_sd  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = Path(__file__).resolve().parent / "data"

pytestmark = pytest.mark.integration

# diffusers spelling of make_tiny_ckpt.py's TINY_UNET (SD15 detection: 320 channels, context 768, mult [1, 2],
# one res block per level, attention on both levels, 8 heads)
TINY_SD15_DIFFUSERS_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(320, 640), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768, attention_head_dim=8)


def test_trained_lora_loads_in_loraloader(comfy_server, api_workflow, lora_folder, tmp_path):
    pytest.importorskip("accelerate")
    build_tiny_sd(tmp_path / "model", unet_config=TINY_SD15_DIFFUSERS_UNET, cross_dim=768)
    build_pairs(tmp_path / "pairs", n=2, size=16)
    config = {"method": "mapo", "model": "model", "pairs": "pairs", "output": "out", "resolution": 16,
              "lora": {"rank": 4, "alpha": 4, "targets": "attention+feedforward"},
              "loop": {"steps": 2, "lr": 1e-2, "seed": 0}, "preference": {"batch_size": 2}}
    (tmp_path / "run.json").write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, "-m", "comfy_poe.training", "--config", str(tmp_path / "run.json")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    shutil.copy(tmp_path / "out" / "lora.safetensors", lora_folder / "trained.safetensors")
    lora_name = f"{lora_folder.name}/trained.safetensors"

    base = api_workflow(DATA_DIR / "txt2img_tiny_sd15_api.json")
    tag = uuid.uuid4().hex[:8]

    def image(prompt, prefix):
        prompt["7"]["inputs"]["filename_prefix"] = f"{prefix}_{tag}"
        entry = comfy_server.run(prompt)
        [path] = comfy_server.output_files(entry)
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.int16)

    log_before = len(comfy_server.log_text())
    plain = image(json.loads(json.dumps(base)), "no_lora")
    with_lora = json.loads(json.dumps(base))
    with_lora["L"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                              "lora_name": lora_name, "strength_model": 4.0,
                                                              "strength_clip": 0.0}}
    with_lora["5"]["inputs"]["model"] = ["L", 0]
    changed = image(with_lora, "trained_lora")
    log = comfy_server.log_text()[log_before:]
    assert "lora key not loaded" not in log, log[-4000:]
    assert np.abs(changed - plain).mean() > 0.5, "the LoRA did not change the image"
