#!/usr/bin/env python
"""Tiny random-weight models of every family the integration suite runs, built offline with ComfyUI's
own classes and checked with ComfyUI's own model detection (run inside ComfyUI's venv).

Each file is the smallest shape ComfyUI 0.3.64's detection still maps to the family's model class
(``comfy/model_detection.py`` infers the fields below from the weights; ``supported_models.py`` matches):

==================  =====================================  ==========================================
file (folder)       detected as                            what detection fixes / lets us shrink
==================  =====================================  ==========================================
tiny_flux_dev       Flux (diffusion_models, BFL layout,    hidden 3072, 24 heads, context 4096, axes
                    "Load Diffusion Model")                [16, 56, 56] are hard-coded; the block counts,
                                                           in_channels, vec_in_dim and guidance_embed are
                                                           read: 1 double + 1 single block, vec_in_dim
                                                           2048 (the pooled width CLIPLoader type sd3
                                                           gives a lone CLIP-L), bf16
tiny_sd3            SD3 (MMDiT, diffusion_models)          hidden = 64·depth, heads = depth: depth 2
tiny_wan21_t2v      WAN21_T2V (diffusion_models)           dim/ffn/layers read: dim 128 (1 head of 128),
                                                           ffn 256, 1 layer; text_dim stays 4096
tiny_sdxl           SDXL family: Segmind_Vega, a subclass  model_channels 320, context 2048, adm 2816 and
                    of supported_models.SDXL (same         the per-block transformer depths are matched
                    model_base.SDXL: pooled output, size / ([0,0,2,2,10,10] for the SDXL class itself,
                    crop embeddings, CLIP-L + CLIP-G)      [0,0,1,1,2,2] for Vega); channel_mult is free:
                    (checkpoints: UNet + both text         [1, 1, 1] (all levels 320 wide). The SDXL-class
                    encoders + VAE)                        shape is 255 M UNet parameters and ran 37 s per
                                                           step on the shared CPU; Vega's is ~3x lighter.
                                                           CLIP-G (694 M) and CLIP-L come from ComfyUI's
                                                           fixed configs, as for every SDXL checkpoint.
tiny_clip_l         CLIP-L text encoder (text_encoders)    fixed config (123 M); with CLIPLoader type
                                                           sd3 it gives a 4096-wide zero-padded context
                                                           and a 2048-wide pooled vector (Flux, SD3, Wan)
tiny_ae16           16-channel VAE, Flux ``ae`` layout     fixed config (84 M): sd.py builds it from a
                    (vae); also SD3's VAE                  constant ddconfig, only z_channels is read
tiny_wan21_vae      Wan 2.1 video VAE (vae)                fixed config (dim 96), 5-D latents
==================  =====================================  ==========================================

Files carry ``comfy_poe_fixture`` = a hash of their family's config (``fixture_hash``) in their safetensors
metadata; an existing file with the current hash is kept (``--force`` rebuilds). Writes go to a temp file that is renamed.

Usage: python make_fixtures.py --comfy-dir ComfyUI [--models-dir DIR] [--only flux,sd3,...] [--force]
Prints one JSON line per file: {"family", "path", "mib", "params", "seconds", "cached"}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import struct
import sys
import time
from pathlib import Path

FIXTURE_KEY = "comfy_poe_fixture"
FAMILIES = ("clip_l", "ae16", "flux", "sd3", "wan21", "wan21_vae", "sdxl")
FILES = {  # family -> (models sub-folder, file name)
    "clip_l": ("text_encoders", "tiny_clip_l.safetensors"),
    "ae16": ("vae", "tiny_ae16.safetensors"),
    "flux": ("diffusion_models", "tiny_flux_dev.safetensors"),
    "sd3": ("diffusion_models", "tiny_sd3.safetensors"),
    "wan21": ("diffusion_models", "tiny_wan21_t2v.safetensors"),
    "wan21_vae": ("vae", "tiny_wan21_vae.safetensors"),
    "sdxl": ("checkpoints", "tiny_sdxl.safetensors"),
}

FLUX_DEV = {
    "image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 2048,
    "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1,
    "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True,
}
SD3_TINY = {
    "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None,
    "adm_in_channels": 2048, "num_patches": 32 * 32, "pos_embed_max_size": 32, "pos_embed_scaling_factor": None,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
    "x_block_self_attn_layers": [],
}
WAN21_TINY = {
    "image_model": "wan2.1", "model_type": "t2v", "dim": 128, "out_dim": 16, "num_heads": 1, "ffn_dim": 256,
    "num_layers": 1, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True,
    "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16,
}
SDXL_TINY = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 1, 2, 2], "channel_mult": [1, 1, 1],
    "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 2048,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
AE_DDCONFIG = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
               "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
SD_VAE_DDCONFIG = dict(AE_DDCONFIG, z_channels=4)
WAN_VAE = {"dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
           "temperal_downsample": [False, True, True], "dropout": 0.0}


BUILD_VERSION = 1  # bump when build() or init_random_() change what is written
CONFIGS = {"flux": FLUX_DEV, "sd3": SD3_TINY, "wan21": WAN21_TINY, "sdxl": SDXL_TINY, "ae16": AE_DDCONFIG,
           "wan21_vae": WAN_VAE, "clip_l": {}}


def fixture_hash(family: str) -> str:
    """Content hash of one fixture: its config, its file name and BUILD_VERSION (editing another family's
    config does not rebuild this one)."""
    text = json.dumps([family, FILES[family], CONFIGS[family], BUILD_VERSION], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_metadata(path: Path) -> dict:
    """The ``__metadata__`` of a safetensors file (header only; {} if unreadable)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(n)).get("__metadata__", {}) or {}
    except (OSError, ValueError, struct.error):
        return {}


