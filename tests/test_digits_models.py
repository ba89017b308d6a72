"""The embedded digits models: shipped weights, held-out accuracies, sample quality, batching, judges, FD."""
from __future__ import annotations

import math

import pytest
import torch

from comfy_poe import digits
from comfy_poe.digits import store
from comfy_poe.digits.data import load_split
from comfy_poe.experts import DiscriminativeExpert

SHIPPED = ("digits_unet", "digits_classifier", "digits_evaluator", "digits_mlp")


@pytest.fixture(scope="module")
def denoiser():
    return digits.load_denoiser()


@pytest.fixture(scope="module")
def classifier():
    return digits.load_classifier()


@pytest.fixture(scope="module")
def evaluator():
    return digits.load_evaluator()


# -- data ----------------------------------------------------------------------------------------------
def test_split_sizes_stratified_disjoint_and_scaled():
    train_x, train_y = load_split("train")
    test_x, test_y = load_split("test")
    assert train_x.shape == (1437, 1, 8, 8) and test_x.shape == (360, 1, 8, 8)
    assert train_x.dtype == torch.float32 and train_x.min() == -1.0 and train_x.max() == 1.0
    # stratified: every class has 35-37 test digits (class sizes 174..183 of 1,797 at a 20% split)
    counts = torch.bincount(test_y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    # a partition of the 1,797 digits: train and test together are exactly the full data set (as multisets)
    all_x, _ = load_split("all")
    together = torch.cat([train_x, test_x]).flatten(1)
    assert len(all_x) == 1797
    rows_a, counts_a = torch.unique(together, dim=0, return_counts=True)
    rows_b, counts_b = torch.unique(all_x.flatten(1), dim=0, return_counts=True)
    assert torch.equal(rows_a, rows_b) and torch.equal(counts_a, counts_b)
    threes = digits.real_digits("test", classes=[3])
    _, labels = digits.real_digits("train", classes={6, 8}, return_labels=True)
    assert len(threes) == int(counts[3]) and set(labels.tolist()) == {6, 8}
    with pytest.raises(ValueError, match="split"):
        load_split("validation")
    with pytest.raises(ValueError, match="classes"):
        digits.real_digits("test", classes=[12])


def test_validation_slice_comes_from_train_only():
    (fit_x, _), (val_x, _) = digits.train_validation_split(144, seed=3)
    train_x, _ = load_split("train")
    assert len(fit_x) + len(val_x) == len(train_x) == 1437
    # every validation image is one of the train images (row-wise match)
    flat_train = train_x.flatten(1)
    matches = (val_x.flatten(1)[:, None, :] == flat_train[None]).all(-1).any(-1)
    assert matches.all()


# -- shipped weights -------------------------------------------------------------------------------------
def test_shipped_weights_exist_are_small_and_documented():
    total = 0
    for name in SHIPPED:
        meta = digits.load_metadata(name)
        path = store.WEIGHTS_DIR / meta["weights_file"]
        assert path.is_file() and path.stat().st_size == meta["weights_bytes"]
        assert meta["training"]["split"].startswith("train") and "seed" in meta["training"]
        total += path.stat().st_size
    assert total < 6_000_000
    assert not list(store.WEIGHTS_DIR.glob("*.tmp"))


def test_evaluator_heldout_accuracy(evaluator):
    x, y = load_split("test")
    with torch.no_grad():
        accuracy = (evaluator.log_probs(x).argmax(1) == y).float().mean().item()
        feats = evaluator.features(x)
    assert accuracy >= 0.97
    assert feats.shape == (360, 64)


def test_classifier_heldout_accuracy_degrades_gracefully_with_sigma(classifier):
    x, y = load_split("test")
    g = torch.Generator().manual_seed(0)
    acc = {}
    with torch.no_grad():
        for sigma in (digits.SIGMA_MIN, 0.5, 2.0, 80.0):
            noisy = x + sigma * torch.randn(x.shape, generator=g)
            acc[sigma] = (classifier.log_probs(noisy, sigma).argmax(1) == y).float().mean().item()
    assert acc[digits.SIGMA_MIN] >= 0.97
    assert acc[0.5] >= 0.85
    assert 0.2 < acc[2.0] < acc[0.5]
    assert acc[80.0] < 0.25  # at σ = 80 the image carries ~no information: near the 10% prior
    with torch.no_grad():
        log_p = classifier.log_probs(x[:8], torch.full((8,), 80.0))
    assert torch.allclose(log_p.exp().sum(1), torch.ones(8), atol=1e-5)
    assert log_p.exp().max() < 0.5  # calibrated: no confident guesses from pure noise


# -- sampling ---------------------------------------------------------------------------------------------
def test_reference_sampler_is_deterministic(denoiser):
    a = digits.sample_reference(3, 16, seed=7, steps=10, denoiser=denoiser)
    b = digits.sample_reference(3, 16, seed=7, steps=10, denoiser=denoiser)
    c = digits.sample_reference(3, 16, seed=8, steps=10, denoiser=denoiser)
    assert a.shape == (16, 1, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1


def test_shipped_denoiser_loads_identically_twice():
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.1, 0.5, 2.0, 10.0])
    one = digits.load_denoiser(with_classifier=False)(x, sigma, 5)
    two = digits.load_denoiser(with_classifier=False)(x, sigma, 5)
    assert torch.equal(one, two)


