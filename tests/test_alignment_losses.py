"""Alignment losses against values computed by hand (plain python math) on fixed tensors: DDPM step moments and
log-densities (mean over dims), DAG-DB, DAG-KL (leave-one-out advantages, clipped ratio), DDPO, the proximal
term, β anneal, MaPO (bounded link with expm1), Diffusion-DPO, SFT, the denoising target, JPEG rewards."""
import io
import math

import pytest
import torch

from comfy_poe.training import gflownet as G
from comfy_poe.training import mapo as M
from comfy_poe.training import rollout as R
from comfy_poe.training import rewards as W


def logsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def normal_logpdf(x, mu, sd):
    return -((x - mu) ** 2) / (2 * sd * sd) - math.log(sd) - 0.5 * math.log(2 * math.pi)


# ------------------------------------------------------------------------------------------ DDPM chain
def test_ddpm_step_moments_and_log_probs_by_hand():
    sig_t, sig_s = 2.0, 0.5
    a_t, a_s = 1 / (1 + sig_t**2), 1 / (1 + sig_s**2)
    z_t = torch.tensor([[0.3, -1.2]]).reshape(1, 2, 1, 1)
    eps = torch.tensor([[0.7, 0.1]]).reshape(1, 2, 1, 1)
    mean, std = R.ddpm_step_moments(z_t, eps, torch.tensor([a_t]), torch.tensor([a_s]), eta=1.0)
    var = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
    sd = math.sqrt(var)
    for k, (z, e) in enumerate([(0.3, 0.7), (-1.2, 0.1)]):
        x0 = (z - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
        mu = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s - var) * e
        assert mean.flatten()[k].item() == pytest.approx(mu, rel=1e-5)
    assert std.flatten()[0].item() == pytest.approx(sd, rel=1e-6)
    # in VE terms the η = 1 step is the k-diffusion ancestral step: std / √ᾱ_s = σ_up
    sigma_up = math.sqrt(sig_s**2 * (sig_t**2 - sig_s**2) / sig_t**2)
    assert sd / math.sqrt(a_s) == pytest.approx(sigma_up, rel=1e-6)

    z_s = torch.tensor([[0.2, -0.4]]).reshape(1, 2, 1, 1)
    lp = R.gaussian_log_prob_mean(z_s, mean, std)
    expected = sum(normal_logpdf(v, m, sd) for v, m in zip([0.2, -0.4], mean.flatten().tolist())) / 2  # MEAN over dims
    assert lp.item() == pytest.approx(expected, rel=1e-5)

    lb = R.backward_log_prob(z_t, z_s, torch.tensor([a_t]), torch.tensor([a_s]))
    ratio = a_t / a_s
    expected_b = sum(normal_logpdf(zt, math.sqrt(ratio) * zs, math.sqrt(1 - ratio))
                     for zt, zs in zip([0.3, -1.2], [0.2, -0.4])) / 2
    assert lb.item() == pytest.approx(expected_b, rel=1e-5)


def test_chain_sigmas_drop_trailing_zero_and_refuse_bad_schedules():
    assert R.chain_sigmas([3.0, 1.0, 0.1, 0.0]).tolist() == pytest.approx([3.0, 1.0, 0.1])
    with pytest.raises(ValueError, match="decreasing"):
        R.chain_sigmas([1.0, 2.0, 0.5])
    with pytest.raises(ValueError, match="at least 2"):
        R.chain_sigmas([1.0, 0.0])