def is_current(path: Path, digest: str) -> bool:
    return path.is_file() and file_metadata(path).get(FIXTURE_KEY) == digest


def init_random_(module, gen, torch):
    """Random init for modules built with comfy.ops (weights start as torch.empty): N(0, 1/fan_in) matrices,
    zero biases, unit norm scales (the make_tiny_ckpt.py recipe)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.dtype.is_floating_point:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                p.zero_()
            elif p.dim() <= 1 or leaf in ("gamma", "scale"):
                p.fill_(1.0)
            elif "embedding" in name and p.dim() == 2 and "text_embedding" not in name and "patch" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            else:
                fan_in = p[0].numel()
                p.copy_((torch.randn(p.shape, generator=gen) * (1.0 / math.sqrt(fan_in))).to(p.dtype))
        for name, b in module.named_buffers():  # e.g. Wan/SD3 buffers created empty
            if b.dtype.is_floating_point and not torch.isfinite(b).all():
                b.zero_()


def clip_defaults_(clip_module, torch):
    with torch.no_grad():
        for n, p in clip_module.named_parameters():
            if n.endswith("logit_scale"):
                p.fill_(4.6055)
            elif n.endswith("text_projection.weight") and p.shape[0] == p.shape[1]:
                p.copy_(torch.eye(p.shape[0], dtype=p.dtype))


def cast(sd, dtype, torch):
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def detected_class(sd, prefix, comfy):
    mc = comfy.model_detection.model_config_from_unet(sd, prefix)
    return type(mc).__name__ if mc is not None else None


def build(family: str, gen, torch, comfy):
    """(state dict, metadata extras) of one fixture; asserts ComfyUI's detection accepts it."""
    import comfy.supported_models as sm
    if family == "flux":
        mc = sm.Flux(dict(FLUX_DEV))
        mc.set_inference_dtype(torch.bfloat16, None)
        model = mc.get_model({})
        init_random_(model.diffusion_model, gen, torch)
        sd = cast(model.diffusion_model.state_dict(), torch.bfloat16, torch)
        assert detected_class(sd, "", comfy) == "Flux", detected_class(sd, "", comfy)
        return sd
    if family == "sd3":
        mc = sm.SD3(dict(SD3_TINY))
        model = mc.get_model({})
        init_random_(model.diffusion_model, gen, torch)
        sd = cast(model.diffusion_model.state_dict(), torch.float16, torch)
        assert detected_class(sd, "", comfy) == "SD3", detected_class(sd, "", comfy)
        return sd
    if family == "wan21":
        mc = sm.WAN21_T2V(dict(WAN21_TINY))
        model = mc.get_model({})
        init_random_(model.diffusion_model, gen, torch)
        sd = cast(model.diffusion_model.state_dict(), torch.float16, torch)
        assert detected_class(sd, "", comfy) == "WAN21_T2V", detected_class(sd, "", comfy)
        return sd
    if family == "sdxl":
        from comfy.ldm.models.autoencoder import AutoencoderKL
        import comfy.sd
        mc = sm.Segmind_Vega(dict(SDXL_TINY))
        model = mc.get_model({})
        init_random_(model.diffusion_model, gen, torch)
        clip = comfy.sd.CLIP(mc.clip_target(), embedding_directory=None)
        init_random_(clip.cond_stage_model, gen, torch)
        clip_defaults_(clip.cond_stage_model, torch)
        vae = AutoencoderKL(ddconfig=SD_VAE_DDCONFIG, embed_dim=4)
        init_random_(vae, gen, torch)
        sd = cast(model.state_dict_for_saving(clip.get_sd(), vae.state_dict()), torch.float16, torch)
        del model, clip, vae
        assert detected_class(sd, "model.diffusion_model.", comfy) == "Segmind_Vega"
        return sd
    if family == "clip_l":
        import comfy.sd1_clip
        te = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
        init_random_(te, gen, torch)
        clip_defaults_(te, torch)
        sd = {k[len("transformer."):]: v for k, v in te.state_dict().items() if k.startswith("transformer.")}
        sd = cast(sd, torch.float16, torch)
        import comfy.sd
        assert comfy.sd.detect_te_model(sd) == comfy.sd.TEModel.CLIP_L
        return sd
    if family == "ae16":
        from comfy.ldm.models.autoencoder import AutoencodingEngine
        vae = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": AE_DDCONFIG},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": AE_DDCONFIG})
        init_random_(vae, gen, torch)
        return cast(vae.state_dict(), torch.float16, torch)
    if family == "wan21_vae":
        import comfy.ldm.wan.vae
        vae = comfy.ldm.wan.vae.WanVAE(**WAN_VAE)
        init_random_(vae, gen, torch)
        return cast(vae.state_dict(), torch.float16, torch)
    raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")


