"""Resampling schemes are unbiased; ESS and log-mean-weight match hand-computed values."""
import math

import pytest
import torch

from comfy_poe.samplers import RESAMPLING_SCHEMES, effective_sample_size, log_mean_weight, resample_indices


def test_ess_and_log_mean_weight_hand_values():
    w = torch.tensor([[1.0], [1.0], [2.0], [4.0]], dtype=torch.float64)
    assert float(effective_sample_size(w.log())) == pytest.approx(8.0**2 / 22.0)
    assert float(log_mean_weight(w.log())) == pytest.approx(math.log(2.0))
    assert float(effective_sample_size(torch.zeros(7, 1))) == pytest.approx(7.0)
    one_hot = torch.tensor([[0.0], [-math.inf], [-math.inf]])
    assert float(effective_sample_size(one_hot)) == pytest.approx(1.0)


@pytest.mark.parametrize("scheme", RESAMPLING_SCHEMES)
def test_resampling_is_unbiased(scheme):
    """E[#copies of i] = L w_i: mean counts over 4000 draws within 4 standard errors of L w_i."""
    w = torch.tensor([0.02, 0.08, 0.3, 0.05, 0.25, 0.3], dtype=torch.float64)
    L, reps = w.numel(), 4000
    gen = torch.Generator().manual_seed(0)
    log_w = w.log()[:, None].expand(L, reps).contiguous()  # reps independent batch items
    idx = resample_indices(log_w, scheme, gen)
    assert idx.shape == (L, reps)
    counts = torch.stack([(idx == i).sum(0) for i in range(L)]).double()  # (L, reps)
    mean, se = counts.mean(1), counts.std(1) / math.sqrt(reps) + 1e-3
    assert ((mean - L * w).abs() < 4 * se + 0.01).all(), (scheme, mean, L * w)
    if scheme in ("systematic", "residual", "stratified"):
        # low-variance schemes keep floor(L w_i) copies of heavy particles (systematic and residual exactly)
        floor = torch.floor(L * w)
        if scheme != "stratified":
            assert (counts >= floor[:, None]).all()


def test_all_minus_inf_and_nan_weights_raise():
    with pytest.raises(ValueError, match="weight zero"):
        resample_indices(torch.full((3, 1), -math.inf))
    with pytest.raises(ValueError, match="NaN"):
        effective_sample_size(torch.tensor([[0.0], [float("nan")]]))
    with pytest.raises(ValueError, match="scheme"):
        resample_indices(torch.zeros(3, 1), "bogus")