def test_conditional_samples_are_the_requested_class(denoiser, evaluator):
    samples = digits.sample_reference(3, 50, seed=0, steps=20, denoiser=denoiser)
    with torch.no_grad():
        predicted = evaluator.log_probs(samples).argmax(1)
    assert (predicted == 3).float().mean().item() >= 0.85
    assert samples.min() > -1.6 and samples.max() < 1.6  # inside (a margin around) the data range


def test_attribute_expert_samples_land_in_the_set(denoiser, evaluator):
    samples = digits.sample_reference({6, 8}, 40, seed=1, steps=15, denoiser=denoiser)
    with torch.no_grad():
        predicted = evaluator.log_probs(samples).argmax(1)
    in_set = torch.isin(predicted, torch.tensor([6, 8]))
    assert in_set.float().mean().item() >= 0.85
    assert (predicted == 6).any() and (predicted == 8).any()  # a mixture, not a collapse onto one class


# -- denoiser interface ------------------------------------------------------------------------------------
def test_batched_denoise_equals_separate_calls(denoiser):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 1, 8, 8, generator=g) * 1.5
    sigma = torch.tensor([0.05, 0.3, 1.0, 3.0, 20.0])
    labels = torch.tensor([0, 1, 2, 10, 9])
    conds = [3, None, {6, 8}, labels, [4]]
    with torch.no_grad():
        batched = denoiser.denoise(x, sigma, conds)
        separate = [denoiser.denoise(x, sigma, [c])[0] for c in conds]
    assert len(batched) == len(conds)
    for b, s in zip(batched, separate):
        assert b.shape == x.shape
        assert torch.allclose(b, s, atol=1e-5, rtol=1e-5)
    assert torch.allclose(batched[4], denoiser(x, sigma, 4), atol=1e-6)  # one-element set = the class
    assert denoiser.parameterization == "eps"


