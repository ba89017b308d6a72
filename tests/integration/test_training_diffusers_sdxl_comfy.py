"""A LoRA trained by the diffusers trainer (python -m comfy_poe.training) on a diffusers SDXL folder loads in a real
ComfyUI's core LoraLoader on an SDXL-class single-file checkpoint of the same architecture: no "lora key not
loaded" in the server log, and the LoRA changes the image.

The checkpoint is the tiny SDXL fixture (Segmind_Vega class: model channels 320, context 2048, adm 2816,
transformer depths [0, 0, 1, 1, 2, 2]) with its UNet replaced by the diffusers UNet the LoRA was trained on,
converted with ComfyUI's own key map (sdxl_checkpoint_from_diffusers.py, in ComfyUI's venv)."""
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
from diffusers_tiny import build_pairs, build_tiny_sdxl  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.integration

# diffusers spelling of make_fixtures.py's SDXL_TINY (Segmind_Vega detection): 320 channels on 3 levels, 2 res
# blocks each, attention depth 1 / 2 on levels 1 / 2 (diffusers' middle block takes the last level's depth, 2),
# 64-channel heads, the SDXL added embedding (1280 pooled + 6 × 256 time ids = 2816)
VEGA_DIFFUSERS_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(320, 320, 320), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(5, 5, 5), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, cross_attention_dim=2048, projection_class_embeddings_input_dim=2816)


def test_trained_sdxl_lora_loads_in_loraloader(comfy_server, model_fixtures, lora_folder, tmp_path):
    pytest.importorskip("accelerate")
    build_tiny_sdxl(tmp_path / "model", unet_config=VEGA_DIFFUSERS_UNET, widths=(768, 1280))
    build_pairs(tmp_path / "pairs", n=2, size=16)
    config = {"method": "mapo", "model": "model", "pairs": "pairs", "output": "out", "resolution": 16,
              "lora": {"rank": 4, "alpha": 4, "targets": "attention+feedforward"},
              "loop": {"steps": 2, "lr": 1e-2, "seed": 0}, "preference": {"batch_size": 2}}
    (tmp_path / "run.json").write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, "-m", "comfy_poe.training", "--config", str(tmp_path / "run.json")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    shutil.copy(tmp_path / "out" / "lora.safetensors", lora_folder / "trained_sdxl.safetensors")
    lora_name = f"{lora_folder.name}/trained_sdxl.safetensors"

    checkpoints = comfy_server.comfy_dir / "models" / "checkpoints"
    ckpt_name = f"comfy_poe_test_sdxl_{uuid.uuid4().hex[:8]}.safetensors"
    convert = subprocess.run([comfy_server.python, str(HERE / "sdxl_checkpoint_from_diffusers.py"), "--comfy-dir",
                              str(comfy_server.comfy_dir), "--fixture", str(checkpoints / model_fixtures["sdxl"]),
                              "--unet", str(tmp_path / "model" / "unet"), "--out", str(checkpoints / ckpt_name)],
                             capture_output=True, text=True, timeout=900)
    assert convert.returncode == 0, convert.stderr[-4000:]
    try:
        base = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red square", "clip": ["1", 1]}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                       "latent_image": ["4", 0], "seed": 42, "steps": 3, "cfg": 4.0,
                                                       "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
            "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "sdxl"}},
        }
        tag = uuid.uuid4().hex[:8]

        def image(prompt, prefix):
            prompt["7"]["inputs"]["filename_prefix"] = f"{prefix}_{tag}"
            entry = comfy_server.run(prompt, timeout=900)
            [path] = comfy_server.output_files(entry)
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"), dtype=np.int16)

        log_before = len(comfy_server.log_text())
        plain = image(json.loads(json.dumps(base)), "sdxl_no_lora")
        with_lora = json.loads(json.dumps(base))
        with_lora["L"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                                  "lora_name": lora_name, "strength_model": 8.0,
                                                                  "strength_clip": 0.0}}
        with_lora["5"]["inputs"]["model"] = ["L", 0]
        changed = image(with_lora, "sdxl_trained_lora")
        log = comfy_server.log_text()[log_before:]
        assert "lora key not loaded" not in log, log[-4000:]
        assert np.abs(changed - plain).mean() > 0.5, "the LoRA did not change the image"
    finally:
        (checkpoints / ckpt_name).unlink(missing_ok=True)
