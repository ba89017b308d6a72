"""Tiny random diffusers folders built from configs (no downloads): SD 1.x, SDXL, SD3, Flux; preference pairs."""
from __future__ import annotations

import json
from pathlib import Path

import torch

PROMPTS = ["a red square", "a blue circle", "a green cat", "a photo of a dog"]


def tiny_tokenizer(folder: Path, max_length: int = 16):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    tok.train_from_iterator(PROMPTS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_length)
    fast.save_pretrained(folder)
    return fast


def build_tiny_sd(folder: Path, unet_config: dict | None = None, cross_dim: int = 32, seed: int = 0) -> Path:
    """unet/ vae/ text_encoder/ tokenizer/ scheduler/ with random weights (seeded)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(unet_config or dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=4, norm_num_groups=8)))
    unet.save_pretrained(folder / "unet")
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(folder / "vae")
    tokenizer = tiny_tokenizer(folder / "tokenizer")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=cross_dim, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id))
    text.save_pretrained(folder / "text_encoder")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}))
    return folder


def build_pairs(folder: Path, n: int = 4, size: int = 16, seed: int = 0) -> Path:
    """n pairs: a bright chosen image and a dark rejected one per prompt."""
    from comfy_poe.training.preference import PreferencePairs, save_preference_folder

    g = torch.Generator().manual_seed(seed)
    chosen = (0.7 + 0.3 * torch.rand(n, size, size, 3, generator=g)).clamp(0, 1)
    rejected = 0.3 * torch.rand(n, size, size, 3, generator=g)
    return save_preference_folder(PreferencePairs([PROMPTS[i % len(PROMPTS)] for i in range(n)], chosen, rejected),
                                  folder)


def _clip_config(tokenizer, hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig

    extra = {"projection_dim": projection} if projection else {}
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=16, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **extra)


def _t5(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=1,
                                   num_heads=4, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0))


def _index(folder: Path, pipeline: str) -> None:
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline, "_diffusers_version": "0.42.1"}))


def _scheduler(folder: Path, config: dict) -> None:
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))


TINY_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2))


def build_tiny_sdxl(folder: Path, unet_config: dict | None = None, widths: tuple[int, int] = (32, 32),
                    seed: int = 0) -> Path:
    """An SDXL pipeline folder (model_index.json, unet/ vae/ text_encoder/ text_encoder_2/ tokenizer/
    tokenizer_2/ scheduler/) with random weights (seeded).  Context = widths[0] + widths[1]; pooled =
    widths[1]; the UNet's added embedding takes pooled + 6 time ids."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    config = dict(unet_config or TINY_SDXL_UNET)
    config.setdefault("cross_attention_dim", sum(widths))
    config.setdefault("projection_class_embeddings_input_dim", widths[1] + 6 * config["addition_time_embed_dim"])
    UNet2DConditionModel(**config).save_pretrained(folder / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  sample_size=16, scaling_factor=0.13025).save_pretrained(folder / "vae")
    tokenizer = tiny_tokenizer(folder / "tokenizer")
    tiny_tokenizer(folder / "tokenizer_2")
    CLIPTextModel(_clip_config(tokenizer, widths[0])).save_pretrained(folder / "text_encoder")
    CLIPTextModelWithProjection(_clip_config(tokenizer, widths[1], widths[1])).save_pretrained(folder / "text_encoder_2")
    _scheduler(folder, {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                        "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon"})
    _index(folder, "StableDiffusionXLPipeline")
    return folder


def _flow_vae(folder: Path, shift: float, scale: float) -> None:
    from diffusers import AutoencoderKL

    AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16, norm_num_groups=4, sample_size=16,
                  scaling_factor=scale, shift_factor=shift).save_pretrained(folder / "vae")


TINY_SD3_TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8,
                            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                            pooled_projection_dim=64, out_channels=16, pos_embed_max_size=8)


def build_tiny_sd3(folder: Path, t5: bool = True, transformer_config: dict | None = None,
                   projections: tuple[int, int] = (32, 32), seed: int = 0) -> Path:
    """An SD3 pipeline folder: SD3Transformer2DModel (1 joint block), CLIP-L / CLIP-G with projection (pooled =
    the two projections, which must sum to the transformer's pooled_projection_dim), an optional T5, a 16-channel
    VAE, FlowMatchEulerDiscreteScheduler with shift 3."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    config = dict(transformer_config or TINY_SD3_TRANSFORMER)
    SD3Transformer2DModel(**config).save_pretrained(folder / "transformer")
    _flow_vae(folder, 0.0609, 1.5305)
    tokenizer = None
    for suffix in ("", "_2", "_3") if t5 else ("", "_2"):
        tokenizer = tiny_tokenizer(folder / f"tokenizer{suffix}")
    for suffix, projection in zip(("", "_2"), projections):
        CLIPTextModelWithProjection(_clip_config(tokenizer, 16, projection)).save_pretrained(
            folder / f"text_encoder{suffix}")
    if t5:
        _t5(tokenizer, config["joint_attention_dim"]).save_pretrained(folder / "text_encoder_3")
    _scheduler(folder, {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0})
    _index(folder, "StableDiffusion3Pipeline")
    return folder


TINY_FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                             guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def build_tiny_flux(folder: Path, transformer_config: dict | None = None, seed: int = 0) -> Path:
    """A Flux-dev pipeline folder: FluxTransformer2DModel (1 double + 1 single block, guidance embedding), CLIP-L
    (width = the pooled projection), T5 (width = the joint attention dim), a 16-channel VAE,
    FlowMatchEulerDiscreteScheduler with dynamic shifting."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    config = dict(transformer_config or TINY_FLUX_TRANSFORMER)
    FluxTransformer2DModel(**config).save_pretrained(folder / "transformer")
    _flow_vae(folder, 0.1159, 0.3611)
    tokenizer = tiny_tokenizer(folder / "tokenizer")
    tiny_tokenizer(folder / "tokenizer_2")
    CLIPTextModel(_clip_config(tokenizer, config["pooled_projection_dim"])).save_pretrained(folder / "text_encoder")
    _t5(tokenizer, config["joint_attention_dim"]).save_pretrained(folder / "text_encoder_2")
    _scheduler(folder, {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                        "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15})
    _index(folder, "FluxPipeline")
    return folder


def method_config(family: str, method: str, name: str, steps: int = 2) -> dict:
    """A small run of ``method`` on the tiny ``family`` folder (16 px images, rank-2 attention LoRA)."""
    if method in ("mapo", "dpo", "sft"):
        cfg = {"pairs": "pairs", "resolution": 16, "preference": {"batch_size": 2}}
    elif method == "selma":
        return {"method": "selma", "model": family, "dataset": "skill", "output": f"out_{name}", "preset": "tiny",
                "selma": {"rank": 2, "alpha": 2, "steps": steps, "batch_size": 2, "micro_batch": 1, "lr": 1e-3,
                          "eval_samples": 0, "seed": 2}}
    elif method == "dual-process":
        cfg = {"resolution": 16, "prompt": "a red square", "sampling_steps": 2, "cfg": 2.0,
               "dual_process": {"batch_size": 2, "noise_pool": 4, "pixel_range": "clamp"}}
    else:
        cfg = {"resolution": 16, "prompts": ["a red square", "a blue circle"], "sampling_steps": 2,
               "rollout": {"batch_size": 2, "flow_channels": [8, 16], "flow_emb_dim": 16}}
    return {"method": method, "model": family, "output": f"out_{name}", **cfg,
            "lora": {"rank": 2, "alpha": 2, "targets": "attention"}, "loop": {"steps": steps, "lr": 1e-3, "seed": 1}}