def test_shared_classes_are_evaluated_once(denoiser):
    """Set experts that share classes (even, ≥5, all ten classes) need each class once: 10 UNet rows per sample, not 20."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 1, 8, 8, generator=g)
    sigma = torch.tensor([0.2, 1.0, 5.0])
    conds = [{0, 2, 4, 6, 8}, {5, 6, 7, 8, 9}, set(range(10)), 6, None]
    with torch.no_grad():
        before = denoiser.n_evals
        shared = denoiser.denoise(x, sigma, conds)
        rows = denoiser.n_evals - before
        separate = [denoiser.denoise(x, sigma, [c])[0] for c in conds]
    assert rows == 11 * x.shape[0]  # classes 0..9 once, plus the null class
    for a, b in zip(shared, separate):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_attribute_expert_is_the_classifier_weighted_mixture(denoiser, classifier):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1, 8, 8, generator=g)
    sigma = torch.full((6,), 0.8)
    classes = [1, 4, 7]
    with torch.no_grad():
        mixture = denoiser(x, sigma, set(classes))
        per_class = torch.stack([denoiser(x, sigma, c) for c in classes])  # (3, N, 1, 8, 8)
        w = classifier.log_probs(x, sigma)[:, classes].softmax(1)  # p(c | x_σ, S)
    expected = (w.T[:, :, None, None, None] * per_class).sum(0)
    assert torch.allclose(mixture, expected, atol=1e-5)
    # the mixture lies strictly between its components where the weights are mixed
    assert not torch.allclose(mixture, per_class[0], atol=1e-3)


def test_denoiser_errors_are_clear():
    bare = digits.load_denoiser(with_classifier=False)
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="classifier"):
        bare(x, 1.0, {3, 5})
    with pytest.raises(ValueError, match="0..9"):
        bare(x, 1.0, 10)
    with pytest.raises(TypeError, match="ints"):
        bare(x, 1.0, True)
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        bare(torch.zeros(2, 64), 1.0, 3)
    with pytest.raises(ValueError, match="sigma"):
        bare(x, torch.tensor([1.0, 0.0]), 3)


def test_denoiser_at_tiny_sigma_returns_its_input(denoiser):
    x, _ = load_split("test")
    with torch.no_grad():
        d = denoiser(x[:8], torch.full((8,), digits.SIGMA_MIN), 5)
    # c_skip → 1 and c_out → 0 as σ → 0 (EDM preconditioning)
    assert (d - x[:8]).abs().max() < 0.01


@pytest.mark.parametrize("model", ["unet", "mlp"])
def test_denoiser_denoises_real_digits_better_with_the_right_label(model):
    denoiser = digits.load_denoiser(model=model, with_classifier=False)
    x, y = load_split("test")
    x, y = x[:64], y[:64]
    g = torch.Generator().manual_seed(4)
    sigma = torch.full((64,), 2.0)
    noisy = x + 2.0 * torch.randn(x.shape, generator=g)
    with torch.no_grad():
        right = (denoiser(noisy, sigma, y) - x).pow(2).mean().item()
        wrong = (denoiser(noisy, sigma, (y + 5) % 10) - x).pow(2).mean().item()
        uncond = (denoiser(noisy, sigma, None) - x).pow(2).mean().item()
    assert right < uncond < wrong
    assert right < 0.5 * noisy.sub(x).pow(2).mean().item()


# -- judge ---------------------------------------------------------------------------------------------
def test_classifier_judge_is_a_differentiable_log_probability(classifier):
    judge = digits.classifier_judge({6, 8}, weight=2.0, classifier=classifier)
    assert isinstance(judge, DiscriminativeExpert) and judge.differentiable and judge.weight == 2.0
    x, y = load_split("test")
    x0 = x[:32].clone().requires_grad_(True)
    r = judge.fn(x0)
    assert r.shape == (32,) and (r <= 1e-6).all()
    in_set = torch.isin(y[:32], torch.tensor([6, 8]))
    assert r[in_set].min() > r[~in_set].max()  # held-out real digits separate cleanly
    r.sum().backward()
    assert x0.grad is not None and x0.grad.abs().sum() > 0
    everything = digits.classifier_judge(range(10), classifier=classifier).fn(x[:8])
    assert torch.allclose(everything, torch.zeros(8), atol=1e-5)  # log Σ_all p = 0
    with pytest.raises(ValueError, match="classes"):
        digits.classifier_judge([11], classifier=classifier)


# -- Fréchet distance ---------------------------------------------------------------------------------
def test_frechet_distance_matches_closed_forms():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    assert digits.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = torch.arange(6, dtype=torch.float64)
    assert digits.frechet_distance(a, a + shift) == pytest.approx(float(shift.pow(2).sum()), rel=1e-6)
    # Σ vs 4Σ, same mean: tr Σ + 4 tr Σ − 2 tr (4Σ²)^{1/2} = tr Σ
    centred = a - a.mean(0)
    trace = torch.cov(centred.T).trace().item()
    assert digits.frechet_distance(centred, 2 * centred) == pytest.approx(trace, rel=1e-6)
    with pytest.raises(ValueError, match="same D"):
        digits.frechet_distance(a, a[:, :3])


def test_frechet_distance_between_real_splits(evaluator):
    with torch.no_grad():
        train = evaluator.features(load_split("train")[0])
        test = evaluator.features(load_split("test")[0])
    fd = digits.frechet_distance(train, test)
    assert math.isfinite(fd) and fd > 0
    assert digits.frechet_distance(test, test) == pytest.approx(0.0, abs=1e-4)
    # a different class mix is much further away than the other split of the same data
    ones = evaluator.features(digits.real_digits("test", classes=[1]))
    assert digits.frechet_distance(ones, test) > 5 * fd


# -- files ---------------------------------------------------------------------------------------------------
def test_training_writes_loadable_files_atomically(tmp_path):
    from comfy_poe.digits.train import train_evaluator

    torch.manual_seed(0)
    train_evaluator(tmp_path, steps=20, log=lambda *_: None)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["digits_evaluator.json", "digits_evaluator.safetensors"]
    loaded = digits.load_evaluator(folder=tmp_path)
    again = digits.load_evaluator(folder=tmp_path)
    x = load_split("test")[0][:16]
    with torch.no_grad():
        assert torch.equal(loaded.log_probs(x), again.log_probs(x))
    meta = digits.load_metadata("digits_evaluator", folder=tmp_path)
    assert 0.0 <= meta["heldout_accuracy"] <= 1.0 and meta["training"]["seed"] == 2
    with pytest.raises(ValueError, match="plain file name"):
        store.save_model(loaded, "../escape", {}, tmp_path)
    with pytest.raises(FileNotFoundError, match="train"):
        digits.load_classifier(folder=tmp_path)
