"""The product combination: analytic product scores for EPS and CONST, CFG as a product, shared
unconditional predictions, masks and coverage, the capture channel."""
import pytest
import torch

from comfy_poe.experts import (
    POE_CAPTURE_KEY, GaussianMixture, GenerativeExpert, GMMDenoiser, PoECapture, ProductOfExperts,
    combine_denoised, plan_expert_calls, score_from_denoised,
)

F64 = dict(dtype=torch.float64)


def _mixtures(d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda k: GaussianMixture(torch.randn(k, d, generator=g, **F64) * 2, torch.rand(k, d, generator=g, **F64) + 0.2,
                                   torch.rand(k, generator=g, **F64) + 0.2)
    return mk(2), mk(3), mk(1)


@pytest.mark.parametrize("param", ["eps", "const"])
def test_product_denoiser_matches_analytic_product_score(param):
    """Combined prediction -> score equals Σ λ_i ∇log p_i,σ computed by autograd of exact log-densities."""
    a, b, _ = _mixtures()
    den = GMMDenoiser(param)
    model = ProductOfExperts([GenerativeExpert(den, a, weight=1.0), GenerativeExpert(den, b, weight=0.7)])
    g = torch.Generator().manual_seed(1)
    sigma = torch.tensor([0.3, 0.6, 0.9], **F64) if param == "const" else torch.tensor([0.5, 2.0, 9.0], **F64)
    x = torch.randn(3, 3, generator=g, **F64) * (1.0 if param == "const" else 3.0)
    D = model(x, sigma)
    s = score_from_denoised(D, x, sigma, param)
    xg = x.clone().requires_grad_()
    logp = (den.log_prob(xg, sigma, a) + 0.7 * den.log_prob(xg, sigma, b)).sum()
    (expected,) = torch.autograd.grad(logp, xg)
    torch.testing.assert_close(s, expected, rtol=1e-9, atol=1e-9)
    # the classic bug: averaging the two predictions is NOT the product
    avg = 0.5 * (den.denoise(x, sigma, [a])[0] + den.denoise(x, sigma, [b])[0])
    assert (score_from_denoised(avg, x, sigma, param) - expected).abs().max() > 1e-2


def test_cfg_is_a_product_of_raw_predictions_and_unconditional_is_shared():
    a, b, u = _mixtures()
    den = GMMDenoiser()
    e1 = GenerativeExpert(den, a, negative=u, cfg=3.0, weight=1.0)
    e2 = GenerativeExpert(den, b, negative=u, cfg=2.0, weight=0.5)
    groups = plan_expert_calls([e1, e2])
    assert len(groups) == 1 and len(groups[0].conds) == 3  # a, u, b: the unconditional is evaluated once
    model = ProductOfExperts([e1, e2])
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), **F64) * 2
    sigma = torch.full((4,), 1.5, **F64)
    den.n_evals = 0
    cap = PoECapture()
    D = model(x, sigma, model_options={POE_CAPTURE_KEY: cap})
    assert den.n_evals == 3 * 4
    comps = cap.predictions.components(x, "full")
    assert len(comps) == 3
    weights = sorted(float(w) for _, w in comps)
    assert weights == pytest.approx(sorted([3.0, 1.0, 1.0 * (1 - 3.0) + 0.5 * (1 - 2.0)]))
    # score of the product of CFG'd experts = Σ effective weight × raw scores
    s = lambda m: m.score_ve(x, sigma)
    expected = 3.0 * s(a) + 1.0 * s(b) + (-2.0 - 0.5) * s(u)
    torch.testing.assert_close(score_from_denoised(D, x, sigma, "eps"), expected)
    # "product" components give the same combined prediction
    torch.testing.assert_close(combine_denoised(x, sigma, cap.predictions.components(x, "product"), "eps"), D)


def test_masks_multiply_where_they_overlap_and_uncovered_pixels_are_refused():
    a, b, _ = _mixtures(d=4)
    den = GMMDenoiser()
    left = torch.tensor([1.0, 1.0, 0.5, 0.0], **F64)
    right = torch.tensor([0.0, 0.0, 0.5, 1.0], **F64)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(3), **F64)
    sigma = torch.full((2,), 0.8, **F64)
    D = ProductOfExperts([GenerativeExpert(den, a, mask=left), GenerativeExpert(den, b, mask=right)])(x, sigma)
    expected = left * a.score_ve(x, sigma) + right * b.score_ve(x, sigma)
    torch.testing.assert_close(score_from_denoised(D, x, sigma, "eps"), expected)
    hole = torch.tensor([1.0, 0.0, 0.0, 0.0], **F64)
    with pytest.raises(ValueError, match="covered by no expert"):
        ProductOfExperts([GenerativeExpert(den, a, mask=hole)])(x, sigma)
    base = GenerativeExpert(den, b)
    D = ProductOfExperts([GenerativeExpert(den, a, mask=hole)], base=base)(x, sigma)
    expected = hole * a.score_ve(x, sigma) + (1 - hole) * b.score_ve(x, sigma)
    torch.testing.assert_close(score_from_denoised(D, x, sigma, "eps"), expected)


def test_bad_expert_definitions_fail_clearly():
    a, _, _ = _mixtures()
    with pytest.raises(ValueError, match="negative"):
        GenerativeExpert(GMMDenoiser(), a, cfg=2.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        GenerativeExpert(GMMDenoiser(), a, mask=torch.tensor([2.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="does not match"):
        ProductOfExperts([GenerativeExpert(GMMDenoiser(), a, mask=torch.ones(5))])(torch.zeros(1, 3), torch.ones(1))
    with pytest.raises(ValueError, match="same latent space"):
        ProductOfExperts([GenerativeExpert(GMMDenoiser("eps"), a), GenerativeExpert(GMMDenoiser("const"), a)])(
            torch.zeros(1, 3), torch.full((1,), 0.5))