# ------------------------------------------------------------------------------------------ GFlowNet / DDPO
def test_leave_one_out_advantages_by_hand():
    v = [1.0, 2.0, 4.0, -3.0]
    n = len(v)
    base = [(sum(v) - x) / (n - 1) for x in v]
    sq = [(x - b) ** 2 for x, b in zip(v, base)]
    var = [(sum(sq) - s) / (n - 1) for s in sq]
    expected = [max(-5, min(5, (x - b) / (math.sqrt(q) + 1e-8))) for x, b, q in zip(v, base, var)]
    got = G.leave_one_out_advantages(torch.tensor(v, dtype=torch.float64), clip=5.0)
    assert got.tolist() == pytest.approx(expected, rel=1e-9)
    clipped = G.leave_one_out_advantages(torch.tensor(v, dtype=torch.float64), clip=0.5)
    assert clipped.tolist() == pytest.approx([max(-0.5, min(0.5, e)) for e in expected])
    with pytest.raises(ValueError, match="at least 2"):
        G.leave_one_out_advantages(torch.tensor([1.0]))


def test_dag_db_loss_by_hand_and_gradients():
    lf = torch.tensor([1.0, -0.5], requires_grad=True)
    lpf = torch.tensor([-0.2, -0.3], requires_grad=True)
    lpb = torch.tensor([-0.1, -0.4])
    lfn = torch.tensor([0.4, 0.2], requires_grad=True)
    loss = G.dag_db_loss(lf, lpf, lpb, lfn)
    res = [1.0 - 0.2 + 0.1 - 0.4, -0.5 - 0.3 + 0.4 - 0.2]
    assert loss.tolist() == pytest.approx([r * r for r in res])
    loss.sum().backward()
    assert lpf.grad.tolist() == pytest.approx([2 * r for r in res])      # DB trains the policy …
    assert lfn.grad.tolist() == pytest.approx([-2 * r for r in res])     # … and both flows


def test_dag_kl_loss_by_hand():
    lf = torch.tensor([1.0, -0.5, 0.3], requires_grad=True)
    lpf = torch.tensor([-0.2, -0.3, -0.1], requires_grad=True)
    lpb = torch.tensor([-0.1, -0.4, -0.2])
    lfn = torch.tensor([0.4, 0.2, 0.9])
    lold = torch.tensor([-0.2, -0.3000001, -0.1])
    klpf = 0.7
    loss, parts = G.dag_kl_loss(lf, lpf, lpb, lfn, lold, klpf=klpf, clip_range=1e-4, adv_clip=5.0)
    lf_, lpf_, lpb_, lfn_, lold_ = ([float(v) for v in t] for t in (lf.detach(), lpf.detach(), lpb, lfn, lold))
    delta = [lfn_[i] + lpb_[i] - lpf_[i] - lf_[i] for i in range(3)]
    base = [(sum(delta) - d) / 2 for d in delta]
    sq = [(d - b) ** 2 for d, b in zip(delta, base)]
    var = [(sum(sq) - s) / 2 for s in sq]
    adv = [max(-5, min(5, (d - b) / (math.sqrt(q) + 1e-8))) for d, b, q in zip(delta, base, var)]
    expected = []
    for i in range(3):
        rho = math.exp(lpf_[i] - lold_[i])
        surrogate = max(-adv[i] * rho, -adv[i] * min(max(rho, 1 - 1e-4), 1 + 1e-4))
        flow = (lf_[i] + lpf_[i] - lpb_[i] - lfn_[i]) ** 2
        expected.append(flow + klpf * surrogate)
    assert loss.tolist() == pytest.approx(expected, rel=1e-5)
    loss.sum().backward()
    # the flow term's log p_F is detached: the policy gradient is klpf·(−A·ρ) only
    for i in range(3):
        rho = math.exp(lpf_[i] - lold_[i])
        assert lpf.grad[i].item() == pytest.approx(klpf * -adv[i] * rho, rel=1e-4)


def test_clipped_surrogate_clips_outside_the_trust_region():
    adv = torch.tensor([1.0, -1.0])
    lpf = torch.tensor([0.01, 0.01], requires_grad=True)  # ρ = e^0.01 > 1 + 1e-4
    loss = G.clipped_surrogate(adv, lpf, torch.zeros(2), clip_range=1e-4)
    rho = math.exp(0.01)
    # A > 0: max(−ρ, −(1+ε)) = −(1+ε) (clipped, no gradient); A < 0: max(ρ, 1+ε) = ρ
    assert loss.tolist() == pytest.approx([-(1 + 1e-4), rho], rel=1e-6)
    loss.sum().backward()
    assert lpf.grad.tolist() == pytest.approx([0.0, rho], rel=1e-5)


