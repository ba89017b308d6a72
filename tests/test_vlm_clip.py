"""CLIP / SigLIP judge: tiny random dual encoders built in-test, saved and loaded through load_clip."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from comfy_poe.experts import PIXEL
from comfy_poe.experts.clip_judge import CLIPJudge, clip_pixels, load_clip, parse_prompts
from comfy_poe.experts.vlm import VLMFolderError

_spec = importlib.util.spec_from_file_location("vlm_tiny", Path(__file__).with_name("vlm_tiny.py"))
vlm_tiny = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("vlm_tiny", vlm_tiny)
_spec.loader.exec_module(vlm_tiny)



@pytest.fixture(scope="module")
def clip_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_clip")
    return {kind: (root / kind, load_clip(vlm_tiny.build_tiny_vlm(kind, root / kind))) for kind in ("clip", "siglip")}


def images(n, h, w, seed=0):
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_clip_judge_scores_batches_and_gradients(clip_models, kind):
    _, (model, processor, model_type) = clip_models[kind]
    assert model_type == kind
    judge = CLIPJudge(model, processor, model_type, [("a red cat", 1.0), ("a dog", 0.5)], batch_size=2)
    x = images(3, 40, 48)
    scores = judge(x)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    torch.testing.assert_close(scores, torch.cat([judge(x[i:i + 1]) for i in range(3)]), atol=1e-5, rtol=1e-5)
    per_prompt = judge.prompt_scores(x)
    assert per_prompt[0].sub(per_prompt[1]).abs().max() > 1e-6, "different prompts, different scores"
    if kind == "siglip":
        assert (per_prompt < 0).all(), "SigLIP scores are log-sigmoids"
    xg = x.clone().requires_grad_(True)
    judge(xg).sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 1e-6
    expert = judge.expert(0.5)
    assert expert.space == PIXEL and expert.differentiable


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_negatives_normalise_prompts_against_each_other(clip_models, kind):
    _, (model, processor, model_type) = clip_models[kind]
    x = images(2, 32, 32, seed=1)
    a = CLIPJudge(model, processor, model_type, [("a red cat", 1.0)], ["a dog"])(x)
    b = CLIPJudge(model, processor, model_type, [("a dog", 1.0)], ["a red cat"])(x)
    torch.testing.assert_close(a.exp() + b.exp(), torch.ones(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_clip_pixels_equal_processor(clip_models, kind):
    _, (_, processor, _) = clip_models[kind]
    pixels = (images(1, 32, 32, seed=2)[0] * 255).round().to(torch.uint8).numpy()
    reference = processor(images=[Image.fromarray(pixels)], return_tensors="pt")["pixel_values"]
    mine = clip_pixels(torch.from_numpy(pixels).float().permute(2, 0, 1)[None] / 255, processor.image_processor)
    torch.testing.assert_close(mine, reference.float(), atol=1e-5, rtol=0)


def test_clip_loader_refuses_vlms_and_vlm_loader_refuses_clip(clip_models, tmp_path):
    from comfy_poe.experts.vlm import load_vlm

    folder, _ = clip_models["clip"]
    with pytest.raises(VLMFolderError, match="not supported"):
        load_vlm(folder)
    qwen = vlm_tiny.build_tiny_vlm("qwen2_vl", tmp_path / "qwen")
    with pytest.raises(VLMFolderError, match="clip, siglip"):
        load_clip(qwen)


def test_parse_prompts():
    assert parse_prompts("a cat | 2\n\n# note\na dog") == [("a cat", 2.0), ("a dog", 1.0)]
    with pytest.raises(ValueError, match="weight"):
        parse_prompts("a cat | lots")
