"""LoRA merge maths and key formats on small random layers written as real safetensors files."""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from comfy_poe.lora import formats, merge
from comfy_poe.lora.__main__ import main as cli_main
from comfy_poe.lora.formats import parse_module_prefix, parse_state_dict, resolve_flat, to_state_dict
from comfy_poe.lora.io import load_lora_file
from comfy_poe.lora.merge import LoraInput, MergeError, merge_loras, save_merge


# Layers of a toy model: dotted path -> (component, weight shape).  DiT-style names are the same in
# kohya (flat) and ComfyUI-native (dotted) spelling, so one LoRA can be written in all three formats.
LAYERS = {
    "double_blocks.0.img_attn.qkv": ("unet", (96, 48)),
    "single_blocks.1.linear2": ("unet", (48, 80)),
    "img_in.conv": ("unet", (32, 16, 3, 3)),          # LoCon conv layer
    "text_model.encoder.layers.0.self_attn.q_proj": ("te1", (40, 40)),
}
KOHYA = {"unet": "lora_unet_", "te1": "lora_te_"}
NATIVE = {"unet": "diffusion_model.", "te1": "text_encoders.clip_l.transformer."}
PEFT = {"unet": "unet.", "te1": "text_encoder."}


def random_lora(seed, rank, alpha, layers=LAYERS):
    """{path: (up, down, alpha)} with the shapes a trainer would save (conv: down (r,in,kh,kw), up (out,r,1,1))."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, (_, shape) in layers.items():
        r = rank if isinstance(rank, int) else rank[path]
        down = torch.randn((r, *shape[1:]), generator=g) / math.sqrt(shape[1])
        up = torch.randn((shape[0], r, *[1] * (len(shape) - 2)), generator=g)
        out[path] = (up, down, alpha)
    return out


def write_lora(path, lora, fmt, layers=LAYERS, metadata=None):
    """Write the same LoRA as kohya / native (lora_up/down + alpha) or PEFT (lora_A/B, scale baked, no alpha)."""
    sd = {}
    for mod, (up, down, alpha) in lora.items():
        comp = layers[mod][0]
        if fmt == "peft":
            scale = alpha / down.shape[0] if alpha is not None else 1.0
            key = PEFT[comp] + mod
            sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = down, up * scale
            continue
        key = KOHYA[comp] + mod.replace(".", "_") if fmt == "kohya" else NATIVE[comp] + mod
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
        if alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def apply_lora(weights, sd, strength=1.0):
    """Patch layer weights with a LoRA state dict the way ComfyUI does (alpha / down-rank scale), written
    independently of the engine: W += strength * alpha/r * up.flatten(1) @ down.flatten(1)."""
    out = dict(weights)
    for key, up in sd.items():
        for up_suffix, down_suffix in ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")):
            if key.endswith(up_suffix):
                prefix = key[: -len(up_suffix)]
                down = sd[prefix + down_suffix]
                break
        else:
            continue
        alpha = sd.get(f"{prefix}.alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        target = next(p for p in out if prefix.endswith(p.replace(".", "_")) or prefix.endswith(p))
        w = out[target]
        out[target] = w + strength * scale * (up.float().flatten(1) @ down.float().flatten(1)).reshape(w.shape)
    return out


def forward(weights, path, x):
    w = weights[path]
    return F.conv2d(x, w, padding=1) if w.ndim == 4 else F.linear(x, w)


def layer_inputs(g):
    return {p: torch.randn((2, s[1], 6, 6) if len(s) == 4 else (5, s[1]), generator=g) for p, (_, s) in LAYERS.items()}


def base_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randn(s, generator=g) for p, (_, s) in LAYERS.items()}


def load_sd(path):
    return load_lora_file(path).tensors


# ------------------------------------------------------------------------------------ exactness
def test_concat_equals_applying_loras_one_after_another(tmp_path):
    """Mixed ranks (64/32/8 incl. conv), mixed alphas, partly overlapping module sets, three formats."""
    ranks_a = {"double_blocks.0.img_attn.qkv": 64, "single_blocks.1.linear2": 8, "img_in.conv": 4,
               "text_model.encoder.layers.0.self_attn.q_proj": 16}
    a = random_lora(1, ranks_a, alpha=32.0)
    b = random_lora(2, 32, alpha=8.0)
    del b["single_blocks.1.linear2"]                      # only in a
    c = {"single_blocks.1.linear2": random_lora(3, 6, alpha=None)["single_blocks.1.linear2"]}
    pa = write_lora(tmp_path / "a.safetensors", a, "kohya")
    pb = write_lora(tmp_path / "b.safetensors", b, "native")
    pc = write_lora(tmp_path / "c.safetensors", c, "peft")
    weights = {"a": 0.7, "b": -0.4, "c": 1.3}
    inputs = [LoraInput.from_file(p, weights[p.stem]) for p in (pa, pb, pc)]
    out = tmp_path / "merged.safetensors"
    result = merge_loras(inputs, "concat", dtype="fp32")
    save_merge(result, out)

    base = base_weights()
    seq = base
    for p in (pa, pb, pc):
        seq = apply_lora(seq, load_sd(p), weights[p.stem])
    merged_sd = load_sd(out)
    merged = apply_lora(base, merged_sd)
    xs = layer_inputs(torch.Generator().manual_seed(9))
    for path in LAYERS:
        ref, got = forward(seq, path, xs[path]), forward(merged, path, xs[path])
        assert not torch.allclose(ref, forward(base, path, xs[path]), atol=1e-3)  # the LoRAs do something
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    # rank is Σ r_i per module; conv shapes kept; alpha = rank (scale 1); a native spelling wins,
    # a module only kohya/PEFT inputs have keeps kohya
    k_qkv = "diffusion_model.double_blocks.0.img_attn.qkv"
    assert merged_sd[k_qkv + ".lora_down.weight"].shape == (96, 48)
    assert float(merged_sd[k_qkv + ".alpha"]) == 96.0
    assert merged_sd["diffusion_model.img_in.conv.lora_down.weight"].shape == (36, 16, 3, 3)
    assert merged_sd["diffusion_model.img_in.conv.lora_up.weight"].shape == (32, 36, 1, 1)
    assert merged_sd["lora_unet_single_blocks_1_linear2.lora_down.weight"].shape == (14, 80)


def test_rank64_plus_rank32_kohya_with_peft(tmp_path):
    """The case peer merge nodes fail on: different ranks and formats for the same layers."""
    layers = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": ("unet", (128, 96)),
              "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": ("unet", (96, 128))}
    a = random_lora(4, 64, alpha=64.0, layers=layers)
    b = random_lora(5, 32, alpha=16.0, layers=layers)
    pa = write_lora(tmp_path / "r64.safetensors", a, "kohya", layers)
    sd_b = {}  # PEFT with attention-processor spelling, as diffusers saves it
    for path, (up, down, alpha) in b.items():
        key = "unet." + path.replace(".to_", ".processor.to_").removesuffix(".0")
        sd_b[key + ".lora_A.weight"], sd_b[key + ".lora_B.weight"] = down, up * (alpha / 32)
    pb = tmp_path / "r32.safetensors"
    save_file(sd_b, str(pb))
    inputs = [LoraInput.from_file(pa, 0.5), LoraInput.from_file(pb, 0.5)]
    result = merge_loras(inputs, "concat", dtype="fp32")
    assert [m.rank for m in result.modules] == [96, 96]
    sd = result.state_dict()
    for path in layers:
        key = "lora_unet_" + path.replace(".", "_")  # PEFT unet spelling is written back as kohya
        got = sd[key + ".lora_up.weight"] @ sd[key + ".lora_down.weight"]
        ua, da, _ = a[path]
        ub, db, _ = b[path]
        want = 0.5 * (64 / 64) * ua @ da + 0.5 * (16 / 32) * ub @ db
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # compressing to rank 32 keeps the Eckart–Young optimum
    svd = merge_loras(inputs, "svd", 32, dtype="fp32")
    assert all(m.rank == 32 and 0 < m.energy < 1 for m in svd.modules)


def test_svd_full_rank_exact_and_truncation_is_eckart_young():
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(64, r, generator=g), torch.randn(r, 48, generator=g)) for r in (8, 4, 12)]
    weights = [1.0, -0.5, 0.25]
    b, a = merge.concat_factors(factors, weights)
    dense = sum(w * bi @ ai for (bi, ai), w in zip(factors, weights))
    torch.testing.assert_close(b @ a, dense, rtol=1e-5, atol=1e-4)

    bk, ak, energy = merge.svd_from_factors(b, a, 24)       # full rank (Σ r_i) → exact
    torch.testing.assert_close(bk @ ak, dense, rtol=1e-4, atol=1e-3)
    assert energy == pytest.approx(1.0, abs=1e-6)

    s = torch.linalg.svdvals(dense)
    for k in (1, 5, 10):
        bk, ak, energy = merge.svd_from_factors(b, a, k)
        err2 = float(((dense - bk @ ak) ** 2).sum())
        assert err2 == pytest.approx(float((s[k:] ** 2).sum()), rel=1e-3)   # optimal rank-k error
        assert energy == pytest.approx(float((s[:k] ** 2).sum() / (s ** 2).sum()), rel=1e-5)
        bd, ad, ed = merge.svd_dense(dense, k)
        torch.testing.assert_close(bk @ ak, bd @ ad, rtol=1e-3, atol=1e-2)


def test_svd_never_materialises_huge_delta():
    """20000 × 20000 fp32 would be 1.6 GB; from rank-8 factors the QR route needs only thin matrices."""
    g = torch.Generator().manual_seed(1)
    b = torch.randn(20000, 8, generator=g)
    a = torch.randn(8, 20000, generator=g)
    bk, ak, energy = merge.svd_from_factors(b, a, 4)
    assert bk.shape == (20000, 4) and ak.shape == (4, 20000) and 0 < energy < 1
    x = torch.randn(20000, 3, generator=g)           # compare actions, not matrices
    exact = b @ (a @ x)
    # independent reference: the squared singular values of BA are the eigenvalues of (BᵀB)(AAᵀ)
    s2 = torch.linalg.eigvals((b.T.double() @ b.double()) @ (a.double() @ a.T.double())).real.sort(descending=True).values
    assert energy == pytest.approx(float(s2[:4].sum() / s2.sum()), rel=1e-4)
    full_b, full_a, _ = merge.svd_from_factors(b, a, 8)
    torch.testing.assert_close(full_b @ (full_a @ x), exact, rtol=1e-3, atol=1e-1)


# ----------------------------------------------------------------------------------- TIES / DARE
TAU1 = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
TAU2 = torch.tensor([[-1.0, -2.0], [1.0, -4.0]])


def test_ties_follows_definition_on_hand_made_tensors():
    # trim (density 0.5 keeps 2 of 4): τ1 → [[3,0],[0,2]], τ2 → [[0,-2],[0,-4]]
    assert torch.equal(merge.magnitude_trim(TAU1, 0.5), torch.tensor([[3.0, 0.0], [0.0, 2.0]]))
    # elected signs [[+,-],[+,-]]; disjoint mean over agreeing non-zero entries
    assert torch.equal(merge.ties_merge([TAU1, TAU2], [1.0, 1.0], 0.5), torch.tensor([[3.0, -2.0], [0.0, -4.0]]))
    # weights act before the election: 0.5·τ2 → sums [[3,-1],[0,0]]; a tie elects +
    assert torch.equal(merge.ties_merge([TAU1, TAU2], [1.0, 0.5], 0.5), torch.tensor([[3.0, -1.0], [0.0, 2.0]]))
    # density 1: no trimming; entry (1,1): 2 vs -4 → sign -, mean of {-4} = -4; (1,0): mean(0.5, 1) = 0.75
    assert torch.equal(merge.ties_merge([TAU1, TAU2], [1.0, 1.0], 1.0), torch.tensor([[3.0, -1.5], [0.75, -4.0]]))


def test_ties_end_to_end_through_files(tmp_path):
    """ΔW = B·I with alpha absent (scale 1): merging at full rank must reproduce the hand-computed TIES."""
    paths = []
    for i, tau in enumerate((TAU1, TAU2)):
        p = tmp_path / f"t{i}.safetensors"
        save_file({"lora_unet_x_proj.lora_up.weight": tau.clone(), "lora_unet_x_proj.lora_down.weight": torch.eye(2)},
                  str(p))
        paths.append(p)
    result = merge_loras([LoraInput.from_file(p) for p in paths], "ties", density=0.5, dtype="fp32")
    (m,) = result.modules
    torch.testing.assert_close(m.up.flatten(1) @ m.down.flatten(1), torch.tensor([[3.0, -2.0], [0.0, -4.0]]),
                               rtol=1e-5, atol=1e-5)
    assert m.energy == pytest.approx(1.0)


def test_dare_drop_and_rescale_is_seeded_and_unbiased():
    delta = torch.randn(200, 200, generator=torch.Generator().manual_seed(0))
    dropped = merge.dare_drop(delta, 0.3, torch.Generator().manual_seed(7))
    kept = dropped != 0
    assert kept.float().mean().item() == pytest.approx(0.3, abs=0.01)
    torch.testing.assert_close(dropped[kept], delta[kept] / 0.3)          # rescaled by 1/density
    assert torch.equal(dropped, merge.dare_drop(delta, 0.3, torch.Generator().manual_seed(7)))
    assert not torch.equal(dropped, merge.dare_drop(delta, 0.3, torch.Generator().manual_seed(8)))
    # dare with density 1 is task arithmetic; dare_ties with density 1 is TIES without trimming
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    torch.testing.assert_close(merge.dare_merge([TAU1, TAU2], [1.0, 0.5], 1.0, gens), TAU1 + 0.5 * TAU2)
    torch.testing.assert_close(merge.dare_ties_merge([TAU1, TAU2], [1.0, 1.0], 1.0, gens),
                               merge.ties_merge([TAU1, TAU2], [1.0, 1.0], 1.0))


def test_dare_merge_seed_reproducible_and_module_local(tmp_path):
    a = write_lora(tmp_path / "a.safetensors", random_lora(1, 4, 4.0), "kohya")
    b = write_lora(tmp_path / "b.safetensors", random_lora(2, 4, 4.0), "kohya")
    only_qkv = {k: v for k, v in random_lora(2, 4, 4.0).items() if k == "double_blocks.0.img_attn.qkv"}
    b_small = write_lora(tmp_path / "b_small.safetensors", only_qkv, "kohya")

    def run(seed, second=b):
        res = merge_loras([LoraInput.from_file(a), LoraInput.from_file(second)], "dare", 8, seed=seed,
                          density=0.5, dtype="fp32")
        return {m.identity: m.up.flatten(1) @ m.down.flatten(1) for m in res.modules}

    r0, r0b, r1 = run(0), run(0), run(1)
    qkv = "unet:double_blocks_0_img_attn_qkv"
    assert all(torch.equal(r0[k], r0b[k]) for k in r0)
    assert not torch.allclose(r0[qkv], r1[qkv])
    # a module's random drop does not depend on the other modules in the merge
    torch.testing.assert_close(run(0, b_small)[qkv], r0[qkv])


def test_arithmetic_dense_path_equals_factor_svd(tmp_path):
    a = write_lora(tmp_path / "a.safetensors", random_lora(1, 8, 4.0), "kohya")
    b = write_lora(tmp_path / "b.safetensors", random_lora(2, 4, 1.0), "native")
    ins = [LoraInput.from_file(a, 0.6), LoraInput.from_file(b, 0.9)]
    r_svd = merge_loras(ins, "svd", 6, dtype="fp32")
    r_ari = merge_loras(ins, "arithmetic", 6, dtype="fp32")
    for m1, m2 in zip(r_svd.modules, r_ari.modules):
        assert m1.key == m2.key and m1.energy == pytest.approx(m2.energy, rel=1e-4)
        torch.testing.assert_close(m1.up.flatten(1) @ m1.down.flatten(1), m2.up.flatten(1) @ m2.down.flatten(1),
                                   rtol=1e-3, atol=1e-3)


def test_block_weights_scale_matching_modules(tmp_path):
    a = write_lora(tmp_path / "a.safetensors", random_lora(1, 4, 4.0), "kohya")
    full = merge_loras([LoraInput.from_file(a)], "concat", dtype="fp32")
    part = merge_loras([LoraInput.from_file(a)], "concat", block_weights="double_blocks=0.5, te1:=0", dtype="fp32")
    dense = {m.identity: m.up.flatten(1) @ m.down.flatten(1) for m in full.modules}
    got = {m.identity: m.up.flatten(1) @ m.down.flatten(1) for m in part.modules}
    assert "te1:text_model_encoder_layers_0_self_attn_q_proj" not in got
    assert any("total weight 0" in n for n in part.notes)
    torch.testing.assert_close(got["unet:double_blocks_0_img_attn_qkv"], 0.5 * dense["unet:double_blocks_0_img_attn_qkv"])
    torch.testing.assert_close(got["unet:img_in_conv"], dense["unet:img_in_conv"])
    with pytest.raises(MergeError, match="block_weights"):
        merge_loras([LoraInput.from_file(a)], "concat", block_weights="down_blocks_0")


def test_bad_requests_are_refused_with_named_inputs(tmp_path):
    a = write_lora(tmp_path / "a.safetensors", random_lora(1, 4, 4.0), "kohya")
    other = {"double_blocks.0.img_attn.qkv": ("unet", (90, 48))}
    b = write_lora(tmp_path / "b.safetensors", random_lora(2, 4, 4.0, other), "kohya", other)
    with pytest.raises(MergeError, match=r"different weight shapes.*a\.safetensors.*b\.safetensors"):
        merge_loras([LoraInput.from_file(a), LoraInput.from_file(b)])
    with pytest.raises(MergeError, match="method"):
        merge_loras([LoraInput.from_file(a)], "average")
    with pytest.raises(MergeError, match="density"):
        merge_loras([LoraInput.from_file(a)], "ties", density=0.0)
    with pytest.raises(MergeError, match="empty"):
        merge_loras([])


# ---------------------------------------------------------------------------------- key formats
def test_same_lora_in_three_formats_reads_identically_and_round_trips(tmp_path):
    lora = random_lora(3, 6, alpha=3.0)
    parsed = {fmt: parse_state_dict(load_sd(write_lora(tmp_path / f"{fmt}.safetensors", lora, fmt)))
              for fmt in ("kohya", "native", "peft")}
    ref = parsed["kohya"]
    assert set(ref.modules) == {f"{c}:{p.replace('.', '_')}" for p, (c, _) in LAYERS.items()}
    for fmt, p in parsed.items():
        assert set(p.modules) == set(ref.modules) and not p.skipped, fmt
        assert p.schemes == {"kohya": 4} if fmt == "kohya" else set(p.schemes) == {fmt}
        for ident, m in p.modules.items():
            torch.testing.assert_close(m.delta(), ref.modules[ident].delta(), rtol=1e-5, atol=1e-5)
    # kohya → native → kohya, native → kohya, peft → auto: same deltas, keys ComfyUI maps
    for src, fmt, expect_prefixes in (("kohya", "native", ("diffusion_model.", "text_encoders.clip_l.transformer.")),
                                      ("native", "kohya", ("lora_unet_", "lora_te")),
                                      ("peft", "auto", ("lora_unet_", "text_encoder."))):
        sd, notes = to_state_dict(parsed[src], fmt, dtype=torch.float32)
        assert not notes
        path = tmp_path / f"{src}_to_{fmt}.safetensors"
        save_file(sd, str(path))
        back = parse_state_dict(load_sd(path))
        assert all(m.name.key.startswith(expect_prefixes) for m in back.modules.values())
        assert set(back.modules) == set(ref.modules)
        for ident, m in back.modules.items():
            torch.testing.assert_close(m.delta(), ref.modules[ident].delta(), rtol=1e-5, atol=1e-5)
    # the converted native keys are the real dotted paths
    sd, _ = to_state_dict(ref, "native")
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight" in sd
    assert "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.alpha" in sd


@pytest.mark.parametrize("flat, dotted", [
    ("down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0",
     "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0"),
    ("mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj", "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"),
    ("up_blocks_1_resnets_2_conv_shortcut", "up_blocks.1.resnets.2.conv_shortcut"),
    ("input_blocks_4_1_proj_in", "input_blocks.4.1.proj_in"),
    ("output_blocks_2_0_in_layers_2", "output_blocks.2.0.in_layers.2"),
    ("text_model_encoder_layers_11_mlp_fc2", "text_model.encoder.layers.11.mlp.fc2"),
    ("text_model_encoder_layers_3_self_attn_out_proj", "text_model.encoder.layers.3.self_attn.out_proj"),
    ("double_blocks_7_img_attn_qkv", "double_blocks.7.img_attn.qkv"),
    ("single_blocks_37_linear1", "single_blocks.37.linear1"),
    ("single_transformer_blocks_2_proj_mlp", "single_transformer_blocks.2.proj_mlp"),
    ("joint_blocks_3_context_block_adaLN_modulation_1", "joint_blocks.3.context_block.adaLN_modulation.1"),
    ("encoder_block_0_layer_1_DenseReluDense_wi_0", "encoder.block.0.layer.1.DenseReluDense.wi_0"),
    ("my_custom_adapter_thing", None),   # unknown words: not guessed
])
def test_kohya_flat_names_resolve_to_dotted_paths(flat, dotted):
    assert resolve_flat(flat) == dotted


def test_key_parsing_of_every_spelling():
    cases = {
        "lora_unet_down_blocks_0_attentions_0_proj_in": ("unet", "down_blocks_0_attentions_0_proj_in", "kohya"),
        "lora_te_text_model_encoder_layers_0_mlp_fc1": ("te1", "text_model_encoder_layers_0_mlp_fc1", "kohya"),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1": ("te2", "text_model_encoder_layers_0_mlp_fc1", "kohya"),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out":
            ("unet", "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0", "peft"),
        "unet.base_model.model.mid_block.attentions.0.proj_in": ("unet", "mid_block_attentions_0_proj_in", "peft"),
        "transformer.transformer_blocks.0.attn.to_q": ("transformer", "transformer_blocks_0_attn_to_q", "peft"),
        "lora_transformer_transformer_blocks_0_attn_to_q": ("transformer", "transformer_blocks_0_attn_to_q", "kohya"),
        "text_encoder_2.text_model.encoder.layers.1.self_attn.k_proj":
            ("te2", "text_model_encoder_layers_1_self_attn_k_proj", "peft"),
        "diffusion_model.input_blocks.1.1.proj_in": ("unet", "input_blocks_1_1_proj_in", "native"),
        "text_encoders.clip_g.transformer.text_model.encoder.layers.0.mlp.fc1":
            ("te2", "text_model_encoder_layers_0_mlp_fc1", "native"),
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q":
            ("te:t5xxl", "encoder_block_0_layer_0_SelfAttention_q", "native"),
    }
    for key, (component, flat, scheme) in cases.items():
        n = parse_module_prefix(key)
        assert (n.component, n.flat, n.scheme) == (component, flat, scheme), key
    # the spellings offered to ComfyUI's key map include the processor spelling ComfyUI requires for PEFT
    n = parse_module_prefix("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0")
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out" in formats.comfy_lookup_spellings(n)


def test_unknown_and_unsupported_keys_are_reported_not_dropped(tmp_path):
    lora = random_lora(1, 4, 4.0)
    p = write_lora(tmp_path / "a.safetensors", lora, "kohya")
    sd = dict(load_sd(p))
    sd["lora_unet_double_blocks_0_img_attn_qkv.dora_scale"] = torch.ones(96, 1)
    sd["lora_unet_foo.lora_up.weight"] = torch.ones(4, 2)          # no down
    sd["some_random_tensor"] = torch.ones(3)
    sd["lora_unet_bar.hada_w1_a"] = torch.ones(2, 2)
    save_file(sd, str(tmp_path / "b.safetensors"))
    inp = LoraInput.from_file(tmp_path / "b.safetensors")
    skipped = inp.parsed.skipped
    assert set(skipped) == {"lora_unet_double_blocks_0_img_attn_qkv.dora_scale",
                            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight",
                            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
                            "lora_unet_double_blocks_0_img_attn_qkv.alpha",
                            "lora_unet_foo.lora_up.weight", "some_random_tensor", "lora_unet_bar.hada_w1_a"}
    assert "DoRA" in skipped["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert "no down" in skipped["lora_unet_foo.lora_up.weight"]
    report = merge_loras([inp]).report()
    assert "NOT MERGED from b.safetensors: 7 keys" in report and "some_random_tensor" in report
    assert len(merge_loras([inp]).modules) == 3
    out = tmp_path / "strict.safetensors"
    assert cli_main(["merge", str(tmp_path / "b.safetensors"), "--strict", "--out", str(out)]) == 2
    assert not out.exists()


def test_locon_mid_is_folded_like_a_tucker_conv():
    g = torch.Generator().manual_seed(3)
    up, down, mid = torch.randn(12, 4, 1, 1, generator=g), torch.randn(4, 6, 1, 1, generator=g), \
        torch.randn(4, 4, 3, 3, generator=g)
    parsed = parse_state_dict({"lora_unet_c.lora_up.weight": up, "lora_unet_c.lora_down.weight": down,
                               "lora_unet_c.lora_mid.weight": mid, "lora_unet_c.alpha": torch.tensor(2.0)})
    m = parsed.modules["unet:c"]
    x = torch.randn(2, 6, 7, 7, generator=g)
    chain = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up) * (2.0 / 4)   # down → mid → up network
    torch.testing.assert_close(F.conv2d(x, m.delta().reshape(12, 6, 3, 3), padding=1), chain, rtol=1e-4, atol=1e-4)


def test_mixed_unet_naming_schemes_need_the_model(tmp_path):
    """A diffusers-named kohya file and an LDM-named native file cannot be matched without the model;
    with a resolver (what the ComfyUI node passes) the same layer merges into one module."""
    ldm = {"input_blocks.1.1.transformer_blocks.0.attn1.to_q": ("unet", (32, 32))}
    dif = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": ("unet", (32, 32))}
    a = write_lora(tmp_path / "ldm.safetensors", random_lora(1, 4, 4.0, ldm), "native", ldm)
    b = write_lora(tmp_path / "dif.safetensors", random_lora(2, 2, 2.0, dif), "kohya", dif)
    ins = [LoraInput.from_file(a), LoraInput.from_file(b)]
    with pytest.raises(MergeError, match="two schemes"):
        merge_loras(ins)
    same_layer = {"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q",
                  "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"}

    def resolve(name):
        hit = [s for s in formats.comfy_lookup_spellings(name) if s in same_layer]
        return "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q" if hit else None

    res = merge_loras(ins, resolve=resolve, dtype="fp32")
    (m,) = res.modules
    assert m.rank == 6 and m.key == "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    assert not res.unmatched
