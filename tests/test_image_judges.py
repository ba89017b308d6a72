"""Model-free judges (comfy_poe.experts.image_judges) on hand-made images with exact expected values."""
import math

import pytest
import torch

from comfy_poe.experts import PIXEL, LATENT, evaluate_potentials
from comfy_poe.experts.image_judges import (
    image_statistics, palette_judge, parse_hex_colors, proximity_judge, region_judge, statistics_judge,
)

RED, GREEN, BLUE = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)


def solid(color, n=1, h=8, w=8):
    return torch.tensor(color, dtype=torch.float32).expand(n, h, w, 3).clone()


def two_tone(left, right, h=8, w=8):
    img = solid(left, h=h, w=w)
    img[:, :, w // 2:] = torch.tensor(right)
    return img


def grad_of(judge, x):
    x = x.clone().requires_grad_(True)
    judge.fn(x).sum().backward()
    return x.grad


# --------------------------------------------------------------------------- parsing


def test_parse_hex_colors_formats_and_errors():
    colors = parse_hex_colors("#ff0000, #0f0\n0000ff; #808080")
    assert torch.allclose(colors, torch.tensor([RED, GREEN, BLUE, (128 / 255,) * 3]))
    with pytest.raises(ValueError, match="palette.*'#ff00'"):
        parse_hex_colors("#ff0000 #ff00", name="palette")
    with pytest.raises(ValueError, match="at least one"):
        parse_hex_colors(" , ")


# --------------------------------------------------------------------------- palette


def test_palette_exact_value_and_preference():
    judge = palette_judge([RED, GREEN], sharpness=10.0)
    assert judge.space == PIXEL and judge.differentiable
    on_palette = two_tone(RED, GREEN)
    off_palette = solid((0.5, 0.5, 0.9))
    # exact: a red pixel has squared distance 0 to red and 2 to green
    expected = math.log((1 + math.exp(-20.0)) / 2)
    assert judge.fn(on_palette).item() == pytest.approx(expected, abs=1e-6)
    assert judge.fn(on_palette).item() > judge.fn(off_palette).item() + 1.0


def test_palette_monotone_in_distance():
    judge = palette_judge("#ff0000 #0000ff", sharpness=20.0)
    # move away from red, in the direction that also moves away from blue
    steps = torch.linspace(0, 0.8, 9)
    batch = torch.stack([solid((1.0, float(d), 0.0))[0] for d in steps])
    scores = judge.fn(batch)
    assert scores.shape == (9,)
    assert (scores[1:] < scores[:-1]).all()
    # per-image batch: every row equals the single-image evaluation
    for i in (0, 4, 8):
        assert scores[i].item() == pytest.approx(judge.fn(batch[i:i + 1]).item(), abs=1e-6)


def test_palette_rejects_bad_colours():
    with pytest.raises(ValueError, match="colors"):
        palette_judge([[1.5, 0, 0]])
    with pytest.raises(ValueError, match="colors"):
        palette_judge(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="sharpness"):
        palette_judge([RED], sharpness=0)


# --------------------------------------------------------------------------- statistics


def test_image_statistics_exact():
    img = two_tone((0.2, 0.2, 0.2), (0.6, 0.6, 0.6))
    stats = image_statistics(img)
    assert stats["brightness"].item() == pytest.approx(0.4, abs=1e-6)
    assert stats["contrast"].item() == pytest.approx(0.2, abs=1e-6)
    assert stats["saturation"].item() == pytest.approx(0.0, abs=1e-6)
    sat = image_statistics(solid((0.8, 0.4, 0.4)))["saturation"].item()
    assert sat == pytest.approx(0.4 / (0.8 + 0.01), abs=1e-6)


def test_statistics_judge_maximal_at_target():
    judge = statistics_judge(brightness=0.5, tolerance=0.1)
    levels = torch.linspace(0.1, 0.9, 9)
    batch = torch.cat([solid((float(v),) * 3) for v in levels])
    scores = judge.fn(batch)
    assert scores.argmax().item() == 4 and scores[4].item() == pytest.approx(0.0, abs=1e-9)
    # exact Gaussian penalty −½((0.2 − 0.5)/0.1)² = −4.5
    assert scores[1].item() == pytest.approx(-4.5, abs=1e-5)
    combined = statistics_judge(brightness=0.4, contrast=0.2, saturation=0.0, tolerance=0.05)
    assert combined.fn(two_tone((0.2,) * 3, (0.6,) * 3)).item() == pytest.approx(0.0, abs=1e-6)
    assert combined.fn(solid((0.4,) * 3)).item() == pytest.approx(-0.5 * (0.2 / 0.05) ** 2, abs=1e-3)


def test_statistics_judge_errors():
    with pytest.raises(ValueError, match="at least one target"):
        statistics_judge()
    with pytest.raises(ValueError, match="brightness"):
        statistics_judge(brightness=1.5)
    with pytest.raises(ValueError, match="tolerance"):
        statistics_judge(contrast=0.2, tolerance=-1)


# --------------------------------------------------------------------------- region


def test_region_dark_prefers_dark_region_and_respects_mask():
    mask = torch.zeros(4, 4)
    mask[:, :2] = 1.0  # left half, at a lower resolution than the 8x8 images
    judge = region_judge(mask, "dark", tolerance=0.1)
    dark_left = two_tone((0.0,) * 3, (1.0,) * 3)
    dark_right = two_tone((1.0,) * 3, (0.0,) * 3)
    scores = judge.fn(torch.cat([dark_left, dark_right]))
    # exact: the mask is bilinearly upsampled inside the judge (column 4 gets weight 1/4)
    m = torch.nn.functional.interpolate(mask[None, None], size=(8, 8), mode="bilinear", align_corners=False)[0, 0]
    lum = dark_left[0, ..., 0]
    assert scores[0].item() == pytest.approx(-(m * lum**2).sum().item() / m.sum().item() / 0.02, rel=1e-5)
    assert scores[1].item() == pytest.approx(-(m * (1 - lum) ** 2).sum().item() / m.sum().item() / 0.02, rel=1e-5)
    assert scores[0] > scores[1] + 20
    # outside the (resized) mask nothing matters
    assert (m[:, 5:] == 0).all()
    noisy_right = dark_left.clone()
    noisy_right[:, :, 5:] = torch.rand(1, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    assert judge.fn(noisy_right).item() == pytest.approx(scores[0].item(), abs=1e-6)
    bright = region_judge(mask, "bright")
    assert bright.fn(dark_right).item() > bright.fn(dark_left).item()


def test_region_empty_flat_and_fill():
    mask = torch.ones(8, 8)
    flat = region_judge(mask, "empty", tolerance=0.1)
    noise = torch.rand(1, 8, 8, 3, generator=torch.Generator().manual_seed(1))
    assert flat.fn(solid((0.3, 0.7, 0.1))).item() == pytest.approx(0.0, abs=1e-9)
    expected = -noise.var(dim=(1, 2), unbiased=False).sum().item() / (2 * 0.01)
    assert flat.fn(noise).item() == pytest.approx(expected, rel=1e-5)
    filled = region_judge(mask, "empty", fill_color="#ffffff", tolerance=0.5)
    gray = solid((0.5,) * 3)
    assert filled.fn(gray).item() == pytest.approx(-(3 * 0.25) / (2 * 0.25), rel=1e-6)


def test_region_errors():
    with pytest.raises(ValueError, match="mode"):
        region_judge(torch.ones(4, 4), "shiny")
    with pytest.raises(ValueError, match="empty"):
        region_judge(torch.zeros(4, 4), "dark")
    with pytest.raises(ValueError, match="mask"):
        region_judge(torch.ones(2, 4, 4), "dark")
    with pytest.raises(ValueError, match="fill_color"):
        region_judge(torch.ones(4, 4), "dark", fill_color="#000000")
    with pytest.raises(ValueError, match="IMAGE batch"):
        region_judge(torch.ones(4, 4), "dark").fn(torch.zeros(1, 3, 8, 8))


# --------------------------------------------------------------------------- proximity


def test_proximity_pixel_exact_formula_and_batch():
    gen = torch.Generator().manual_seed(2)
    ref = torch.rand(1, 6, 6, 3, generator=gen)
    x = torch.rand(3, 6, 6, 3, generator=gen)
    judge = proximity_judge(ref, weight=2.0)
    expected = -((x - ref) ** 2).sum(-1).mean(dim=(1, 2))
    assert torch.allclose(judge.fn(x), expected, atol=1e-6)
    assert judge.fn(ref).item() == pytest.approx(0.0, abs=1e-12)
    # weight enters through evaluate_potentials: exp(−w·mean‖x − c‖²)
    total = evaluate_potentials([judge], x, decode=lambda z: z)
    assert torch.allclose(total, 2.0 * expected.double(), atol=1e-6)


def test_proximity_latent_masked():
    gen = torch.Generator().manual_seed(3)
    ref = torch.randn(4, 8, 8, generator=gen)  # (C, H, W) without batch
    x = torch.randn(2, 4, 8, 8, generator=gen)
    mask = torch.zeros(16, 16)
    mask[:8] = 1.0  # top half, at twice the latent resolution
    judge = proximity_judge(ref, mask=mask, space=LATENT)
    assert judge.space == LATENT
    sq = ((x - ref) ** 2).sum(1)
    m = torch.nn.functional.interpolate(mask[None, None], size=(8, 8), mode="bilinear", align_corners=False)[0, 0]
    expected = -(sq * m).sum(dim=(1, 2)) / m.sum()
    assert torch.allclose(judge.fn(x), expected, atol=1e-5)
    # changes outside the mask are ignored
    y = x.clone()
    y[:, :, 4:] += 10.0
    assert torch.allclose(judge.fn(y), judge.fn(x), atol=1e-5)


def test_proximity_shape_errors():
    with pytest.raises(ValueError, match="space"):
        proximity_judge(torch.zeros(1, 4, 4, 3), space="audio")
    with pytest.raises(ValueError, match="reference"):
        proximity_judge(torch.zeros(4, 3))
    judge = proximity_judge(torch.zeros(1, 4, 4, 3))
    with pytest.raises(ValueError, match=r"reference image .*\(1, 4, 4, 3\).*\(2, 8, 8, 3\)"):
        judge.fn(torch.zeros(2, 8, 8, 3))
    batched = proximity_judge(torch.zeros(2, 4, 4, 3))
    with pytest.raises(ValueError, match="batch 1 or 3"):
        batched.fn(torch.zeros(3, 4, 4, 3))


# --------------------------------------------------------------------------- shared properties


def all_judges():
    mask = torch.zeros(8, 8)
    mask[2:6, 2:6] = 1.0
    ref = torch.rand(1, 8, 8, 3, generator=torch.Generator().manual_seed(4))
    return [
        palette_judge([RED, GREEN, BLUE]),
        statistics_judge(brightness=0.3, contrast=0.1, saturation=0.5),
        region_judge(mask, "dark"),
        region_judge(mask, "bright"),
        region_judge(mask, "empty"),
        region_judge(mask, "empty", fill_color=[0.2, 0.2, 0.2]),
        proximity_judge(ref, mask=mask),
    ]


@pytest.mark.parametrize("index", range(7))
def test_gradients_flow_finite_and_batched(index):
    judge = all_judges()[index]
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(3, 8, 8, 3, generator=gen)
    g = grad_of(judge, x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # gradient descent on −r improves the score (the gradient points the right way)
    better = (x + 1e-3 * g / g.abs().max()).clamp(0, 1)
    assert (judge.fn(better) >= judge.fn(x) - 1e-7).all()
    assert (judge.fn(better) > judge.fn(x)).any()
    # per image: the batch result equals the single-image results
    scores = judge.fn(x)
    assert scores.shape == (3,)
    singles = torch.cat([judge.fn(x[i:i + 1]) for i in range(3)])
    assert torch.allclose(scores, singles, atol=1e-5)
    # finite on the extremes of the range (black, white), also in half precision
    for img in (torch.zeros(2, 8, 8, 3), torch.ones(2, 8, 8, 3)):
        assert torch.isfinite(judge.fn(img)).all()
        assert torch.isfinite(judge.fn(img.half())).all()
    assert torch.isfinite(evaluate_potentials([judge], x, decode=lambda z: z)).all()


def test_rgba_and_gray_images_accepted():
    judge = palette_judge([RED])
    rgba = torch.cat([solid(RED), torch.zeros(1, 8, 8, 1)], dim=-1)
    assert judge.fn(rgba).item() == pytest.approx(0.0, abs=1e-9)
    gray = torch.ones(1, 8, 8, 1)
    assert judge.fn(gray).item() == pytest.approx(-20.0 * 2, abs=1e-5)


def test_inference_mode_inputs_still_differentiable():
    """ComfyUI builds node inputs under torch.inference_mode; the judges must still backpropagate."""
    with torch.inference_mode():
        ref = torch.rand(1, 8, 8, 3, generator=torch.Generator().manual_seed(6))
        mask = torch.ones(1, 4, 4)
        judges = [proximity_judge(ref, mask=mask), region_judge(mask, "empty", fill_color="#336699"),
                  palette_judge("#ff0000 #00ff00"), statistics_judge(brightness=0.2)]
    x = torch.rand(2, 8, 8, 3, generator=torch.Generator().manual_seed(7))
    for judge in judges:
        g = grad_of(judge, x)
        assert torch.isfinite(g).all() and g.abs().sum() > 0, judge.name


def test_proximity_latent_video_takes_5d_latents_with_the_mask_on_every_frame():
    ref = torch.zeros(1, 16, 3, 4, 4)
    x = torch.zeros(2, 16, 3, 4, 4)
    x[1, :, :, :, :2] = 1.0  # left half off by 1 in every channel and frame
    judge = proximity_judge(ref, space=LATENT)
    assert torch.allclose(judge.fn(x), torch.tensor([0.0, -8.0]))  # 16 channels · half the positions
    right = torch.zeros(4, 4)
    right[:, 2:] = 1.0
    masked = proximity_judge(ref, mask=right, space=LATENT)
    assert torch.allclose(masked.fn(x), torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match="5-D"):
        judge.fn(torch.zeros(2, 16, 4, 4))
