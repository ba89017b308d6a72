"""Every model family users run — SDXL, SD3 and Flux (flow / CONST), Wan 2.1 video (5-D latents) — through the
PoE nodes inside a real ComfyUI server, on tiny random models that ComfyUI's own detection accepts
(make_fixtures.py): regional products through core samplers, the AIS/SMC sampler with Feynman-Kac weights and
judges, PoE Sample, per-frame video masks, interruption, and exact checks of the flow conversion."""
from __future__ import annotations

import re
import time
import uuid

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration

SIZE = 64  # pixels; the latents are 8x8 (Wan: 2 latent frames of 8x8 for 5 pixel frames)
FLOW = ("flux", "sd3", "wan21")
FAMILIES = ("sdxl",) + FLOW
CHANNELS = {"sdxl": 4, "flux": 16, "sd3": 16, "wan21": 16}
SMC = {"particles": 3, "mcmc_steps": 0, "mcmc": "mala", "step_scale": 0.1, "fk_correction": "full",
       "weighting": "incremental", "resampling": "systematic", "ess_threshold": 0.0, "selection": "auto", "eta": 1.0,
       "judge_sigma_max": 1000.0, "judge_sigma_min": 0.0, "tempering": "capped", "twist": False, "chunk_size": 0}


# --------------------------------------------------------------------------- graph helpers


