"""Write an SDXL single-file checkpoint whose UNet is a diffusers UNet2DConditionModel (converted with ComfyUI's own
``comfy.utils.unet_to_diffusers`` key map) and whose text encoders and VAE come from the tiny SDXL fixture, so a
LoRA trained on the diffusers folder can be loaded by ComfyUI's LoraLoader on the same architecture.

Runs in ComfyUI's venv (it imports ComfyUI):
    python sdxl_checkpoint_from_diffusers.py --comfy-dir ComfyUI --fixture tiny_sdxl.safetensors \
        --unet model/unet --out models/checkpoints/x.safetensors
Prints one JSON line: {"path", "unet_keys"}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def comfy_unet_config(diffusers_config: dict) -> dict:
    """The LDM UNet config (the keys ``unet_to_diffusers`` reads) of a diffusers SDXL-style UNet config."""
    levels = len(diffusers_config["block_out_channels"])
    layers = int(diffusers_config["layers_per_block"])
    depth = diffusers_config.get("transformer_layers_per_block", 1)
    depth = [depth] * levels if isinstance(depth, int) else list(depth)
    down = [depth[i] if "CrossAttn" in kind else 0 for i, kind in enumerate(diffusers_config["down_block_types"])]
    up_depth = list(reversed(depth))
    up = [up_depth[i] if "CrossAttn" in kind else 0 for i, kind in enumerate(diffusers_config["up_block_types"])]
    return {"num_res_blocks": [layers] * levels, "channel_mult": [1] * levels,
            "transformer_depth": [d for d in down for _ in range(layers)],
            # output blocks listed from the lowest resolution level back up (the LDM order), one more per level
            "transformer_depth_output": [d for d in reversed(up) for _ in range(layers + 1)],
            "transformer_depth_middle": depth[-1]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfy-dir", required=True)
    ap.add_argument("--fixture", required=True, help="the tiny SDXL checkpoint (text encoders and VAE are taken)")
    ap.add_argument("--unet", required=True, help="a diffusers unet/ folder (config.json + safetensors)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(args.comfy_dir).resolve()))
    import comfy.utils
    from safetensors.torch import load_file, save_file

    unet_dir = Path(args.unet)
    config = json.loads((unet_dir / "config.json").read_text())
    mapping = comfy.utils.unet_to_diffusers(comfy_unet_config(config))
    weights = load_file(str(unet_dir / "diffusion_pytorch_model.safetensors"))
    missing = sorted(k for k in weights if k not in mapping)
    if missing:
        raise SystemExit(f"diffusers keys without an LDM name: {missing[:8]}")
    sd = {k: v for k, v in load_file(args.fixture).items() if not k.startswith("model.diffusion_model.")}
    sd.update({"model.diffusion_model." + mapping[k]: v.half().contiguous() for k, v in weights.items()})
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    save_file(sd, str(tmp))
    os.replace(tmp, out)
    print(json.dumps({"path": str(out), "unet_keys": len(weights)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
