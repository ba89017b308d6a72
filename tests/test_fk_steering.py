"""FK steering preset: the resampling schedule by step index, λ, potentials and the terminal correction."""
import math

import pytest
import torch

from comfy_poe.experts import LATENT, DiscriminativeExpert
from comfy_poe.samplers.fk_steering import (
    FKSteering, fk_steering_options, resampling_steps, sample_fk_steering, scaled_judges,
)
from comfy_poe.samplers.smc import SMCReport, sample_poe_smc


def gaussian_denoiser(x, sigma, **kw):
    """Exact denoiser of N(0, 1) data in VE coordinates: E[x0 | x] = x / (1 + σ²)."""
    return x / (1 + sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2)


def reward(scale=1.0, calls=None):
    def fn(x0):
        if calls is not None:
            calls.append(x0.shape[0])
        return scale * x0.flatten(1).sum(1)

    return DiscriminativeExpert(fn, weight=1.0, space=LATENT, differentiable=True, name="r")


def test_published_schedule_and_options():
    assert resampling_steps(100) == [20, 40, 60, 80]
    assert resampling_steps(50) == [20, 40]
    assert resampling_steps(100, interval=10, start=0, end=30) == [0, 10, 20, 30]
    config = FKSteering()
    assert (config.particles, config.interval, config.start, config.end, config.potential) == (4, 20, 20, 80, "max")
    options = fk_steering_options(config)
    assert options["weighting"] == "max" and options["final_correction"] and options["mcmc_steps"] == 0
    assert options["resample_at"](100) == [20, 40, 60, 80]
    assert fk_steering_options(FKSteering(potential="diff"))["weighting"] == "incremental"
    assert [j.weight for j in scaled_judges([reward(), reward()], 2.5)] == [2.5, 2.5]
    for bad in (dict(potential="min"), dict(interval=0), dict(start=50, end=40), dict(lmbda=0.0)):
        with pytest.raises(ValueError):
            FKSteering(**bad)


def test_resamples_and_scores_only_at_the_scheduled_steps():
    calls = []
    report = SMCReport()
    sigmas = torch.linspace(20, 0, 101)
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 20
    out = sample_fk_steering(gaussian_denoiser, x, sigmas, judges=[reward(calls=calls)], seed=0, report=report)
    assert out.shape == (2, 1, 2, 2)
    assert [i for i, r in enumerate(report.resampled) if r] == [20, 40, 60, 80]
    assert report.judge_evals == 4 * 2 * 5 and sum(calls) == 4 * 2 * 5, "4 resampling steps + the final level"
    assert report.options["resample_at"] == [20, 40, 60, 80] and report.options["final_correction"]


def test_schedule_outside_the_steps_is_refused():
    with pytest.raises(ValueError, match="resample_at"):
        sample_poe_smc(gaussian_denoiser, torch.randn(1, 1, 1, 1), torch.linspace(5, 0, 11), particles=2,
                       judges=[reward()], resample_at=[3, 12])


SIGMAS = torch.cat([torch.logspace(math.log10(20), -2, 40), torch.zeros(1)])


def tilted_reference():
    """N(0, 1)·e^{x} through the same discretised sampler: importance weights e^{r(x0)} on the final
    samples only (no intermediate resampling), resampled once (mean ≈ the sampler's own variance, 0.8)."""
    out = sample_poe_smc(gaussian_denoiser, torch.zeros(1, 1, 1, 1), SIGMAS, particles=3000, judges=[reward()],
                         weighting="paper", resample_at=[], selection="resample", seed=1, tempering="constant",
                         step="ancestral")  # FK steering's base sampler (the default 2M step gives mean 0.98)
    return out.mean().item(), out.var().item()


@pytest.mark.parametrize("potential", ["max", "diff"])
def test_terminal_correction_targets_the_tilted_distribution(potential):
    """Reward r(x0) = x0, λ = 1: with the terminal correction the final weights target p(x)·e^{r(x)} whatever
    potential steered the three intermediate resamplings (measured spread over seeds: ±0.03)."""
    want_mean, want_var = tilted_reference()
    config = FKSteering(particles=3000, interval=10, start=10, end=30, potential=potential, lmbda=1.0,
                        resampling="systematic")
    out = sample_fk_steering(gaussian_denoiser, torch.zeros(1, 1, 1, 1), SIGMAS, judges=[reward()], config=config,
                             seed=1, selection="resample")
    mean, var = out.mean().item(), out.var().item()
    assert abs(mean - want_mean) < 0.1 and abs(var - want_var) < 0.15, (potential, mean, var, want_mean, want_var)


def test_without_the_correction_sum_over_tilts():
    """The same run without the terminal correction: the summed potentials count the reward 4 times."""
    config = FKSteering(particles=3000, interval=10, start=10, end=30, potential="sum", lmbda=1.0,
                        final_correction=False, resampling="systematic")
    out = sample_fk_steering(gaussian_denoiser, torch.zeros(1, 1, 1, 1), SIGMAS, judges=[reward()], config=config,
                             seed=1, selection="resample")
    assert out.mean().item() > 1.5


def test_default_options_keep_todays_behaviour():
    """resample_at=None and final_correction=False give bit-identical results to not passing them."""
    sigmas = torch.linspace(10, 0, 8)
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(3)) * 10
    kw = dict(particles=4, judges=[reward()], weighting="max", seed=5)
    a = sample_poe_smc(gaussian_denoiser, x, sigmas, **kw)
    b = sample_poe_smc(gaussian_denoiser, x, sigmas, resample_at=None, final_correction=False, **kw)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
