"""Alignment trainers on the shipped digits MLP denoiser (CPU, fixed seeds, one thread): brightness reward rises
under DAG-KL, DAG-DB and DDPO; MaPO and Diffusion-DPO raise the chosen-vs-rejected margin on bright-vs-dark digit
pairs; DPO holds one more model copy than MaPO (live tensor bytes); interrupt + resume == uninterrupted (LoRA and
flow network); the preference folder format round-trips and reports bad pairs; joint augmentation; judge pairs."""
import pytest
import torch

from comfy_poe import digits
from comfy_poe.training import CheckpointStore, LoopConfig, LoRAConfig, TrainingInterrupted, create_lora
from comfy_poe.training.alignment import (
    PreferenceConfig, PreferenceTrainer, RewardRolloutTrainer, RolloutConfig, frozen_copy, live_tensor_bytes,
)
from comfy_poe.training.mapo import ddpm_training_sigmas
from comfy_poe.training.preference import (
    PreferencePairs, joint_augment, load_preference_folder, pairs_from_scores, save_preference_folder,
)
from comfy_poe.training.rewards import brightness_judge, reward_function
from comfy_poe.training.rollout import Policy

MLP_TARGETS = r"^mlp\.\d+$"



def decode(x):
    return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).repeat(1, 1, 1, 3)


def encode(images):
    return images[..., :1].permute(0, 3, 1, 2) * 2 - 1


def fresh_model():
    den = digits.load_denoiser(with_classifier=False, model="mlp")
    lora = create_lora(den.network, LoRAConfig(rank=4, alpha=4, targets=MLP_TARGETS), seed=0).attach(den.network)
    return den, lora


def rollout_trainer(method, steps, seed=0, checkpoint_every=0):
    den, lora = fresh_model()
    policy = Policy(den, digits.karras_sigmas(10), (1, 8, 8))
    config = RolloutConfig(method=method, loop=LoopConfig(steps=steps, lr=3e-3, weight_decay=1e-4, seed=seed,
                                                          checkpoint_every=checkpoint_every),
                           batch_size=8, timestep_fraction=0.5)
    return RewardRolloutTrainer(policy, [None], reward_function([brightness_judge()], decode), lora, config), den


@pytest.mark.parametrize("method,margin", [("dag-kl", 0.01), ("dag-db", 0.01), ("ddpo", 0.02)])
def test_brightness_reward_rises(method, margin):
    trainer, den = rollout_trainer(method, steps=20)
    base = {k: v.clone() for k, v in den.network.state_dict().items()}
    before = trainer.sample(None, 64, seed=123).rewards.mean().item()
    result = trainer.train()
    after = trainer.sample(None, 64, seed=123).rewards.mean().item()
    # measured (seed 0, 1 thread): DAG-KL 0.302 → 0.329, DAG-DB 0.302 → 0.321, DDPO 0.302 → 0.352
    assert after > before + margin, (method, before, after)
    assert all(torch.equal(base[k], v) for k, v in den.network.state_dict().items())  # only the LoRA trained
    assert result.history[-1]["trajectories"] == 160
    assert result.history[0]["beta"] == 0.0 and result.history[-1]["beta"] == 100.0  # linear anneal over half


def test_rollout_interrupt_and_resume_equals_uninterrupted(tmp_path):
    full, _ = rollout_trainer("dag-kl", steps=4, checkpoint_every=1)
    full_result = full.train(checkpoints=CheckpointStore(tmp_path / "full"))
    part, _ = rollout_trainer("dag-kl", steps=4, checkpoint_every=1)

    def stop_at_3(step):
        if step == 3:
            raise TrainingInterrupted("stop")

    with pytest.raises(TrainingInterrupted):
        part.train(checkpoints=CheckpointStore(tmp_path / "part"), should_stop=stop_at_3)
    resumed, _ = rollout_trainer("dag-kl", steps=4, checkpoint_every=1)
    result = resumed.train(checkpoints=CheckpointStore(tmp_path / "part"))
    assert result.resumed_from == 2
    assert [r["loss"] for r in result.history] == [r["loss"] for r in full_result.history]
    for a, b in zip(full.trainable.named_lora_parameters().values(), resumed.trainable.named_lora_parameters().values()):
        assert torch.equal(a, b)
    assert any(n.startswith("aux.flow.") for n in resumed.trainable.named_lora_parameters())
    assert (tmp_path / "part" / "lora.safetensors").is_file()
    # the LoRA file holds only the LoRA (no flow network)
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "part" / "lora.safetensors")).keys()
    assert keys and all("lora_" in k or k.endswith(".alpha") for k in keys)