def verify_vae(sd, family, comfy):
    import comfy.sd
    vae = comfy.sd.VAE(sd=sd)
    want = {"ae16": (16, 2), "wan21_vae": (16, 3)}[family]
    assert (vae.latent_channels, vae.latent_dim) == want, (vae.latent_channels, vae.latent_dim)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfy-dir", required=True)
    ap.add_argument("--models-dir", default=None, help="default: <comfy-dir>/models")
    ap.add_argument("--only", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    comfy_dir = Path(a.comfy_dir).resolve()
    models = Path(a.models_dir).resolve() if a.models_dir else comfy_dir / "models"
    families = [f.strip() for f in a.only.split(",") if f.strip()]
    for f in families:
        if f not in FILES:
            ap.error(f"--only: unknown family {f!r}; one of {', '.join(FAMILIES)}")
    todo = [f for f in families if a.force or not is_current(models / FILES[f][0] / FILES[f][1], fixture_hash(f))]
    for f in families:
        if f not in todo:
            path = models / FILES[f][0] / FILES[f][1]
            print(json.dumps({"family": f, "path": str(path), "mib": round(path.stat().st_size / 2**20, 1),
                              "cached": True}), flush=True)
    if not todo:
        return 0
    sys.path.insert(0, str(comfy_dir))
    import torch
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # CPU torch: keep model_management off CUDA
    import comfy.model_detection  # noqa: F401
    import comfy.sd  # noqa: F401
    import comfy.utils
    comfy_mod = sys.modules["comfy"]
    for i, family in enumerate(todo):
        t0 = time.time()
        gen = torch.Generator().manual_seed(a.seed + i)
        sd = build(family, gen, torch, comfy_mod)
        if family in ("ae16", "wan21_vae"):
            verify_vae(sd, family, comfy_mod)
        folder, name = FILES[family]
        out = models / folder / name
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{name}.{os.getpid()}.tmp")
        try:
            comfy.utils.save_torch_file(sd, str(tmp), metadata={FIXTURE_KEY: fixture_hash(family), "comment": f"random init, {family}, seed {a.seed + i}"})
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                tmp.unlink()
        params = sum(v.numel() for v in sd.values())
        del sd
        print(json.dumps({"family": family, "path": str(out), "mib": round(out.stat().st_size / 2**20, 1),
                          "params": params, "seconds": round(time.time() - t0, 1), "cached": False}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
