"""Reward-model judges: parameter counts / weight memory of the real models and CPU time per image.

    python -m comfy_poe.benchmarks.reward_judges [--images 4] [--size 512] [--repeats 3]

Table 1 builds each published architecture on the meta device from its published configuration (no
weights are downloaded) and multiplies the parameter count by the bytes of each dtype: the weight memory a
judge needs on the GPU (activations come on top, a few hundred MB per image batch of 8 at 224²).
Table 2 times the tiny random models of the tests (tests/reward_tiny.py; needs a source checkout) on CPU:
seconds per image for scoring and for scoring + backward to the pixels, on ``--size``² images.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

# Published configurations (transformers names)
CLIP_H14 = dict(  # laion/CLIP-ViT-H-14-laion2B-s32B-b79K = PickScore_v1 = HPS v2.1 (open_clip ViT-H-14)
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     vocab_size=49408, max_position_embeddings=77, hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       patch_size=14, image_size=224, hidden_act="gelu"),
    projection_dim=1024)
CLIP_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       patch_size=14, image_size=224, projection_dim=768)  # openai/clip-vit-large-patch14
BLIP_IMAGEREWARD = dict(  # ImageReward: BLIP ViT-L/16 at 224² + BERT-base with cross-attention
    text_config=dict(vocab_size=30524, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, encoder_hidden_size=1024, max_position_embeddings=512),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       patch_size=16, image_size=224),
    projection_dim=256)
HEAD_PARAMS = {768: 768 * 1024 + 1024 + 1024 * 128 + 128 + 128 * 64 + 64 + 64 * 16 + 16 + 16 + 1}


def published_parameter_counts() -> dict[str, int]:
    import transformers as T

    with torch.device("meta"):
        clip_h = sum(p.numel() for p in T.CLIPModel(T.CLIPConfig(**CLIP_H14)).parameters())
        clip_l = sum(p.numel() for p in T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**CLIP_L14_VISION)).parameters())
        blip = T.BlipForImageTextRetrieval(T.BlipConfig(**BLIP_IMAGEREWARD))
        used = sum(p.numel() for n, p in blip.named_parameters() if n.startswith(("vision_model.", "text_encoder.")))
    return {"pickscore": clip_h, "hpsv2": clip_h, "imagereward": used + HEAD_PARAMS[768],
            "aesthetic": clip_l + HEAD_PARAMS[768]}


def _tiny_builders():
    path = Path(__file__).resolve().parents[1] / "tests" / "reward_tiny.py"
    if not path.is_file():
        raise SystemExit("the CPU timing needs a source checkout (tests/reward_tiny.py builds the tiny models)")
    spec = importlib.util.spec_from_file_location("reward_tiny", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("reward_tiny", module)
    spec.loader.exec_module(module)
    return module


def tiny_folders(root: Path) -> dict[str, Path]:
    from ..experts.reward import convert_reward

    tiny = _tiny_builders()
    out = {"pickscore": tiny.build_clip(root / "pickscore")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind, build in (("hpsv2", tiny.build_hps), ("aesthetic", tiny.build_aesthetic),
                            ("imagereward", tiny.build_imagereward)):
            source, base = build(root / f"{kind}_src")
            out[kind] = convert_reward(kind, source, root / kind, base=base, allow_pickle=True).folder
    return out


def time_per_image(judge, images: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(seconds per image scoring, seconds per image scoring + backward to the pixels); best of ``repeats``."""
    fwd, bwd = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            judge(images)
        fwd.append(time.perf_counter() - t0)
        x = images.clone().requires_grad_(True)
        t0 = time.perf_counter()
        judge(x).sum().backward()
        bwd.append(time.perf_counter() - t0)
    return min(fwd) / images.shape[0], min(bwd) / images.shape[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4, help="images per batch")
    ap.add_argument("--size", type=int, default=512, help="side of the (decoded) input images")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ..experts.reward import RewardJudge, load_reward_model

    print("| reward | parameters | float32 | bfloat16 / float16 |")
    print("|---|---:|---:|---:|")
    for kind, n in published_parameter_counts().items():
        print(f"| {kind} | {n / 1e6:.1f} M | {n * 4 / 2**30:.2f} GiB | {n * 2 / 2**30:.2f} GiB |")
    print()
    images = torch.rand(args.images, args.size, args.size, 3, generator=torch.Generator().manual_seed(0))
    print(f"| tiny model (CPU, {args.threads} threads, {args.size}² inputs) | parameters | s / image (score) "
          "| s / image (score + backward) |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind, folder in tiny_folders(Path(tmp)).items():
            model = load_reward_model(folder, dtype="float32")
            judge = RewardJudge(model, "a photo of a cat", batch_size=args.images)
            fwd, bwd = time_per_image(judge, images, args.repeats)
            print(f"| {kind} | {model.parameter_count() / 1e3:.0f} k | {fwd:.4f} | {bwd:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
