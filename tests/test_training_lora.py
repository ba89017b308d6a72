"""Training LoRA representation: target selection (UNet and DiT naming), hook vs weight-wrapper math,
zero-init identity, ComfyUI-native export read back by comfy_poe.lora, file round trip."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comfy_poe.lora import atomic_write_safetensors, load_lora_file, parse_state_dict
from comfy_poe.training import LoRAConfig, create_lora, find_targets



def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4).eval()


class FluxLikeBlock(nn.Module):
    """ComfyUI-native Flux naming: img_attn.qkv / img_attn.proj / img_mlp.0 / img_mlp.2."""

    def __init__(self, d=8):
        super().__init__()
        self.img_attn = nn.Module()
        self.img_attn.qkv = nn.Linear(d, 3 * d)
        self.img_attn.proj = nn.Linear(d, d)
        self.img_attn.norm = nn.LayerNorm(d)
        self.img_mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        q, k, v = self.img_attn.qkv(x).chunk(3, -1)
        x = x + self.img_attn.proj(F.scaled_dot_product_attention(q, k, v))
        return x + self.img_mlp(x)


class TinyDiT(nn.Module):
    def __init__(self):
        super().__init__()
        self.double_blocks = nn.ModuleList([FluxLikeBlock(), FluxLikeBlock()])
        self.final = nn.Linear(8, 8)

    def forward(self, x):
        for block in self.double_blocks:
            x = block(x)
        return self.final(x)


def test_target_presets_select_attention_and_feedforward_in_unet_and_dit_naming():
    unet = tiny_unet()
    attn = {p for p, _ in find_targets(unet, "attention")}
    ff = {p for p, _ in find_targets(unet, "feedforward")}
    assert attn and ff and not attn & ff
    assert all(p.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or p.endswith("to_out.0") for p in attn), attn
    assert all(p.endswith(("ff.net.0.proj", "ff.net.2")) for p in ff), ff
    both = {p for p, _ in find_targets(unet, "attention+feedforward")}
    assert both == attn | ff
    # the GEGLU 'ff.net.0.proj' and 'proj_in/proj_out' are not attention
    assert not any(p.endswith(("proj_in", "proj_out")) for p in both)

    dit = TinyDiT()
    assert {p for p, _ in find_targets(dit, "attention")} == {
        f"double_blocks.{i}.img_attn.{n}" for i in (0, 1) for n in ("qkv", "proj")}
    assert {p for p, _ in find_targets(dit, "feedforward")} == {
        f"double_blocks.{i}.img_mlp.{n}" for i in (0, 1) for n in ("0", "2")}
    assert [p for p, _ in find_targets(dit, r"final$")] == ["final"]
    with pytest.raises(ValueError, match="match no"):
        find_targets(dit, "to_q$")
    with pytest.raises(ValueError, match="regular expression"):
        find_targets(dit, "([")


def test_hook_equals_weight_wrapper_and_zero_init_is_identity():
    torch.manual_seed(1)
    model = nn.Sequential()
    model.add_module("to_q", nn.Linear(6, 5))
    model.add_module("conv", nn.Conv2d(3, 4, 3, padding=1, stride=2))
    x_lin, x_conv = torch.randn(2, 6), torch.randn(2, 3, 8, 8)
    net = create_lora(model, LoRAConfig(rank=3, alpha=6.0, targets=r"to_q$|conv$", init="kaiming", scale=2.0), seed=0)
    before = (model.to_q(x_lin), model.conv(x_conv))
    net.attach(model)
    assert torch.equal(model.to_q(x_lin), before[0]) and torch.equal(model.conv(x_conv), before[1])  # up = 0
    for adapter in net.adapters:
        with torch.no_grad():
            adapter.up.normal_()
    lin_hook, conv_hook = model.to_q(x_lin), model.conv(x_conv)
    a_lin, a_conv = net.adapters
    assert a_lin.factor == pytest.approx(2.0 * 6.0 / 3)
    lin_w = F.linear(x_lin, a_lin(model.to_q.weight), model.to_q.bias)
    conv_w = F.conv2d(x_conv, a_conv(model.conv.weight), model.conv.bias, stride=2, padding=1)
    assert torch.allclose(lin_hook, lin_w, atol=1e-5) and torch.allclose(conv_hook, conv_w, atol=1e-5)
    assert not torch.allclose(lin_hook, before[0])
    net.scale = 0.0
    assert torch.equal(model.to_q(x_lin), before[0])
    net.detach()
    net.scale = 2.0
    assert torch.equal(model.conv(x_conv), before[1])


def test_gaussian_init_statistics_and_seed():
    dit = TinyDiT()
    a = create_lora(dit, LoRAConfig(rank=16, alpha=8, targets="attention"), seed=3)
    b = create_lora(dit, LoRAConfig(rank=16, alpha=8, targets="attention"), seed=3)
    c = create_lora(dit, LoRAConfig(rank=16, alpha=8, targets="attention"), seed=4)
    downs = torch.cat([ad.down.flatten() for ad in a.adapters])
    assert all(torch.equal(x.down, y.down) for x, y in zip(a.adapters, b.adapters))
    assert not torch.equal(a.adapters[0].down, c.adapters[0].down)
    assert downs.std().item() == pytest.approx(1 / 16, rel=0.15)  # PEFT gaussian: std 1/r
    assert all(torch.count_nonzero(ad.up) == 0 for ad in a.adapters)


def test_export_is_read_by_comfy_poe_lora_and_round_trips_through_a_file(tmp_path):
    unet = tiny_unet()
    cfg = LoRAConfig(rank=4, alpha=8.0, targets="attention+feedforward", scale=5.0)
    net = create_lora(unet, cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for adapter in net.adapters:
            adapter.up.copy_(torch.randn(adapter.up.shape, generator=g) * 0.05)
    net.attach(unet)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 8)
    with torch.no_grad():
        tuned = unet(x, t, ctx).sample
    net.detach()

    sd = net.export_state_dict(prefix="diffusion_model.")
    path = atomic_write_safetensors(tmp_path / "tuned.safetensors", sd, {"comfy_poe.training": "{}"})
    assert [p.name for p in tmp_path.iterdir()] == ["tuned.safetensors"]  # no temp file left
    data = load_lora_file(path)
    parsed = parse_state_dict(data.tensors)
    assert not parsed.skipped and len(parsed.modules) == len(net.paths)
    for path_, adapter in net.items():
        module = parsed.modules[f"unet:{path_.replace('.', '_')}"]
        assert module.name.key == f"diffusion_model.{path_}" and module.rank == 4
        # ComfyUI's (alpha / r) at strength 1 reproduces the adapter at the exported weight 5
        assert torch.allclose(module.delta().reshape(adapter.weight_shape), adapter.delta(), atol=1e-6)

    fresh = create_lora(unet, cfg, seed=99)
    fresh.load_factors(data.tensors, prefix="diffusion_model.", scale=5.0)
    fresh.scale = 5.0
    fresh.attach(unet)
    with torch.no_grad():
        again = unet(x, t, ctx).sample
    assert torch.equal(again, tuned)
    fresh.detach()
    with pytest.raises(ValueError, match="different rank"):
        create_lora(unet, LoRAConfig(rank=2, targets="attention+feedforward"), seed=0).load_factors(
            data.tensors, prefix="diffusion_model.")


def test_conv_targets_export_locon_shapes():
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(3, 6, 3, padding=1))
    net = create_lora(model, LoRAConfig(rank=2, alpha=2, targets=r"conv1$"), seed=0)
    sd = net.export_state_dict(prefix="diffusion_model.")
    assert sd["diffusion_model.conv1.lora_up.weight"].shape == (6, 2, 1, 1)
    assert sd["diffusion_model.conv1.lora_down.weight"].shape == (2, 3, 3, 3)
    assert math.isclose(float(sd["diffusion_model.conv1.alpha"]), 2.0)
    parsed = parse_state_dict(sd)
    assert parsed.modules["unet:conv1"].weight_shape == (6, 3, 3, 3)
