"""A tiny random diffusers SD 1.x folder built from configs (no downloads), and preference pairs for it."""
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