def test_rollout_config_errors():
    den, lora = fresh_model()
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        RewardRolloutTrainer(Policy(den, digits.karras_sigmas(4), (1, 8, 8)), [None], lambda x: x.mean((1, 2, 3)),
                             lora, RolloutConfig(method="dag-kl", batch_size=1))
    with pytest.raises(ValueError, match="DAG-KL, DAG-DB, DDPO"):
        RolloutConfig(method="ppo").validate()

    class Flow:
        parameterization = "const"

        def denoise(self, x, sigma, conds):
            return [x for _ in conds]

    with pytest.raises(ValueError, match="flow"):
        Policy(Flow(), [1.0, 0.5], (1, 8, 8))


# ------------------------------------------------------------------------------------------ preferences
def bright_dark_pairs(per_class=6):
    x, y = digits.load_split("train")
    unit = (x + 1) / 2
    brightness = unit.flatten(1).mean(1)
    prompts, chosen, rejected = [], [], []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        order = idx[brightness[idx].argsort(descending=True)]
        for a, b in zip(order[:per_class], order[-per_class:]):
            prompts.append(str(c))
            chosen.append(unit[a])
            rejected.append(unit[b])
    as_image = lambda t: torch.stack(t).permute(0, 2, 3, 1).repeat(1, 1, 1, 3)  # noqa: E731
    return PreferencePairs(prompts, as_image(chosen), as_image(rejected))


def preference_trainer(method, steps=30):
    den, lora = fresh_model()
    ref = frozen_copy(den, lora, den.network) if method == "dpo" else None
    config = PreferenceConfig(method=method, loop=LoopConfig(steps=steps, lr=1e-3, weight_decay=1e-2, seed=0),
                              batch_size=8, flip=False)
    return PreferenceTrainer(den, bright_dark_pairs(), encode, lambda p: int(p), lora, config,
                             ddpm_training_sigmas(1000), reference=ref), den


@pytest.mark.parametrize("method", ["mapo", "dpo"])
def test_preference_margin_rises(method):
    trainer, _ = preference_trainer(method)
    before = trainer.margin(draws=2)
    trainer.train()
    after = trainer.margin(draws=2)
    # measured: MaPO −0.0053 → +0.0078, DPO −0.0053 → +0.0073 (mean L_rejected − L_chosen)
    assert after > before + 0.008, (method, before, after)


def test_dpo_holds_one_more_model_copy_than_mapo():
    model_bytes = sum(p.numel() * p.element_size()
                      for p in digits.load_denoiser(with_classifier=False, model="mlp").network.parameters())
    held = {}
    for method in ("mapo", "dpo"):
        start = live_tensor_bytes()
        trainer, den = preference_trainer(method, steps=2)
        trainer.train()
        held[method] = live_tensor_bytes() - start - model_bytes  # minus the policy model itself
        del trainer, den
    # MaPO keeps the LoRA + its Adam moments only; DPO additionally a frozen copy of the model
    assert held["mapo"] < 0.1 * model_bytes, held
    assert abs((held["dpo"] - held["mapo"]) - model_bytes) < 0.05 * model_bytes, (held, model_bytes)


def test_dpo_without_reference_is_refused():
    den, lora = fresh_model()
    with pytest.raises(ValueError, match="frozen reference"):
        PreferenceTrainer(den, bright_dark_pairs(1), encode, int, lora, PreferenceConfig(method="DPO"),
                          ddpm_training_sigmas(1000))


def test_frozen_copy_is_the_model_without_lora():
    den, lora = fresh_model()
    with torch.no_grad():
        for a in lora.adapters:
            a.up.normal_()
    ref = frozen_copy(den, lora, den.network)
    x, sigma = torch.randn(4, 1, 8, 8), torch.full((4,), 0.7)
    with torch.no_grad():
        adapted = den(x, sigma, 3)
        lora.scale = 0.0
        base = den(x, sigma, 3)
        lora.scale = 1.0
        assert torch.allclose(ref(x, sigma, 3), base) and not torch.allclose(adapted, base)
        assert torch.equal(den(x, sigma, 3), adapted)  # the LoRA is back on the policy


