"""SELMA skill LoRA trainer (selma/trainer.py) on the shipped digits UNet: the plain denoising loss falls,
the base model is untouched, micro-batching equals one big batch, an interrupted run resumes exactly, and
the saved LoRA is read back by comfy_poe.lora with the exact ΔW."""
import math

import pytest
import torch

from comfy_poe import digits
from comfy_poe.lora import atomic_write_safetensors, load_lora_file, parse_state_dict
from comfy_poe.selma.dataset import DatasetError, SkillDataset
from comfy_poe.selma.trainer import (
    PRESETS, SkillTrainConfig, batch_indices, default_collate, denoising_loss, encode_pairs, preset_config, probe_loss,
    train_skill_lora,
)
from comfy_poe.training import TrainingInterrupted

# Training noise levels: log-uniform over the range where the class identity is decided (at tiny σ the
# ε-loss is reconstruction noise, at huge σ it is ~0 for every model).
SIGMAS = torch.exp(torch.linspace(math.log(0.2), math.log(10.0), 200))


def encode_image(pixels):          # (1, 8, 8, 3) in [0, 1]  ->  digits latent (1, 1, 8, 8) in [-1, 1]
    return pixels.mean(-1)[:, None] * 2 - 1


def encode_prompt(caption):        # the skill LoRA is trained on the unconditional (null-class) model
    return torch.tensor([digits.NULL_CLASS])


@pytest.fixture(scope="module")
def denoiser():
    den = digits.load_denoiser(with_classifier=False)
    den.network.requires_grad_(False)
    return den


@pytest.fixture(scope="module")
def threes(tmp_path_factory):
    """A skill dataset folder of 24 real training-split 3s (captions all 'a handwritten 3')."""
    root = tmp_path_factory.mktemp("selma") / "threes"
    ds = SkillDataset(root)
    for i, x in enumerate(digits.real_digits("train", classes=[3])[:24]):
        ds.append("a handwritten 3", i, i, digits.model_to_unit(x)[0][..., None].expand(8, 8, 3), True)
    return root


def denoise_of(den):
    return lambda x, sigma, cond: den.denoise(x, sigma, [cond])[0]


def run(den, root, **kw):
    config = SkillTrainConfig(**{"rank": 4, "alpha": 4.0, "lr": 3e-3, "steps": 40, "batch_size": 8,
                                 "micro_batch": 8, "eval_samples": 96, **kw})
    return train_skill_lora(root, den.network, denoise_of(den), encode_prompt, encode_image, config=config,
                            sigmas=SIGMAS)


def test_presets_follow_the_paper_and_scale_down():
    ref = PRESETS["reference"]
    assert (ref.rank, ref.alpha, ref.lr, ref.steps, ref.batch_size, ref.targets) == (128, 128.0, 3e-4, 5000, 64,
                                                                                      "attention")
    small, tiny = PRESETS["small"], PRESETS["tiny"]
    assert ref.rank > small.rank > tiny.rank and ref.batch_size > small.batch_size > tiny.batch_size
    assert preset_config("tiny", lr=5e-5, steps=None).lr == 5e-5 and preset_config("tiny").steps == tiny.steps
    with pytest.raises(ValueError, match="preset"):
        preset_config("huge")


def test_training_lowers_the_denoising_loss_and_leaves_the_base_model_alone(denoiser, threes, tmp_path):
    torch.manual_seed(0)
    base = {k: v.clone() for k, v in denoiser.network.state_dict().items()}
    result = run(denoiser, threes)
    net = result.network
    try:
        assert result.pairs == 24 and result.captions == 1 and result.steps_done == 40
        # On fixed probes (same pairs, σ and ε before and after) the LoRA'd unconditional model closes more
        # than half of the gap to the class-3 conditional model, the exact "skill" it is taught.
        data = encode_pairs(SkillDataset(threes, create=False).pairs(), encode_prompt, encode_image)
        net.scale = 0.0
        conditional = probe_loss(lambda x, s, c: denoiser.denoise(x, s, [3])[0], data, SIGMAS, 96, 0, "eps",
                                 default_collate, "cpu", 8)
        net.scale = 1.0
        assert conditional < result.loss_before - 0.01
        assert result.loss_after < result.loss_before - 0.5 * (result.loss_before - conditional), result.summary()
        first = sum(r["loss"] for r in result.history[:8]) / 8
        last = sum(r["loss"] for r in result.history[-8:]) / 8
        assert last < first
        for k, v in denoiser.network.state_dict().items():
            assert torch.equal(v, base[k]), f"base weight {k} changed"
        assert all(p.grad is None for p in denoiser.network.parameters())

        # the exported LoRA file is read by comfy_poe.lora with the exact ΔW of every adapter
        path = atomic_write_safetensors(tmp_path / "three.safetensors", net.export_state_dict("diffusion_model."))
        parsed = parse_state_dict(load_lora_file(path).tensors)
        assert not parsed.skipped and len(parsed.modules) == len(net.paths) > 0
        for p, adapter in net.items():
            module = parsed.modules[f"unet:{p.replace('.', '_')}"]
            assert torch.allclose(module.delta().reshape(adapter.weight_shape), adapter.delta(), atol=1e-6)
        # the LoRA changes the unconditional model's prediction; scale 0 gives the base model back exactly
        x, sigma = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.full((4,), 2.0)
        with torch.no_grad():
            tuned = denoiser.denoise(x, sigma, [None])[0]
            net.scale = 0.0
            plain = denoiser.denoise(x, sigma, [None])[0]
            net.detach()
            detached = denoiser.denoise(x, sigma, [None])[0]
        assert torch.equal(plain, detached) and (tuned - plain).abs().max() > 1e-3
    finally:
        net.detach()