def test_ddpo_advantages_and_loss_by_hand():
    r = [0.5, 1.5, 2.5, 0.0]
    m = sum(r) / 4
    sd = math.sqrt(sum((x - m) ** 2 for x in r) / 4)
    adv = G.standardised_advantages(torch.tensor(r))
    assert adv.tolist() == pytest.approx([(x - m) / (sd + 1e-8) for x in r], rel=1e-6)
    loss = G.ddpo_loss(adv, torch.zeros(4), torch.zeros(4))
    assert loss.tolist() == pytest.approx([-(x - m) / (sd + 1e-8) for x in r], rel=1e-6)


def test_proximal_term_and_beta_anneal():
    a = torch.tensor([[[[1.0, 2.0]]], [[[0.0, -1.0]]]])
    b = torch.tensor([[[[0.5, 2.0]]], [[[1.0, 1.0]]]])
    assert G.proximal_term(a, b).tolist() == pytest.approx([0.125, 2.5])
    assert G.reward_temperature(0, 10, 100.0) == 0.0
    assert G.reward_temperature(2, 10, 100.0) == pytest.approx(40.0)
    assert G.reward_temperature(7, 10, 100.0) == 100.0
    assert G.reward_temperature(0, 10, 100.0, "none") == 100.0


# ------------------------------------------------------------------------------------------ MaPO / DPO / SFT
def test_bounded_link_matches_formula_and_is_stable():
    for loss in (1e-9, 0.01, 0.2, 3.0, 80.0):
        x = 0.5 * loss
        expected = x / (math.exp(x) - 1) if x > 1e-7 else 1 - x / 2
        assert M.bounded_link(torch.tensor([loss], dtype=torch.float64)).item() == pytest.approx(expected, rel=1e-9)
    assert M.bounded_link(torch.tensor([0.0])).item() == 1.0


def test_mapo_loss_by_hand():
    lw, ll = [0.1, 0.3], [0.2, 0.25]
    beta, T, s = 0.1, 1000, 0.5
    g = lambda v: s * v / math.expm1(s * v)  # noqa: E731
    expected = sum(lw) / 2 - beta * sum(logsig(T * (g(w) - g(l))) for w, l in zip(lw, ll)) / 2
    loss, _ = M.mapo_loss(torch.tensor(lw, dtype=torch.float64), torch.tensor(ll, dtype=torch.float64), beta, T, s)
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_dpo_and_sft_losses_by_hand():
    lw, ll, rw, rl = [0.1, 0.3], [0.2, 0.25], [0.12, 0.28], [0.21, 0.24]
    b = 5000.0
    expected = -sum(logsig(-0.5 * b * ((w - l) - (a - c))) for w, l, a, c in zip(lw, ll, rw, rl)) / 2
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    loss, metrics = M.dpo_loss(t(lw), t(ll), t(rw), t(rl), beta_dpo=b)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert M.sft_loss(t(lw))[0].item() == pytest.approx(0.2)


