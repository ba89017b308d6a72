"""A LoRA trained by the diffusers trainer (python -m comfy_poe.training) loads in a real ComfyUI's core LoRA loader
on the matching model of each family: no "lora key not loaded" in the server log, and the LoRA changes the image.

- SD1.5: a diffusers UNet with the tiny SD1.5 checkpoint's architecture, kohya ``lora_unet_*`` keys, LoraLoader.
- SDXL: the tiny SDXL fixture (Segmind_Vega class: model channels 320, context 2048, adm 2816, transformer depths
  [0, 0, 1, 1, 2, 2]) with its UNet replaced by the diffusers UNet the LoRA was trained on, converted with
  ComfyUI's own key map (sdxl_checkpoint_from_diffusers.py, in ComfyUI's venv); kohya keys, LoraLoader.
- SD3: a diffusers SD3 transformer with the tiny SD3 fixture's architecture (make_fixtures.py SD3_TINY: 2 joint
  blocks, 128 wide, 2 heads, context 4096, pooled 2048, patch 2, pos_embed_max_size 32); diffusers
  ``transformer.*`` keys, LoraLoaderModelOnly on the fixture.
- Flux: a diffusers Flux transformer with the tiny Flux-dev fixture's architecture (FLUX_DEV: 1 double + 1 single
  block at Flux's full width 3072, 24 heads, context 4096, pooled 2048, guidance embedding); ComfyUI maps each of
  the diffusers to_q / to_k / to_v onto its slice of the fused qkv; LoraLoaderModelOnly on the fixture."""
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
from diffusers_tiny import build_pairs, build_tiny_flux, build_tiny_sd, build_tiny_sd3, build_tiny_sdxl  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DATA_DIR = HERE / "data"

pytestmark = pytest.mark.integration

# diffusers spelling of make_tiny_ckpt.py's TINY_UNET (SD15 detection: 320 channels, context 768, mult [1, 2],
# one res block per level, attention on both levels, 8 heads)
TINY_SD15_DIFFUSERS_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(320, 640), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768, attention_head_dim=8)
# diffusers spelling of make_fixtures.py's SDXL_TINY (Segmind_Vega detection): 320 channels on 3 levels, 2 res
# blocks each, attention depth 1 / 2 on levels 1 / 2 (diffusers' middle block takes the last level's depth, 2),
# 64-channel heads, the SDXL added embedding (1280 pooled + 6 × 256 time ids = 2816)
VEGA_DIFFUSERS_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(320, 320, 320), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(5, 5, 5), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, cross_attention_dim=2048, projection_class_embeddings_input_dim=2816)
FIXTURE_FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                pooled_projection_dim=2048, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FIXTURE_SD3_TRANSFORMER = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
                               num_attention_heads=2, joint_attention_dim=4096, caption_projection_dim=128,
                               pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=32)


def train_lora(tmp_path: Path, lora_folder: Path, name: str) -> str:
    """Two MaPO steps on the diffusers folder tmp_path/model (16 px pairs); the LoRA's name in ComfyUI."""
    build_pairs(tmp_path / "pairs", n=2, size=16)
    config = {"method": "mapo", "model": "model", "pairs": "pairs", "output": "out", "resolution": 16,
              "lora": {"rank": 4, "alpha": 4, "targets": "attention+feedforward"},
              "loop": {"steps": 2, "lr": 1e-2, "seed": 0}, "preference": {"batch_size": 2}}
    (tmp_path / "run.json").write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, "-m", "comfy_poe.training", "--config", str(tmp_path / "run.json")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    shutil.copy(tmp_path / "out" / "lora.safetensors", lora_folder / f"{name}.safetensors")
    return f"{lora_folder.name}/{name}.safetensors"


def assert_lora_loads_and_changes(server, base: dict, lora_node: dict, sampler: str, save: str) -> None:
    """Render ``base`` without and with ``lora_node`` (id "L") feeding the ``sampler`` node's model."""
    tag = uuid.uuid4().hex[:8]

    def image(prompt, prefix):
        prompt[save]["inputs"]["filename_prefix"] = f"{prefix}_{tag}"
        entry = server.run(prompt, timeout=900)
        [path] = server.output_files(entry)
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.int16)

    log_before = len(server.log_text())
    plain = image(json.loads(json.dumps(base)), "no_lora")
    with_lora = json.loads(json.dumps(base))
    with_lora["L"] = lora_node
    with_lora[sampler]["inputs"]["model"] = ["L", 0]
    changed = image(with_lora, "trained_lora")
    log = server.log_text()[log_before:]
    assert "lora key not loaded" not in log, log[-4000:]
    assert np.abs(changed - plain).mean() > 0.5, "the LoRA did not change the image"


