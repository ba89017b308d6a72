"""Region masks on the latent grid: resizing, feathering, video latents, and their use in a product."""
import pytest
import torch

from comfy_poe.experts import GenerativeExpert, GMMDenoiser, ProductOfExperts
from comfy_poe.experts.masks import feather, prepare_mask


def test_prepare_mask_resizes_to_the_latent_and_keeps_the_region():
    mask = torch.zeros(512, 768)
    mask[:, :384] = 1.0
    m = prepare_mask(mask, (1, 4, 64, 96))
    assert m.shape == (1, 1, 64, 96)
    assert torch.all(m[..., :47] == 1) and torch.all(m[..., 49:] == 0)


def test_feather_is_a_normalised_blur_that_preserves_mass_away_from_borders():
    mask = torch.zeros(1, 32, 32)
    mask[:, :, 8:24] = 1.0
    soft = feather(mask, 2.0)
    assert soft.min() >= 0 and soft.max() <= 1
    assert float(soft.sum()) == pytest.approx(float(mask.sum()), rel=1e-4)
    assert 0.3 < float(soft[0, 16, 8]) < 0.7  # the edge is now half on
    assert torch.equal(feather(mask, 0.0), mask)


def test_video_latents_get_the_mask_on_every_frame():
    m = prepare_mask(torch.ones(64, 64), (1, 16, 5, 8, 8))
    assert m.shape == (1, 1, 5, 8, 8)


def test_video_latents_take_one_mask_per_frame():
    """A mask batch on a 5-D latent is per frame: k = T exactly, k = 4(T-1)+1 pixel frames resampled in time."""
    per_latent_frame = torch.stack([torch.full((8, 8), float(t)) for t in range(5)]) / 4
    m = prepare_mask(per_latent_frame, (2, 16, 5, 8, 8))
    assert m.shape == (1, 1, 5, 8, 8)
    assert torch.allclose(m[0, 0, :, 3, 3], torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    pixel_frames = torch.zeros(17, 16, 16)
    pixel_frames[8:] = 1.0  # second half of the clip: region on
    m = prepare_mask(pixel_frames, (1, 16, 5, 8, 8))
    assert m.shape == (1, 1, 5, 8, 8)
    assert m[0, 0, :2].max() == 0 and m[0, 0, 2:].min() == 1  # latent frame t <- pixel frame 4t
    assert prepare_mask(pixel_frames, (1, 16, 1, 8, 8)).shape == (1, 1, 1, 8, 8)


def test_bad_mask_rank_is_refused():
    with pytest.raises(ValueError, match="mask must be"):
        prepare_mask(torch.ones(1, 1, 8, 8), (1, 4, 8, 8))


def test_prepared_masks_drive_a_regional_product_on_image_shaped_latents():
    """A (N, C, H, W) product with two half-image experts equals each expert on its own half."""

    class ConstantDenoiser:
        parameterization = "eps"

        def denoise(self, x, sigma, conds):
            return [torch.full_like(x, float(c)) for c in conds]

    den = ConstantDenoiser()
    left = torch.zeros(8, 8)
    left[:, :4] = 1
    shape = (2, 4, 8, 8)
    experts = [GenerativeExpert(den, 1.0, mask=prepare_mask(left, shape)[0]),
               GenerativeExpert(den, -1.0, mask=prepare_mask(1 - left, shape)[0])]
    x = torch.randn(shape)
    D = ProductOfExperts(experts)(x, torch.full((2,), 3.0))
    assert torch.allclose(D[..., :4], torch.ones(2, 4, 8, 4)) and torch.allclose(D[..., 4:], -torch.ones(2, 4, 8, 4))