def test_preference_folder_round_trip_and_errors(tmp_path):
    pairs = bright_dark_pairs(1).subset([0, 1, 2])
    save_preference_folder(pairs, tmp_path / "set")
    loaded = load_preference_folder(tmp_path / "set")
    assert loaded.prompts == pairs.prompts and loaded.names == pairs.names
    assert torch.allclose(loaded.chosen, pairs.chosen, atol=1 / 255) and torch.allclose(loaded.rejected, pairs.rejected, atol=1 / 255)
    assert load_preference_folder(tmp_path / "set", size=4).chosen.shape == (3, 4, 4, 3)
    assert not list((tmp_path / "set").rglob("*.tmp"))
    (tmp_path / "set" / pairs.names[1] / "rejected.png").unlink()
    (tmp_path / "set" / pairs.names[2] / "prompt.txt").write_text("  ")
    with pytest.raises(ValueError, match=r"2 invalid pair.*pair_00001.*rejected.*pair_00002.*empty"):
        load_preference_folder(tmp_path / "set")
    with pytest.raises(ValueError, match="does not exist"):
        load_preference_folder(tmp_path / "missing")


def test_joint_augmentation_applies_the_same_crop_and_flip():
    g = torch.Generator().manual_seed(0)
    chosen = torch.rand(6, 8, 8, 3, generator=g)
    rejected = chosen * 0.5
    c, r = joint_augment(chosen, rejected, (5, 5), torch.Generator().manual_seed(1))
    assert c.shape == (6, 5, 5, 3) and torch.allclose(r, c * 0.5)
    flips = 0
    for i in range(6):  # each crop is a window of the (possibly flipped) original
        found = [(t, l, f) for f in (False, True) for t in range(4) for l in range(4)
                 if torch.equal((chosen[i].flip(1) if f else chosen[i])[t:t + 5, l:l + 5], c[i])]
        assert found
        flips += found[0][2]
    assert 0 < flips < 6


def test_pairs_from_scores_keeps_best_vs_worst_per_group():
    images = torch.arange(6, dtype=torch.float32).reshape(6, 1, 1, 1).expand(6, 2, 2, 3)
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.3, 0.3])
    pairs = pairs_from_scores(images, scores, ["a", "a", "a", "b", "b", "b"])
    assert pairs.prompts == ["a"]  # group "b" ties and is skipped
    assert pairs.chosen[0, 0, 0, 0].item() == 1 and pairs.rejected[0, 0, 0, 0].item() == 0
    with pytest.raises(ValueError, match="no prompt"):
        pairs_from_scores(images[3:], scores[3:], ["b"] * 3)


def test_flow_network_gradient_does_not_starve_the_lora():
    """The loop clips the LoRA and the flow network on separate norms: a flow-network gradient of norm 1e6
    must not shrink the LoRA's AdamW step (with one global norm the LoRA's gradient drops below Adam's eps
    and its first step shrinks ~100×)."""
    from comfy_poe.training.alignment import TrainableSet
    from comfy_poe.training.loop import StepOutput, train

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    lora = create_lora(model, LoRAConfig(rank=2, alpha=2, targets="0", init="gaussian"), seed=0)
    lora.attach(model)
    flow = torch.nn.Linear(4, 1)
    trainable = TrainableSet(lora, {"flow": flow})
    x = torch.ones(1, 4)

    def step(_):
        # LoRA gradient ~1e-4 per element (norm < 1: unclipped on its own), flow gradient norm ~1e6
        return StepOutput(1e-4 * model(x).sum() + 1e6 * flow(x).sum())

    before = {n: p.detach().clone() for n, p in lora.named_lora_parameters().items()}
    train(trainable, step, LoopConfig(steps=1, lr=1e-3, weight_decay=0.0, grad_clip=1.0, seed=0))
    moved = [(p.detach() - before[n]).abs().max().item() for n, p in lora.named_lora_parameters().items()
             if p.grad is not None and p.grad.abs().max() > 0]
    assert moved and max(moved) == pytest.approx(1e-3, rel=0.05)  # a full first Adam step of size lr
    assert [len(g) for g in trainable.clip_groups()] == [len(before), 2]
