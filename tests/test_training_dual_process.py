"""Dual-Process tuning on tiny models (CPU, fixed seeds): the judge's score rises, the gradient reaches only
the LoRA, EPS (digits UNet) and flow (tiny DiT) models, one- and multi-step, a tiny VLM as the judge,
checkpoints, interrupt + resume == uninterrupted, curves."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comfy_poe import digits
from comfy_poe.experts import PIXEL, DiscriminativeExpert
from comfy_poe.lora import load_lora_file, parse_state_dict
from comfy_poe.training import (
    CheckpointStore, DualProcessConfig, Generator, LoopConfig, LoRAConfig, TrainingInterrupted, create_lora,
    enable_gradient_checkpointing, evaluate, noise_batch, render_curves, sample, tune,
)



# ------------------------------------------------------------------------------------------ digits (EPS)
@pytest.fixture(scope="module")
def digits_setup():
    den = digits.load_denoiser(with_classifier=False)
    den.network.requires_grad_(False)
    return den, digits.load_evaluator(), digits.classifier_judge(3)


def digits_generator(den, steps=4):
    return Generator(lambda x, s: den.denoise(x, s, [None])[0], digits.karras_sigmas(steps), (1, 8, 8), "eps")


def digits_config(steps, seed=0, **loop):
    return DualProcessConfig(loop=LoopConfig(steps=steps, lr=3e-3, seed=seed, **loop), batch_size=4,
                             train_scale=1.0, eval_scale=1.0, pixel_range="none")


def test_digits_eps_multistep_score_rises_and_only_lora_changes(digits_setup):
    den, evaluator, judge = digits_setup
    base = {k: v.clone() for k, v in den.network.state_dict().items()}
    lora = create_lora(den.network, LoRAConfig(rank=4, alpha=4, targets="attention"), seed=0).attach(den.network)
    gen = digits_generator(den)
    try:
        before = evaluate(gen, [judge], lora, [0.0], seeds=range(32))[0.0]
        result = tune(gen, [judge], lora, digits_config(40))
        after = evaluate(gen, [judge], lora, [1.0], seeds=range(32))[1.0]
        # held-out evaluator (never used for training): share of samples that are a "3"
        lora.scale = 0.0
        noise = noise_batch(gen, 1234, range(64))
        success_before = (evaluator.log_probs(sample(gen, noise)).argmax(1) == 3).float().mean().item()
        lora.scale = 1.0
        success_after = (evaluator.log_probs(sample(gen, noise)).argmax(1) == 3).float().mean().item()
    finally:
        lora.detach()
    losses = [r["loss"] for r in result.history]
    print(f"judge log p(3): {before.mean():.2f} -> {after.mean():.2f}; evaluator success "
          f"{success_before:.2f} -> {success_after:.2f}; loss first10 {sum(losses[:10]) / 10:.2f} "
          f"last10 {sum(losses[-10:]) / 10:.2f}")
    assert after.mean() > before.mean() + 3.0
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 2.0
    assert success_after > success_before + 0.3
    assert {r["start_step"] for r in result.history} == {0.0, 1.0, 2.0, 3.0}  # i ~ U{0..N-1}
    # nothing but the LoRA changed, and no base parameter even received a gradient
    for k, v in den.network.state_dict().items():
        assert torch.equal(v, base[k]), k
    assert all(p.grad is None for p in den.network.parameters())
    assert all(torch.count_nonzero(a.up) > 0 and torch.count_nonzero(a.down) > 0 for a in lora.adapters)


def test_same_seed_same_run_and_interrupt_resume_equals_uninterrupted(digits_setup, tmp_path):
    den = digits_setup[0]
    judge = digits_setup[2]

    def run(steps, folder=None, stop_at=None, every=2, seed=0):
        lora = create_lora(den.network, LoRAConfig(rank=2, alpha=2, targets="attention"), seed=seed)
        lora.attach(den.network)

        def should_stop(step):
            if stop_at is not None and step == stop_at:
                raise TrainingInterrupted(f"stopped at {step}")

        try:
            store = CheckpointStore(folder, export=lambda n: n.export_state_dict("diffusion_model."),
                                    metadata={"comfy_poe.training": "test"}) if folder else None
            res = tune(digits_generator(den, steps=3), [judge], lora,
                       digits_config(steps, seed=seed, checkpoint_every=every), checkpoints=store,
                       should_stop=should_stop)
            return lora, res
        finally:
            lora.detach()

    full, full_res = run(7)
    again, _ = run(7)
    assert all(torch.equal(a.up, b.up) and torch.equal(a.down, b.down) for a, b in zip(full.adapters, again.adapters))
    other, _ = run(7, seed=1)
    assert not torch.equal(full.adapters[0].up, other.adapters[0].up)

    folder = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        run(7, folder, stop_at=6)
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == 4 and len(state["history"]) == 4  # last good checkpoint kept
    assert sorted(p.name for p in folder.iterdir()) == ["lora.safetensors", "state-4.safetensors", "state.json"]
    kept = load_lora_file(folder / "lora.safetensors")
    assert kept.metadata["comfy_poe.training_step"] == "4" and not parse_state_dict(kept.tensors).skipped

    resumed, res = run(7, folder)
    assert res.resumed_from == 4
    for a, b in zip(full.adapters, resumed.adapters):
        assert torch.equal(a.up, b.up) and torch.equal(a.down, b.down)
    assert [r["loss"] for r in res.history] == [r["loss"] for r in full_res.history]
    assert json.loads((folder / "state.json").read_text())["step"] == 7

    # other settings refuse to resume silently
    with pytest.raises(ValueError, match="other settings.*loop"):
        lora = create_lora(den.network, LoRAConfig(rank=2, alpha=2, targets="attention"), seed=0)
        lora.attach(den.network)
        try:
            cfg = digits_config(9)
            cfg.loop.lr = 1e-3
            tune(digits_generator(den, steps=3), [judge], lora, cfg, checkpoints=CheckpointStore(folder))
        finally:
            lora.detach()


def test_bad_judges_are_refused(digits_setup):
    den = digits_setup[0]
    lora = create_lora(den.network, LoRAConfig(rank=2, targets="attention"), seed=0)
    gen = digits_generator(den)
    black_box = DiscriminativeExpert(lambda x: x.mean((1, 2, 3)), name="bb", differentiable=False)
    with pytest.raises(ValueError, match="'bb' is not differentiable"):
        tune(gen, [black_box], lora, digits_config(1))
    pixel = DiscriminativeExpert(lambda x: x.mean((1, 2, 3)), name="px", space=PIXEL, differentiable=True)
    with pytest.raises(ValueError, match="'px' scores pixels but no decoder"):
        tune(gen, [pixel], lora, digits_config(1))
    with pytest.raises(ValueError, match="at least one"):
        tune(gen, [], lora, digits_config(1))


# ------------------------------------------------------------------------------------------- flow (CONST)
class TinyFlowDiT(nn.Module):
    """Velocity model v(x, σ) with Flux-style layer names, on 3×S×S latents (patch 2)."""

    def __init__(self, channels=3, dim=32):
        super().__init__()
        self.img_in = nn.Conv2d(channels, dim, 2, stride=2)
        self.time_in = nn.Linear(1, dim)
        self.double_blocks = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.img_attn = nn.Module()
            block.img_attn.qkv = nn.Linear(dim, 3 * dim)
            block.img_attn.proj = nn.Linear(dim, dim)
            block.img_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
            self.double_blocks.append(block)
        self.final = nn.ConvTranspose2d(dim, channels, 2, stride=2)

    def forward(self, x, sigma):
        h = self.img_in(x)
        n, d, hh, ww = h.shape
        t = h.flatten(2).transpose(1, 2) + self.time_in(sigma.view(-1, 1, 1))
        for block in self.double_blocks:
            q, k, v = block.img_attn.qkv(t).chunk(3, -1)
            t = t + block.img_attn.proj(F.scaled_dot_product_attention(q, k, v))
            t = t + block.img_mlp(t)
        return self.final(t.transpose(1, 2).reshape(n, d, hh, ww))


def flow_generator(model, steps, size=8, decode_scale=1, squash=False):
    sigmas = torch.linspace(1.0, 0.0, steps + 1)

    def decode(z):  # a tiny differentiable "VAE": upsample, [-1, 1] -> [0, 1], NHWC
        if decode_scale > 1:
            z = F.interpolate(z, scale_factor=decode_scale, mode="bilinear", align_corners=False)
        # squash: keep every pixel inside (0, 1) like a real VAE's output; the linear map of a N(0, 1)
        # latent clips a third of the pixels to pure colours
        return ((torch.tanh(z) if squash else z) + 1).div(2).permute(0, 2, 3, 1)

    return Generator(lambda x, s: x - s.view(-1, 1, 1, 1) * model(x, s), sigmas, (3, size, size), "const",
                     decode=decode)


def brightness_judge():
    return DiscriminativeExpert(lambda img: 10 * img.mean((1, 2, 3)), space=PIXEL, differentiable=True,
                                name="brightness")


@pytest.mark.parametrize("steps", [1, 3])
def test_flow_model_one_and_multi_step_brightness_rises(steps):
    torch.manual_seed(0)
    model = TinyFlowDiT().requires_grad_(False)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora = create_lora(model, LoRAConfig(rank=4, alpha=8, targets="attention+feedforward"), seed=0).attach(model)
    gen = flow_generator(model, steps)
    judge = brightness_judge()
    before = evaluate(gen, [judge], lora, [0.0], seeds=range(8))[0.0]
    cfg = DualProcessConfig(loop=LoopConfig(steps=25, lr=1e-2, seed=0), train_scale=2.5, eval_scale=2.5,
                            pixel_range="clamp", batch_size=2)
    result = tune(gen, [judge], lora, cfg)
    after = evaluate(gen, [judge], lora, [2.5], seeds=range(8))[2.5]
    lora.detach()
    print(f"flow {steps}-step brightness score {before.mean():.3f} -> {after.mean():.3f}")
    assert after.mean() > before.mean() + 1.0
    assert lora.scale == 2.5
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    starts = {r["start_step"] for r in result.history}
    assert starts == ({0.0} if steps == 1 else {0.0, 1.0, 2.0})


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = TinyFlowDiT().requires_grad_(False)
    lora = create_lora(model, LoRAConfig(rank=2, targets="attention"), seed=0).attach(model)
    with torch.no_grad():
        for a in lora.adapters:
            a.up.normal_()
    x, s = torch.randn(2, 3, 8, 8), torch.full((2,), 0.5)

    def grads():
        for p in lora.parameters():
            p.grad = None
        model(x, s).square().mean().backward()
        return [p.grad.clone() for p in lora.parameters()]

    plain = grads()
    undo = enable_gradient_checkpointing(model)
    assert "forward" in model.double_blocks[0].__dict__
    checkpointed = grads()
    undo()
    assert "forward" not in model.double_blocks[0].__dict__
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))


# -------------------------------------------------------------------------------------------- VLM judge
def _vlm_tiny():
    path = Path(__file__).resolve().parent / "vlm_tiny.py"
    spec = importlib.util.spec_from_file_location("vlm_tiny", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("vlm_tiny", module)
    spec.loader.exec_module(module)
    return module


def test_vlm_judge_dual_process_loss_falls_through_decoder_and_generator(tmp_path):
    from comfy_poe.experts.overlays import parse_visual_prompt
    from comfy_poe.experts.vlm import load_vlm
    from comfy_poe.experts.vlm_judge import VLMJudge, parse_questions

    folder = _vlm_tiny().build_tiny_vlm("qwen2_vl", tmp_path / "vlm")
    bundle = load_vlm(folder, dtype="float32")
    bundle.model.requires_grad_(False)
    vlm_params = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    judge = VLMJudge(bundle, parse_questions("Is there a cat in the image? | Yes"), mode="dual_process",
                     overlays=parse_visual_prompt("hline: 0.5")).expert()
    torch.manual_seed(0)
    model = TinyFlowDiT().requires_grad_(False)
    lora = create_lora(model, LoRAConfig(rank=4, alpha=8, targets="attention+feedforward"), seed=0).attach(model)
    gen = flow_generator(model, steps=1, size=14, decode_scale=4, squash=True)  # 56×56, the tiny Qwen's size
    seen = []
    decode = gen.decode
    gen.decode = lambda z: seen.append(decode(z)) or seen[-1]
    cfg = DualProcessConfig(loop=LoopConfig(steps=12, lr=1e-2, seed=0), noise_pool=1, train_scale=5.0,
                            eval_scale=5.0)  # one fixed noise: the loss curve is comparable step to step
    result = tune(gen, [judge], lora, cfg)
    lora.detach()
    losses = [r["loss"] for r in result.history]
    print("VLM dual-process loss", [round(v, 3) for v in losses])
    # a random tiny VLM is nearly blind (loss ≈ log |vocab|), so the margins are small but exact (fixed seeds)
    # measured drops of the last loss / the mean of the last six: 0.11 / 0.11 (transformers 5.25), 0.09 / 0.09
    # (4.57.1, whose tiny model draws other random weights)
    assert losses[-1] < losses[0] - 0.05 and sum(losses[6:]) / 6 < losses[0] - 0.05
    assert all(abs(r["score"] + r["loss"]) < 1e-5 for r in result.history)  # loss = −score (batch of 1)
    assert all(torch.equal(v, vlm_params[k]) for k, v in bundle.model.state_dict().items())  # VLM frozen
    # the overlay (a red line) is drawn on the judge's copy only, never on the generated images. The first
    # decoded image is the one checked: training pushes this blind judge's images to saturated red, where a
    # red line cannot show.
    img = seen[0].detach()
    kept = img.clone()
    with torch.no_grad():
        judge.fn(img)
    assert torch.equal(img, kept)
    grey = torch.full_like(img, 0.5)
    rows = (judge.fn.judge_view(grey) != grey).any(-1).any(-1)[0].nonzero().flatten().tolist()
    assert rows and all(abs(r - img.shape[1] / 2) <= 2 for r in rows), rows  # "hline: 0.5"
    view = judge.fn.judge_view(img)
    red = torch.tensor([1.0, 0.0, 0.0])
    assert torch.equal(view[:, rows], red.expand_as(view[:, rows]))
    off = [r for r in range(img.shape[1]) if r not in rows]
    assert torch.equal(view[:, off], img[:, off])
    shown = (view[:, rows] - img[:, rows]).abs().amax(-1) > 0.1  # pixels where the line is visible
    assert shown.float().mean() > 0.9, shown.float().mean()


def test_curves_render_every_recorded_series():
    history = [{"step": i, "loss": 1.0 / i, "score": -1.0 / i} for i in range(1, 21)]
    img = render_curves(history, keys=("loss", "score", "missing"), width=400, panel_height=150, title="t")
    assert img.size == (400, 18 + 2 * 150)
    pixels = torch.tensor(list(img.get_flattened_data()) if hasattr(img, 'get_flattened_data') else list(img.getdata()), dtype=torch.float32)
    blue = ((pixels[:, 2] > 150) & (pixels[:, 0] < 100)).sum().item()
    red = ((pixels[:, 0] > 150) & (pixels[:, 2] < 100)).sum().item()
    assert blue > 100 and red > 100