def test_denoising_losses_eps_v_and_flow_targets():
    x0 = torch.tensor([[[[0.5]]], [[[-1.0]]]])
    noise = torch.tensor([[[[1.0]]], [[[0.5]]]])
    sigma = torch.tensor([2.0, 0.5])
    denoised = torch.tensor([[[[0.4]]], [[[-0.8]]]])
    got = M.denoising_losses(denoised, x0, noise, sigma, "eps")
    exp = []
    for xv, nv, sv, dv in [(0.5, 1.0, 2.0, 0.4), (-1.0, 0.5, 0.5, -0.8)]:
        eps_hat = (xv + sv * nv - dv) / sv
        exp.append((eps_hat - nv) ** 2)
    assert got.tolist() == pytest.approx(exp, rel=1e-4)
    got_v = M.denoising_losses(denoised, x0, noise, sigma, "v_prediction")
    exp_v = []
    for xv, nv, sv, dv in [(0.5, 1.0, 2.0, 0.4), (-1.0, 0.5, 0.5, -0.8)]:
        a, s = 1 / math.sqrt(1 + sv * sv), sv / math.sqrt(1 + sv * sv)
        eps_hat = (xv + sv * nv - dv) / sv
        exp_v.append(((a * eps_hat - s * dv) - (a * nv - s * xv)) ** 2)
    assert got_v.tolist() == pytest.approx(exp_v, rel=1e-4)
    # flow (CONST): velocity (x_f − x̂0)/t vs ε − x0 at x_f = x_t/(1+σ), t = σ/(1+σ), i.e. (x0 − x̂0)²/t²
    got_f = M.denoising_losses(denoised, x0, noise, sigma, "const")
    exp_f = [((xv - dv) * (1 + sv) / sv) ** 2 for xv, sv, dv in [(0.5, 2.0, 0.4), (-1.0, 0.5, -0.8)]]
    assert got_f.tolist() == pytest.approx(exp_f, rel=1e-4)
    with pytest.raises(ValueError, match="EPS, V-prediction and flow"):
        M.denoising_losses(denoised, x0, noise, sigma, "x0")
    assert M.check_method("Diffusion-DPO") == "dpo" and M.check_method("MaPO") == "mapo"
    with pytest.raises(ValueError, match="MaPO, DPO, SFT"):
        M.check_method("orpo")


def test_ddpm_training_sigmas_match_sd_schedule():
    sig = M.ddpm_training_sigmas(1000)
    assert sig.numel() == 1000 and bool((sig[1:] > sig[:-1]).all())
    assert sig[0].item() == pytest.approx(math.sqrt(0.00085 / (1 - 0.00085)), rel=1e-6)
    assert sig[-1].item() == pytest.approx(14.6146, rel=1e-3)  # SD1.5's σ_max


# ------------------------------------------------------------------------------------------ rewards
def test_jpeg_rewards_match_pil_sizes_and_signs():
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    noisy = torch.rand(1, 16, 16, 3, generator=g)
    flat = torch.full((1, 16, 16, 3), 0.5)
    images = torch.cat([noisy, flat])
    sizes = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray((im * 255).round().clamp(0, 255).to(torch.uint8).numpy()).save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell() / 1000)
    assert W.jpeg_sizes_kb(images).tolist() == pytest.approx(sizes)
    comp = W.jpeg_judge("compressibility").fn(images)
    incomp = W.jpeg_judge("incompressibility").fn(images)
    assert comp.tolist() == pytest.approx([-s for s in sizes]) and incomp.tolist() == pytest.approx(sizes)
    assert incomp[0] > incomp[1]  # noise is less compressible than a flat image
    with pytest.raises(ValueError, match="compressibility"):
        W.jpeg_judge("smallness")


def test_reward_function_sums_weighted_judges_and_checks_decoder():
    decode = lambda x: x.permute(0, 2, 3, 1).repeat(1, 1, 1, 3)  # noqa: E731
    bright = W.brightness_judge(weight=2.0)
    latent = W.DiscriminativeExpert(lambda x: x.flatten(1).sum(1), weight=0.5, name="sum")
    fn = W.reward_function([bright, latent], decode)
    x = torch.tensor([[[[0.2, 0.4]]], [[[1.5, -0.5]]]])
    # pixels are clamped to [0, 1] for pixel judges: [0.2, 0.4] -> 0.3; [1, 0] -> 0.5
    assert fn(x).tolist() == pytest.approx([2 * 0.3 + 0.5 * 0.6, 2 * 0.5 + 0.5 * 1.0], rel=1e-5)
    with pytest.raises(ValueError, match="no decoder"):
        W.reward_function([bright])