def checkpoint_graph(ckpt: str, prompt: str = "a red square") -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 42, "steps": 3, "cfg": 4.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "x"}},
    }


def lora_loader(name: str, strength: float) -> dict:
    return {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": name,
                                                   "strength_model": strength, "strength_clip": 0.0}}


def test_trained_lora_loads_in_loraloader(comfy_server, api_workflow, lora_folder, tmp_path):
    pytest.importorskip("accelerate")
    build_tiny_sd(tmp_path / "model", unet_config=TINY_SD15_DIFFUSERS_UNET, cross_dim=768)
    name = train_lora(tmp_path, lora_folder, "trained")
    assert_lora_loads_and_changes(comfy_server, api_workflow(DATA_DIR / "txt2img_tiny_sd15_api.json"),
                                  lora_loader(name, 4.0), "5", "7")


def test_trained_sdxl_lora_loads_in_loraloader(comfy_server, model_fixtures, lora_folder, tmp_path):
    pytest.importorskip("accelerate")
    build_tiny_sdxl(tmp_path / "model", unet_config=VEGA_DIFFUSERS_UNET, widths=(768, 1280))
    name = train_lora(tmp_path, lora_folder, "trained_sdxl")
    checkpoints = comfy_server.comfy_dir / "models" / "checkpoints"
    ckpt = f"comfy_poe_test_sdxl_{uuid.uuid4().hex[:8]}.safetensors"
    convert = subprocess.run([comfy_server.python, str(HERE / "sdxl_checkpoint_from_diffusers.py"), "--comfy-dir",
                              str(comfy_server.comfy_dir), "--fixture", str(checkpoints / model_fixtures["sdxl"]),
                              "--unet", str(tmp_path / "model" / "unet"), "--out", str(checkpoints / ckpt)],
                             capture_output=True, text=True, timeout=900)
    assert convert.returncode == 0, convert.stderr[-4000:]
    try:
        assert_lora_loads_and_changes(comfy_server, checkpoint_graph(ckpt), lora_loader(name, 8.0), "5", "7")
    finally:
        (checkpoints / ckpt).unlink(missing_ok=True)


def flow_graph(files: dict, family: str) -> dict:
    """The fixture of a flow family (Load Diffusion Model), a lone CLIP-L as the text encoder (CLIPLoader type
    sd3: 4096-wide zero-padded context, 2048-wide pooled vector), the 16-channel VAE; Flux reads its distilled
    guidance from the conditioning (FluxGuidance 3.5) and samples without CFG."""
    positive = ["4", 0] if family == "sd3" else ["4g", 0]
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": files[family], "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": files["clip_l"], "type": "sd3", "device": "default"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": files["ae16"]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red square", "clip": ["2", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": positive, "negative": ["5", 0],
                                                   "latent_image": ["6", 0], "seed": 42, "steps": 3,
                                                   "cfg": 4.0 if family == "sd3" else 1.0, "sampler_name": "euler",
                                                   "scheduler": "simple", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["3", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "x"}},
    }
    if family == "flux":
        graph["4g"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["4", 0], "guidance": 3.5}}
    return graph


def model_only_lora(name: str, strength: float) -> dict:
    return {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": name,
                                                             "strength_model": strength}}


def test_trained_sd3_lora_loads_in_loraloader(comfy_server, model_fixtures, lora_folder, tmp_path):
    pytest.importorskip("accelerate")
    build_tiny_sd3(tmp_path / "model", t5=False, transformer_config=FIXTURE_SD3_TRANSFORMER, projections=(768, 1280))
    name = train_lora(tmp_path, lora_folder, "trained_sd3")
    assert_lora_loads_and_changes(comfy_server, flow_graph(model_fixtures, "sd3"), model_only_lora(name, 8.0), "7", "9")


def test_trained_flux_lora_loads_in_loraloader(comfy_server, model_fixtures, lora_folder, tmp_path):
    pytest.importorskip("accelerate")
    build_tiny_flux(tmp_path / "model", transformer_config=FIXTURE_FLUX_TRANSFORMER)
    name = train_lora(tmp_path, lora_folder, "trained_flux")
    assert_lora_loads_and_changes(comfy_server, flow_graph(model_fixtures, "flux"), model_only_lora(name, 8.0), "7", "9")
