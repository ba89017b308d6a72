"""Tiny random reward models of every architecture, built offline from configs for tests.

Each builder writes what a user would have: the official checkpoint layout as a pickle (``.pt`` /
``.pth``: open_clip for HPS v2.1, BLIP + MLP for ImageReward, the bare MLP for the aesthetic
predictor) next to a transformers "base" folder (config, tokenizer, processor), or the transformers
folder itself (PickScore). The official layouts are produced here by inverting the converter's key
maps independently (test-side code), so a round trip through the converter checks both directions.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("vlm_tiny", Path(__file__).with_name("vlm_tiny.py"))
vlm_tiny = sys.modules.get("vlm_tiny")
if vlm_tiny is None:
    vlm_tiny = importlib.util.module_from_spec(_spec)
    sys.modules["vlm_tiny"] = vlm_tiny
    _spec.loader.exec_module(vlm_tiny)

HEAD_SIZES = (16, 32, 16, 8, 4, 1)  # a tiny 5-linear-layer head on 16-d features


def random_head_state_dict(in_features: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sizes = (in_features,) + HEAD_SIZES[1:]
    sd = {}
    for layer, (a, b) in zip((0, 2, 4, 6, 7), zip(sizes[:-1], sizes[1:])):
        sd[f"layers.{layer}.weight"] = torch.randn(b, a, generator=g) / a ** 0.5
        sd[f"layers.{layer}.bias"] = torch.randn(b, generator=g) * 0.1
    return sd


def build_clip(folder: Path, seed: int = 0, gelu: bool = False) -> Path:
    """Tiny transformers CLIP folder (32² images, patch 8, 16-d projections)."""
    import transformers as T

    tok = vlm_tiny._tokenizer([], "<image>", wrap_bos_eos=True)
    act = "gelu" if gelu else "quick_gelu"
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, hidden_act=act)
    torch.manual_seed(seed)
    config = T.CLIPConfig(text_config=text, vision_config=vlm_tiny._vision(hidden_act=act), projection_dim=16)
    model = T.CLIPModel(config).eval()
    with torch.no_grad():  # random but not degenerate: spread the embeddings
        model.logit_scale.fill_(2.0)
    ip = vlm_tiny.pil_class(T, "CLIPImageProcessor")(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return vlm_tiny._save(Path(folder), model, T.CLIPProcessor(image_processor=ip, tokenizer=tok), f"clip seed {seed}")


def hf_to_open_clip(sd: dict) -> dict:
    """transformers CLIPModel weights → open_clip names (fused in_proj, transposed projections)."""
    out = {}
    block = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    simple = {
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight", "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias",
        "logit_scale": "logit_scale",
    }
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        if key in simple:
            out[simple[key]] = value.clone()
        elif key == "visual_projection.weight":
            out["visual.proj"] = value.T.clone()
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.clone()
        else:
            tower, _, rest = key.partition(".encoder.layers.")
            prefix = "visual.transformer.resblocks." if tower == "vision_model" else "transformer.resblocks."
            layer, rest = rest.split(".", 1)
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                param = rest.rsplit(".", 1)[1]
                name = f"{prefix}{layer}.attn.in_proj_{param}"
                if name not in out:
                    parts = [sd[f"{tower}.encoder.layers.{layer}.self_attn.{p}_proj.{param}"] for p in "qkv"]
                    out[name] = torch.cat(parts, 0).clone()
            else:
                module, param = rest.rsplit(".", 1)
                out[f"{prefix}{layer}.{block[module]}.{param}"] = value.clone()
    return out


def build_hps(root: Path, seed: int = 1) -> tuple[Path, Path]:
    """(HPS_v2.1-style open_clip .pt, transformers base folder) of one tiny CLIP with exact GELU."""
    from safetensors.torch import load_file

    base = build_clip(root / "hps_base", seed=seed, gelu=True)
    sd = hf_to_open_clip(load_file(str(base / "model.safetensors")))
    pt = root / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": sd}, pt)
    return pt, base


def build_aesthetic(root: Path, seed: int = 2) -> tuple[Path, Path]:
    """(sac+logos+ava1-l14-linearMSE.pth-style MLP pickle, CLIP base folder)."""
    base = build_clip(root / "aesthetic_clip", seed=seed)
    pth = root / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(random_head_state_dict(16, seed), pth)
    return pth, base


def build_blip(folder: Path, seed: int = 3) -> Path:
    """Tiny transformers BLIP ITM folder (32² images, patch 8, 32-d text with cross-attention to 48-d vision)."""
    import transformers as T

    tok = vlm_tiny._tokenizer([], "<image>", wrap_bos_eos=True)
    torch.manual_seed(seed)
    config = T.BlipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=64, encoder_hidden_size=48,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, sep_token_id=tok.eos_token_id,
                         initializer_range=0.3),
        vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, initializer_range=0.3),
        projection_dim=16)
    model = T.BlipForImageTextRetrieval(config).eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def hf_to_imagereward(sd: dict, head: dict) -> dict:
    """transformers BLIP ITM weights + head → ImageReward.pt names (blip.visual_encoder.*, blip.text_encoder.*, mlp.*)."""
    out = {}
    for key, value in sd.items():
        if key.startswith("vision_model."):
            k = key[len("vision_model."):]
            k = (k.replace("embeddings.class_embedding", "cls_token").replace("embeddings.position_embedding", "pos_embed")
                 .replace("embeddings.patch_embedding", "patch_embed.proj").replace("encoder.layers.", "blocks.")
                 .replace("layer_norm1", "norm1").replace("layer_norm2", "norm2").replace("self_attn.qkv", "attn.qkv")
                 .replace("self_attn.projection", "attn.proj").replace("post_layernorm", "norm"))
            out["blip.visual_encoder." + k] = value.clone()
        elif key.startswith("text_encoder."):
            out["blip." + key] = value.clone()
        else:  # vision_proj / text_proj / itm_head: in BLIP's checkpoints, unused by ImageReward's score
            out["blip." + key] = value.clone()
    out.update({"mlp." + k: v.clone() for k, v in head.items()})
    return out


def build_imagereward(root: Path, seed: int = 3) -> tuple[Path, Path]:
    """(ImageReward.pt-style pickle, BLIP base folder)."""
    from safetensors.torch import load_file

    base = build_blip(root / "blip_base", seed=seed)
    pt = root / "ImageReward.pt"
    torch.save(hf_to_imagereward(load_file(str(base / "model.safetensors")), random_head_state_dict(32, seed)), pt)
    return pt, base
