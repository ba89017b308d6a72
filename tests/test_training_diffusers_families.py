"""The diffusers trainer on the other model families, tiny random folders built from configs: SDXL (two text
encoders, pooled embeddings, size conditioning), SD3 and Flux transformers (rectified flow).  The engine adapters
match diffusers' own pipelines (prompt encoding, time ids, Flux latent packing, x̂0 from the raw prediction), every
method the family allows trains a step and moves the LoRA, 2 processes = 1 process, resume is exact, the LoRA
keys are the spelling ComfyUI maps, and unsupported families are refused with errors naming the class."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("accelerate")
pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffusers_tiny import build_pairs, build_tiny_flux, build_tiny_sd3, build_tiny_sdxl, method_config  # noqa: E402
from test_training_diffusers import _free_port, max_diff  # noqa: E402

from comfy_poe.training.diffusers_model import load_diffusers_model, model_family  # noqa: E402
from comfy_poe.training.launch import parse_config, run  # noqa: E402
from comfy_poe.training.mapo import denoising_losses  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILDERS = {"sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux}
QUIET = {"log": lambda *a, **k: None}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    for name, build in BUILDERS.items():
        build(root / name)
    build_pairs(root / "pairs", n=4, size=16)
    from comfy_poe.selma.dataset import SkillDataset

    data = SkillDataset(root / "skill")
    g = torch.Generator().manual_seed(5)
    for i in range(4):
        data.append(["a red square", "a blue circle"][i % 2], i, i, torch.rand(16, 16, 3, generator=g), True)
    return root


def lora_of(root: Path, name: str) -> dict:
    return load_file(str(root / f"out_{name}" / "lora.safetensors"))


def moved(sd: dict) -> float:
    return max(float(v.abs().max()) for k, v in sd.items() if k.endswith("lora_up.weight"))


# ------------------------------------------------------------------------------------ families and refusals
def test_model_family_and_refusals(root, tmp_path):
    assert [model_family(root / f) for f in ("sdxl", "sd3", "flux")] == ["sdxl", "sd3", "flux"]
    odd = tmp_path / "kandinsky"
    odd.mkdir()
    (odd / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(ValueError, match=r"KandinskyV22Pipeline.*supports SD 1\.x / 2\.x .*SDXL.*SD3.*Flux"):
        model_family(odd)
    pixart = tmp_path / "pixart" / "transformer"
    pixart.mkdir(parents=True)
    (pixart / "config.json").write_text(json.dumps({"_class_name": "PixArtTransformer2DModel"}))
    with pytest.raises(ValueError, match="PixArtTransformer2DModel.*supports"):
        model_family(pixart.parent)
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        model_family(tmp_path)
    with pytest.raises(ValueError, match="KandinskyV22Pipeline"):  # refused before any weight is read
        run(parse_config({**method_config("sdxl", "mapo", "refused"), "model": str(odd)}, root), **QUIET)
    assert not (root / "out_refused").exists()
    with pytest.raises(ValueError, match=r"flux: latents 7×8 must have even sides \(images a multiple of 4 pixels\)"):
        load_diffusers_model(root / "flux").denoise(torch.zeros(1, 16, 7, 8), torch.ones(1), [None])


# ------------------------------------------------------------------------------------ adapters vs diffusers
def test_sdxl_adapter_matches_the_diffusers_pipeline(root):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    model = load_diffusers_model(root / "sdxl")
    pipe = StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoder,
                                     text_encoder_2=model.text_encoder_2, tokenizer=model.tokenizer,
                                     tokenizer_2=model.tokenizer_2, unet=model.unet, scheduler=EulerDiscreteScheduler())
    cond = model.encode_prompt("a red square")
    embeds, _, pooled, _ = pipe.encode_prompt("a red square", device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(cond["context"], embeds)
    torch.testing.assert_close(cond["pooled"], pooled)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 700])
    sigma = model.train_sigmas[t]
    time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32,
                                      text_encoder_projection_dim=model.text_encoder_2.config.projection_dim)
    with torch.no_grad():
        denoised = model.denoise(x0 + sigma.view(-1, 1, 1, 1) * eps, sigma, [cond])[0]
        abar = 1 / (1 + sigma.view(-1, 1, 1, 1) ** 2)
        z = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        eps_hat = model.unet(z, t, encoder_hidden_states=embeds.expand(2, -1, -1),
                             added_cond_kwargs={"text_embeds": pooled.expand(2, -1),
                                                "time_ids": time_ids.expand(2, -1)}).sample
    torch.testing.assert_close(model.time_ids(z), time_ids.expand(2, -1))
    torch.testing.assert_close(denoised, x0 + sigma.view(-1, 1, 1, 1) * (eps - eps_hat), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_adapter_matches_the_diffusers_pipeline(root, family):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    model = load_diffusers_model(root / family)
    enc, tok = model.text_encoders, model.tokenizers
    cond = model.encode_prompt("a red square")
    if family == "sd3":
        pipe = StableDiffusion3Pipeline(transformer=model.transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                        vae=model.vae, text_encoder=enc[0], tokenizer=tok[0], text_encoder_2=enc[1],
                                        tokenizer_2=tok[1], text_encoder_3=enc[2], tokenizer_3=tok[2])
        embeds, _, pooled, _ = pipe.encode_prompt("a red square", None, None, device="cpu",
                                                  do_classifier_free_guidance=False, max_sequence_length=16)
    else:
        pipe = FluxPipeline(transformer=model.transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=model.vae,
                            text_encoder=enc[0], tokenizer=tok[0], text_encoder_2=enc[1], tokenizer_2=tok[1])
        embeds, pooled, _ = pipe.encode_prompt("a red square", None, device="cpu", max_sequence_length=16)
    torch.testing.assert_close(cond["context"], embeds)
    torch.testing.assert_close(cond["pooled"], pooled)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    s = model.flow_sigmas[torch.tensor([30, 800])]
    x_flow = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
    sigma_ve = s / (1 - s)
    with torch.no_grad():
        denoised = model.denoise(x0 + sigma_ve.view(-1, 1, 1, 1) * eps, sigma_ve, [cond])[0]
        if family == "sd3":
            v = model.transformer(hidden_states=x_flow, encoder_hidden_states=embeds.expand(2, -1, -1),
                                  pooled_projections=pooled.expand(2, -1), timestep=s * 1000).sample
        else:
            packed = pipe._pack_latents(x_flow, 2, 16, 8, 8)
            # the pipeline's own ids: (S, 3), or (B, S, 3) on diffusers < 0.31; releases up to 0.31 take the
            # latent size and halve it, later ones take the token grid (4×4 tokens of an 8×8 latent)
            halves = pipe._prepare_latent_image_ids(1, 2, 2, "cpu", torch.float32).shape[-2] == 1
            image_ids = pipe._prepare_latent_image_ids(2, 8 if halves else 4, 8 if halves else 4, "cpu", torch.float32)
            assert model.denoise_flow(x_flow, s, [cond])[0].shape == x_flow.shape
            v = model.transformer(hidden_states=packed, encoder_hidden_states=embeds.expand(2, -1, -1),
                                  pooled_projections=pooled.expand(2, -1), timestep=s, guidance=torch.full((2,), 3.5),
                                  txt_ids=torch.zeros(*image_ids.shape[:-2], embeds.shape[1], 3),
                                  img_ids=image_ids).sample
            # 8×8 latents of a VAE with factor 2 (pixels 16); the releases whose id helper halves also divide the
            # pixel size by the factor of the token grid (2 · 2) here
            v = pipe._unpack_latents(v, 16, 16, 4 if halves else 2)
    torch.testing.assert_close(denoised, x_flow - s.view(-1, 1, 1, 1) * v, rtol=1e-4, atol=1e-4)
    # the preference losses' flow target is the flow-matching MSE of the diffusers SD3 / Flux training scripts
    losses = denoising_losses(denoised, x0, eps, sigma_ve, "const")
    torch.testing.assert_close(losses, ((v - (eps - x0)) ** 2).mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-5)


def test_flow_schedules():
    from comfy_poe.training.diffusers_model import flow_training_sigmas, shift_flow_time

    s = flow_training_sigmas({"num_train_timesteps": 1000, "shift": 3.0})
    assert s.numel() == 1000 and 0 < float(s[0]) < float(s[-1]) < 1 and bool((s[1:] > s[:-1]).all())
    torch.testing.assert_close(s[499], shift_flow_time(torch.tensor(0.4995, dtype=torch.float64), 3.0))
    unshifted = flow_training_sigmas({"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True})
    torch.testing.assert_close(unshifted, (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000)


def test_flow_rollout_chain_spans_the_training_levels(root):
    """The DDPM chain of the rollout methods on a flow model runs from the highest to the lowest training level
    (VE σ = s/(1 − s)); its VP state is the flow state rescaled, z = x_f/√((1 − s)² + s²)."""
    model = load_diffusers_model(root / "sd3")
    chain = model.chain_sigmas(4, (8, 8))
    torch.testing.assert_close(chain[[0, -1]], model.train_sigmas[[-1, 0]])
    assert bool((chain[1:] < chain[:-1]).all())
    s = chain.double() / (1 + chain.double())
    x_flow = torch.randn(5, 3, dtype=torch.float64)
    z = (x_flow / (1 - s[:, None])) / torch.sqrt(1 + chain.double()[:, None] ** 2)
    torch.testing.assert_close(z, x_flow / torch.sqrt((1 - s[:, None]) ** 2 + s[:, None] ** 2))


# ------------------------------------------------------------------------------------ every method trains
METHODS = ("mapo", "dpo", "sft", "selma", "dual-process", "ddpo", "dag-kl", "dag-db")


@pytest.mark.parametrize("family,method", [(f, m) for f in ("sdxl", "sd3", "flux") for m in METHODS])
def test_every_method_trains(root, family, method):
    name = f"{family}_{method}"
    result = run(parse_config(method_config(family, method, name), root), **QUIET)
    assert result.steps_done == 2
    sd = lora_of(root, name)
    assert moved(sd) > 1e-4  # up starts at 0: the step moved the LoRA
    model = load_diffusers_model(root / family)
    paths = {path for path, _ in model.denoiser.named_modules()}
    if family == "sdxl":  # kohya UNet keys over the model's own layers
        layers = {p.replace(".", "_") for p in paths}
        assert all(k.startswith("lora_unet_") and k[len("lora_unet_"):].split(".")[0] in layers for k in sd)
    else:  # diffusers transformer keys (ComfyUI maps "transformer.<path>" for SD3 and Flux)
        assert all(k.startswith("transformer.") and k[len("transformer."):].rsplit(".", 2)[0] in paths
                   for k in sd if not k.endswith(".alpha"))


# ------------------------------------------------------------------------------------ data parallel, resume
def _launch(root: Path, cfg: dict, name: str, processes: int):
    (root / f"{name}.json").write_text(json.dumps(cfg))
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    proc = subprocess.run([sys.executable, *launcher, "-m", "comfy_poe.training", "--config", str(root / f"{name}.json")],
                          cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("family,method", [("sdxl", "mapo"), ("sdxl", "ddpo"), ("sd3", "dpo"), ("flux", "dag-kl")])
def test_two_processes_equal_one(root, family, method):
    for processes in (1, 2):
        name = f"dp{processes}_{family}_{method}"
        _launch(root, method_config(family, method, name), name, processes)
    a, b = lora_of(root, f"dp1_{family}_{method}"), lora_of(root, f"dp2_{family}_{method}")
    assert moved(a) > 1e-4
    # float summation order only: measured 1.8e-5 (SDXL MaPO), 9e-7 (SDXL DDPO), 7e-7 (SD3 DPO), 6e-8 (Flux
    # DAG-KL); two 1-process SDXL MaPO runs at 1 and 2 threads differ by 3.1e-5 (Adam's first steps are about
    # lr·sign(g), lr = 1e-3)
    assert max_diff(a, b) < 1e-4


@pytest.mark.parametrize("family,method", [("sdxl", "mapo"), ("flux", "sft")])
def test_resume_is_exact(root, family, method):
    run(parse_config(method_config(family, method, f"full_{family}", steps=3), root), **QUIET)
    run(parse_config(method_config(family, method, f"cut_{family}", steps=1), root), **QUIET)
    result = run(parse_config(method_config(family, method, f"cut_{family}", steps=3), root), **QUIET)
    assert result.resumed_from == 1
    assert max_diff(lora_of(root, f"full_{family}"), lora_of(root, f"cut_{family}")) == 0.0