def test_micro_batches_accumulate_to_the_full_batch_gradient(denoiser, threes):
    a = run(denoiser, threes, steps=1, batch_size=4, micro_batch=4, eval_samples=0)
    a.network.detach()
    b = run(denoiser, threes, steps=1, batch_size=4, micro_batch=1, eval_samples=0)
    b.network.detach()
    assert a.history[0]["loss"] == pytest.approx(b.history[0]["loss"], rel=1e-5)
    # the norm of the accumulated gradient (taken before clipping) equals the one-batch gradient's
    assert a.history[0]["grad_norm"] == pytest.approx(b.history[0]["grad_norm"], rel=1e-4)
    # Adam's first step is ±lr wherever |g| >> eps; only entries with g ≈ 0 may differ
    ups_a = torch.cat([x.up.flatten() for x in a.network.adapters])
    ups_b = torch.cat([x.up.flatten() for x in b.network.adapters])
    assert ((ups_a - ups_b).abs() < 1e-7).float().mean() > 0.99


def test_batches_cover_each_pair_once_per_epoch_and_depend_only_on_seed_and_step():
    picks = torch.cat([batch_indices(10, 3, step, 5) for step in (1, 2)])
    assert sorted(picks.tolist()) == list(range(10))
    assert torch.equal(batch_indices(10, 3, 7, 4), batch_indices(10, 3, 7, 4))
    assert not torch.equal(torch.cat([batch_indices(10, 3, s, 5) for s in (1, 2)]),
                           torch.cat([batch_indices(10, 4, s, 5) for s in (1, 2)]))


def test_an_interrupted_run_resumes_to_the_same_lora(denoiser, threes, tmp_path):
    kw = dict(steps=6, batch_size=2, micro_batch=2, checkpoint_every=2, eval_samples=0, rank=2, alpha=2.0)
    full = run(denoiser, threes, **kw)
    full.network.detach()

    done = []

    def stop_before_step_5():   # also called while the pairs are encoded: count finished steps instead
        if done and done[-1] == 4:
            raise TrainingInterrupted("stop")

    config = SkillTrainConfig(**{"lr": 3e-3, **kw})
    args = (threes, denoiser.network, denoise_of(denoiser), encode_prompt, encode_image)
    with pytest.raises(TrainingInterrupted):
        train_skill_lora(*args, config=config, sigmas=SIGMAS, run_dir=tmp_path / "run", interrupt=stop_before_step_5,
                         progress=lambda step, total, record: done.append(step))
    # the interrupted run took its LoRA off the model again
    assert all(not m._forward_hooks for m in denoiser.network.modules())
    resumed = train_skill_lora(*args, config=config, sigmas=SIGMAS, run_dir=tmp_path / "run")
    resumed.network.detach()
    assert resumed.resumed_from == 4
    for (_, x), (_, y) in zip(full.network.items(), resumed.network.items()):
        assert torch.equal(x.up, y.up) and torch.equal(x.down, y.down)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]


def test_bad_datasets_are_refused_with_the_reason(denoiser, tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        run(denoiser, tmp_path / "missing")
    SkillDataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="no accepted images"):
        run(denoiser, tmp_path / "empty")
    mixed = SkillDataset(tmp_path / "mixed")
    mixed.append("a", 0, 0, torch.zeros(8, 8, 3), True)
    mixed.append("b", 0, 1, torch.zeros(16, 16, 3), True)
    with pytest.raises(DatasetError, match="same size"):
        run(denoiser, tmp_path / "mixed")
    with pytest.raises(ValueError, match="sigmas"):
        train_skill_lora([], None, None, encode_prompt, encode_image, sigmas=torch.zeros(3))


def test_flow_parameterization_targets_the_velocity():
    x0, noise, sigma = torch.randn(3, 2), torch.randn(3, 2), torch.tensor([0.2, 0.5, 0.9])
    exact = lambda x, s, c: x0                                        # noqa: E731  the perfect denoiser
    assert denoising_loss(exact, x0, None, sigma, noise, "eps") < 1e-10
    assert denoising_loss(exact, x0, None, sigma, noise, "const") < 1e-10
    assert denoising_loss(lambda x, s, c: torch.zeros_like(x), x0, None, sigma, noise, "eps") > 0.1