def family_nodes(family: str, files: dict, texts=("a red car", "a green tree"), negative="blurry") -> tuple[dict, dict]:
    """Loader, prompt and latent nodes of one family: ``(nodes, refs)`` with refs ``model``, ``vae``, ``pos``
    (one conditioning per text), ``neg`` and ``latent``. Users' graphs: SDXL = checkpoint + CLIPTextEncodeSDXL (both
    encoders, pooled output, size / crop embeddings); Flux = Load Diffusion Model + FluxGuidance; SD3 = Load
    Diffusion Model; Wan 2.1 = Load Diffusion Model + EmptyHunyuanLatentVideo. Text for the flow families comes
    from a lone CLIP-L via CLIPLoader type sd3 (4096-wide zero-padded context)."""
    n: dict = {}
    if family == "sdxl":
        n["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": files["sdxl"]}}
        model, clip, vae = ["1", 0], ["1", 1], ["1", 2]

        def encode(text):
            return {"class_type": "CLIPTextEncodeSDXL", "inputs": {
                "clip": clip, "width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0, "target_width": 1024,
                "target_height": 1024, "text_g": text, "text_l": text}}
        n["7"] = {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}}
    else:
        unet = {"flux": files["flux"], "sd3": files["sd3"], "wan21": files["wan21"]}[family]
        n["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}}
        n["2"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": files["clip_l"], "type": "sd3", "device": "default"}}
        n["3"] = {"class_type": "VAELoader", "inputs": {"vae_name": files["wan21_vae" if family == "wan21" else "ae16"]}}
        model, clip, vae = ["1", 0], ["2", 0], ["3", 0]

        def encode(text):
            return {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": clip}}
        if family == "wan21":
            n["7"] = {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": SIZE, "height": SIZE, "length": 5, "batch_size": 1}}
        else:
            n["7"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}}
    pos = []
    for i, text in enumerate(texts):
        n[f"4{i}"] = encode(text)
        ref = [f"4{i}", 0]
        if family == "flux":  # flux-dev reads its distilled guidance from the conditioning
            n[f"4{i}g"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ref, "guidance": 3.5}}
            ref = [f"4{i}g", 0]
        pos.append(ref)
    n["6"] = encode(negative)
    return n, {"model": model, "vae": vae, "pos": pos, "neg": ["6", 0], "latent": ["7", 0]}


def half_masks(n: dict, video: bool = False) -> tuple[list | None, list]:
    """Left / right half masks (pixel size). For video, the first expert is the unmasked background and the
    second expert's region moves: a 2-frame mask batch (left half, then right half) that PoE resamples onto the
    latent frames (one mask per frame)."""
    half = SIZE // 2
    n["m0"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": SIZE, "height": SIZE}}
    n["m1"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": half, "height": SIZE}}
    n["mL"] = {"class_type": "MaskComposite", "inputs": {"destination": ["m0", 0], "source": ["m1", 0], "x": 0, "y": 0, "operation": "add"}}
    n["mR"] = {"class_type": "MaskComposite", "inputs": {"destination": ["m0", 0], "source": ["m1", 0], "x": half, "y": 0, "operation": "add"}}
    if not video:
        return ["mL", 0], ["mR", 0]
    n["iL"] = {"class_type": "MaskToImage", "inputs": {"mask": ["mL", 0]}}
    n["iR"] = {"class_type": "MaskToImage", "inputs": {"mask": ["mR", 0]}}
    n["iLR"] = {"class_type": "ImageBatch", "inputs": {"image1": ["iL", 0], "image2": ["iR", 0]}}
    n["mLR"] = {"class_type": "ImageToMask", "inputs": {"image": ["iLR", 0], "channel": "red"}}
    return None, ["mLR", 0]


def add_expert(n: dict, node_id: str, model, positive, negative, cfg: float, weight: float = 1.0,
               mask=None, previous: str | None = None, name: str = "") -> str:
    inputs = {"model": model, "positive": positive, "negative": negative, "cfg": cfg, "weight": weight,
              "feather": 1.0, "name": name or node_id}
    if mask is not None:
        inputs["mask"] = mask
    if previous is not None:
        inputs["experts"] = [previous, 0]
    n[node_id] = {"class_type": "PoEExpert", "inputs": inputs}
    return node_id


def regional_experts(family: str, files: dict, cfg: float, regional: bool = True) -> tuple[dict, dict, str]:
    """Two experts ("a red car", "a green tree"); regional: on the left / right half (video: the second one's
    region moves per frame), else both over the whole image (a true product: total weight 2 everywhere)."""
    n, r = family_nodes(family, files)
    left, right = half_masks(n, video=family == "wan21") if regional else (None, None)
    add_expert(n, "e1", r["model"], r["pos"][0], r["neg"], cfg, mask=left, name="car")
    add_expert(n, "e2", r["model"], r["pos"][1], r["neg"], cfg, mask=right, previous="e1", name="tree")
    return n, r, "e2"


def custom_sampling(n: dict, r: dict, guider, sampler, steps: int = 3, scheduler: str = "simple", seed: int = 5) -> list:
    n["sched"] = {"class_type": "BasicScheduler", "inputs": {"model": r["model"], "scheduler": scheduler, "steps": steps, "denoise": 1.0}}
    n["noise"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}}
    n["sca"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["noise", 0], "guider": guider, "sampler": sampler,
                                                               "sigmas": ["sched", 0], "latent_image": r["latent"]}}
    return ["sca", 0]


def save_latent(n: dict, latent, prefix: str, node_id: str = "save") -> str:
    prefix = f"{prefix}_{uuid.uuid4().hex[:6]}"
    n[node_id] = {"class_type": "SaveLatent", "inputs": {"samples": latent, "filename_prefix": f"latents/{prefix}"}}
    return node_id


def decode_save(n: dict, r: dict, latent, prefix: str) -> None:
    n["dec"] = {"class_type": "VAEDecode", "inputs": {"samples": latent, "vae": r["vae"]}}
    n["img"] = {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": prefix}}


def saved_latent(server, entry: dict, node_id: str = "save") -> torch.Tensor:
    item = entry["outputs"][node_id]["latents"][0]
    path = server.output_dir / item.get("subfolder", "") / item["filename"]
    return load_file(str(path))["latent_tensor"].float()


def check_latent(latent: torch.Tensor, family: str, batch: int = 1) -> None:
    want = (batch, CHANNELS[family], 2, SIZE // 8, SIZE // 8) if family == "wan21" else (batch, CHANNELS[family], SIZE // 8, SIZE // 8)
    assert tuple(latent.shape) == want
    assert torch.isfinite(latent).all()
    assert latent.std() > 0


def ess_trace(entry: dict, node_id: str) -> list[float]:
    text = entry["outputs"][node_id]["text"][0]
    return [float(v) for v in re.search(r"ESS trace: ([\d. ]+)", text).group(1).split()]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, comfy_server, model_fixtures):
    """The family under test. Module scope groups every test of one family together (pytest orders tests by
    higher-scoped parameters), so its models load once; they are freed before the next family (shared RAM)."""
    comfy_server.free()
    yield request.param
    comfy_server.free()


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("sampler_name", ["euler", "dpmpp_2m", "euler_ancestral"])
def test_regional_product_drives_core_samplers(comfy_server, model_fixtures, family, sampler_name):
    """PoE Combine with two regional experts as the GUIDER of ComfyUI's own samplers (euler_ancestral takes its
    rectified-flow branch on the flow families); video experts get one mask per frame."""
    if family not in FLOW and sampler_name == "euler_ancestral":
        pytest.skip("the ancestral EPS branch is covered on SD1.5 (test_poe_comfy.py); here only the RF branch")
    n, r, last = regional_experts(family, model_fixtures, cfg=1.0 if family == "flux" else 4.0)
    n["comb"] = {"class_type": "PoECombine", "inputs": {"experts": [last, 0]}}
    n["ks"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler_name}}
    latent = custom_sampling(n, r, ["comb", 0], ["ks", 0])
    save_latent(n, latent, f"{family}_{sampler_name}")
    decode_save(n, r, latent, f"fam_{family}_{sampler_name}")
    entry = comfy_server.run(n, timeout=600)
    check_latent(saved_latent(comfy_server, entry), family)
    files = comfy_server.output_files(entry)
    assert files and all(f.stat().st_size > 0 for f in files)


def test_feynman_kac_weights_reach_poe_sample(comfy_server, model_fixtures, family):
    """PoE Sample on a product of two full-weight experts over the whole image (no CFG: λ = 1 each, so the FK
    corrector is the only source of weights; disjoint regions would sum to weight 1 and need none): the capture
    channel hands the sampler every expert's prediction, ESS drops below the particle count; outputs finite."""
    n, r, last = regional_experts(family, model_fixtures, cfg=1.0, regional=False)
    n["ps"] = {"class_type": "PoESample", "inputs": {"experts": [last, 0], "latent": r["latent"], "seed": 3, "steps": 3,
                                                     "scheduler": "simple", "denoise": 1.0, **SMC}}
    save_latent(n, ["ps", 0], f"{family}_fk")
    entry = comfy_server.run(n, timeout=600)
    check_latent(saved_latent(comfy_server, entry), family)
    trace = ess_trace(entry, "ps")
    assert min(trace) < SMC["particles"] - 0.01, trace


def test_smc_sampler_with_judges_under_poe_combine(comfy_server, model_fixtures, family):
    """The PoE AIS/SMC SAMPLER inside SamplerCustomAdvanced with PoE Combine, a pixel judge (decoded through the
    family's VAE at every level), a latent judge and FK weights; selection "all" returns every particle."""
    n, r, last = regional_experts(family, model_fixtures, cfg=1.0 if family == "flux" else 3.0)
    n["comb"] = {"class_type": "PoECombine", "inputs": {"experts": [last, 0]}}
    n["j1"] = {"class_type": "PoEImageStatisticsJudge", "inputs": {"brightness": 0.6, "contrast": -1.0, "saturation": -1.0,
                                                                  "tolerance": 0.1, "weight": 2.0}}
    n["refl"] = {"class_type": "EmptySD3LatentImage" if family != "sdxl" else "EmptyLatentImage",
                 "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}}
    if family == "wan21":
        n["refl"] = {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": SIZE, "height": SIZE, "length": 5, "batch_size": 1}}
    n["j2"] = {"class_type": "PoEProximityJudge", "inputs": {"reference_latent": ["refl", 0], "weight": 0.5, "judges": ["j1", 0]}}
    n["smc"] = {"class_type": "PoESMCSampler", "inputs": {**SMC, "mcmc_steps": 1, "selection": "all", "judges": ["j2", 0], "vae": r["vae"]}}
    latent = custom_sampling(n, r, ["comb", 0], ["smc", 0])
    save_latent(n, latent, f"{family}_judged")
    entry = comfy_server.run(n, timeout=600)
    check_latent(saved_latent(comfy_server, entry), family, batch=SMC["particles"])


def _exact_graph(family: str, files: dict, mode: str, cfg: float) -> dict:
    """Same noise, sigmas and euler sampler; the GUIDER is ComfyUI's CFGGuider ("cfg"), PoE Combine with one
    expert ("one"), or PoE Combine with two experts at weight ½ on the same model and the same text encoded twice
    (two conditioning objects, evaluated separately) ("halves"); for the small families the second expert's model
    is a second loader of the same file (a separate ModelPatcher)."""
    n, r = family_nodes(family, files, texts=("a red car", "a red car"))
    n["ks"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    if mode == "cfg":
        guider = {"class_type": "CFGGuider", "inputs": {"model": r["model"], "positive": r["pos"][0], "negative": r["neg"], "cfg": cfg}}
    elif mode == "one":
        add_expert(n, "e1", r["model"], r["pos"][0], r["neg"], cfg)
        guider = {"class_type": "PoECombine", "inputs": {"experts": ["e1", 0]}}
    else:
        model2 = r["model"]
        if family in ("sd3", "wan21"):
            n["1b"] = {"class_type": "UNETLoader", "inputs": dict(n["1"]["inputs"])}
            model2 = ["1b", 0]
        add_expert(n, "e1", r["model"], r["pos"][0], r["neg"], cfg, weight=0.5)
        add_expert(n, "e2", model2, r["pos"][1], r["neg"], cfg, weight=0.5, previous="e1")
        guider = {"class_type": "PoECombine", "inputs": {"experts": ["e2", 0]}}
    n["g"] = guider
    latent = custom_sampling(n, r, ["g", 0], ["ks", 0], steps=4, seed=11)
    save_latent(n, latent, f"{family}_exact_{mode}")
    return n


def test_one_expert_product_equals_comfyui_cfg_and_two_halves_equal_the_model(comfy_server, model_fixtures, family):
    """Exact checks of the product's parameterisation conversion (CONST for the flow families, EPS for SDXL): a
    one-expert product is ComfyUI's own CFG, and λ = ½ + ½ of the same model is the model alone (to float error)."""
    out = {}
    for mode in ("cfg", "one", "halves"):
        entry = comfy_server.run(_exact_graph(family, model_fixtures, mode, cfg=3.0), timeout=600)
        out[mode] = saved_latent(comfy_server, entry)
        check_latent(out[mode], family)
    scale = float(out["cfg"].abs().max())
    assert float((out["one"] - out["cfg"]).abs().max()) <= 1e-5 * max(scale, 1.0)
    assert float((out["halves"] - out["cfg"]).abs().max()) <= 1e-4 * max(scale, 1.0)


def test_interrupt_stops_smc_on_large_and_video_models(comfy_server, model_fixtures, family):
    if family not in ("flux", "wan21"):
        pytest.skip("interruption is checked on the largest (Flux) and the video (Wan) family")
    n, r, last = regional_experts(family, model_fixtures, cfg=1.0)
    n["ps"] = {"class_type": "PoESample", "inputs": {"experts": [last, 0], "latent": r["latent"], "seed": 3, "steps": 400,
                                                     "scheduler": "simple", "denoise": 1.0, **SMC, "particles": 4, "mcmc_steps": 2}}
    save_latent(n, ["ps", 0], f"{family}_interrupted")
    prompt_id, resp = comfy_server.submit(n)
    assert prompt_id is not None, resp
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        if any(item[1] == prompt_id for item in comfy_server.get_json("/queue").get("queue_running", [])):
            break
        time.sleep(0.2)
    time.sleep(5.0)
    comfy_server.interrupt()
    entry = comfy_server.wait(prompt_id, timeout=180)
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds


def test_dual_process_tunes_a_flow_model_and_the_lora_loads(comfy_server, model_fixtures, family, lora_folder):
    """Dual-Process tuning on a flow (CONST) model — the flow Euler one-step path — with a differentiable pixel
    judge; the saved LoRA names MMDiT layers and loads through the core LoraLoaderModelOnly without unloaded
    keys. (Run on SD3: the Flux fixture's 545 M full-width blocks make CPU back-propagation too slow for CI, Wan
    is video, which Dual-Process refuses; SDXL is EPS, the SD1.5 path.)"""
    if family != "sd3":
        pytest.skip("Dual-Process on a flow model is checked on the SD3 fixture")
    n, r = family_nodes(family, model_fixtures, texts=("a photo of a cat",))
    n["j"] = {"class_type": "PoEImageStatisticsJudge", "inputs": {"brightness": 0.7, "contrast": -1.0, "saturation": -1.0,
                                                                 "tolerance": 0.1, "weight": 1.0}}
    n["dp"] = {"class_type": "PoEDualProcessTune", "inputs": {
        "model": r["model"], "vae": r["vae"], "positive": r["pos"][0], "judges": ["j", 0], "latent": r["latent"],
        "steps": 2, "sampling_steps": 1, "scheduler": "simple", "cfg": 1.0, "lr": 0.05, "rank": 2, "alpha": 2.0,
        "lora_scale": 2.0, "targets": "attention", "custom_targets": "", "seed": 3, "pixel_range": "minmax",
        "gradient_checkpointing": False, "precision": "auto", "grad_clip": 1.0, "noise_pool": 10, "eval_images": 0,
        "run_name": "", "checkpoint_every": 1, "resume": False}}
    n["sv"] = {"class_type": "PoESaveTrainedLoRA", "inputs": {"lora": ["dp", 1], "save_name": f"{lora_folder.name}/sd3_dp",
                                                             "overwrite": False}}
    log_start = len(comfy_server.log_text())
    entry = comfy_server.run(n, timeout=900)
    report = entry["outputs"]["dp"]["text"][0]
    assert "Dual-Process tuning: 2 steps" in report, report
    saved = lora_folder / "sd3_dp.safetensors"
    from safetensors import safe_open
    with safe_open(str(saved), framework="pt") as f:
        keys = set(f.keys())
    assert keys and any("joint_blocks" in k and "attn.qkv" in k for k in keys), sorted(keys)[:5]
    m, rr = family_nodes(family, model_fixtures, texts=("a photo of a cat",))
    m["L"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": rr["model"], "lora_name": f"{lora_folder.name}/sd3_dp.safetensors",
                                                             "strength_model": 1.0}}
    m["ks"] = {"class_type": "KSampler", "inputs": {"model": ["L", 0], "positive": rr["pos"][0], "negative": rr["neg"],
                                                    "latent_image": rr["latent"], "seed": 1, "steps": 2, "cfg": 1.0,
                                                    "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    save_latent(m, ["ks", 0], "sd3_lora")
    check_latent(saved_latent(comfy_server, comfy_server.run(m, timeout=600)), family)
    log = comfy_server.log_text()[log_start:]
    assert not [line for line in log.splitlines() if "lora key not loaded" in line or "NOT LOADED" in line]
