"""PoE nodes inside a real ComfyUI server: guider with core samplers, the Feynman-Kac channel,
interruption and bad graphs (run on the tiny random-weight SD1.5 checkpoint)."""
import re
import time

import pytest

pytestmark = pytest.mark.integration

SMC = {"particles": 4, "mcmc_steps": 0, "mcmc": "mala", "step_scale": 0.1, "fk_correction": "full",
       "weighting": "incremental", "resampling": "systematic", "ess_threshold": 0.5, "selection": "auto", "eta": 1.0,
       "judge_sigma_max": 1000.0, "judge_sigma_min": 0.0, "tempering": "constant", "twist": False, "chunk_size": 0}


def _base(ckpt, experts=2, cfg=4.0, size=(64, 64)):
    p = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red car", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a green tree", "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "5": {"class_type": "PoEExpert", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["4", 0],
                                                   "cfg": cfg, "weight": 1.0, "feather": 1.0, "name": "car"}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": size[0], "height": size[1], "batch_size": 1}},
    }
    last = "5"
    if experts == 2:
        p["6"] = {"class_type": "PoEExpert", "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                       "cfg": cfg, "weight": 1.0, "feather": 1.0, "experts": ["5", 0], "name": "tree"}}
        last = "6"
    return p, last


def _sample_node(experts_from, steps=4, **smc):
    return {"class_type": "PoESample", "inputs": {"experts": [experts_from, 0], "latent": ["7", 0], "seed": 3, "steps": steps,
                                                  "scheduler": "karras", "denoise": 1.0, **{**SMC, **smc}}}


def _decode_save(p, latent_from, prefix):
    p["90"] = {"class_type": "VAEDecode", "inputs": {"samples": [latent_from, 0], "vae": ["1", 2]}}
    p["91"] = {"class_type": "SaveImage", "inputs": {"images": ["90", 0], "filename_prefix": prefix}}
    return p


def _ess_trace(entry, node_id):
    text = entry["outputs"][node_id]["text"][0]
    return [float(v) for v in re.search(r"ESS trace: ([\d. ]+)", text).group(1).split()]


@pytest.mark.parametrize("sampler_name", ["euler", "dpmpp_2m"])
def test_poe_guider_drives_core_samplers(comfy_server, tiny_checkpoint_name, sampler_name):
    p, last = _base(tiny_checkpoint_name)
    p["8"] = {"class_type": "PoECombine", "inputs": {"experts": [last, 0]}}
    p["9"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler_name}}
    p["10"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 4, "denoise": 1.0}}
    p["11"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}}
    p["12"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["11", 0], "guider": ["8", 0], "sampler": ["9", 0],
                                                                "sigmas": ["10", 0], "latent_image": ["7", 0]}}
    entry = comfy_server.run(_decode_save(p, "12", f"poe_guider_{sampler_name}"))
    files = comfy_server.output_files(entry)
    assert len(files) == 1 and files[0].stat().st_size > 0


def test_feynman_kac_weights_reach_the_smc_sampler_inside_comfyui(comfy_server, tiny_checkpoint_name):
    """A product of two full-weight experts gets non-trivial FK weights (ESS < particles) through the
    capture channel; one expert (λ = 1, nothing to correct) keeps ESS = particles exactly."""
    traces = {}
    for n in (1, 2):
        p, last = _base(tiny_checkpoint_name, experts=n, cfg=1.0)
        p["20"] = _sample_node(last, steps=4, particles=4, ess_threshold=0.0)
        entry = comfy_server.run(_decode_save(p, "20", f"poe_fk_{n}"))
        traces[n] = _ess_trace(entry, "20")
    assert all(v == pytest.approx(4.0) for v in traces[1])
    assert min(traces[2]) < 3.99


def test_smc_sampler_node_reports_through_the_report_node(comfy_server, tiny_checkpoint_name):
    """PoE AIS/SMC Sampler inside SamplerCustomAdvanced: PoE SMC Report shows resampling, ESS, the guard and the
    Hutchinson trace calls of the default Λ-aware weights (two full-weight experts: Λ = 2)."""
    p, last = _base(tiny_checkpoint_name, cfg=1.0)
    p["8"] = {"class_type": "PoECombine", "inputs": {"experts": [last, 0]}}
    p["9"] = {"class_type": "PoESMCSampler", "inputs": {**SMC, "particles": 3}}
    p["10"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "karras", "steps": 3, "denoise": 1.0}}
    p["11"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}}
    p["12"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["11", 0], "guider": ["8", 0], "sampler": ["9", 0],
                                                                "sigmas": ["10", 0], "latent_image": ["7", 0]}}
    p["13"] = {"class_type": "PoESMCReport", "inputs": {"sampler": ["9", 0], "latent": ["12", 0]}}
    entry = comfy_server.run(_decode_save(p, "12", "poe_smc_report"))
    text = entry["outputs"]["13"]["text"][0]
    assert "resampled at" in text and "ESS trace" in text and "min ESS/L" in text
    assert "proposal lambda" in text and "trace hutchinson" in text and "collapse guard" in text
    assert "for Hutchinson trace probes" in text


def test_selection_all_returns_every_particle(comfy_server, tiny_checkpoint_name):
    p, last = _base(tiny_checkpoint_name)
    p["20"] = _sample_node(last, particles=3, selection="all")
    entry = comfy_server.run(_decode_save(p, "20", "poe_all_particles"))
    assert len(comfy_server.output_files(entry)) == 3


def test_interrupt_stops_a_long_smc_run_cleanly(comfy_server, tiny_checkpoint_name):
    p, last = _base(tiny_checkpoint_name)
    p["20"] = _sample_node(last, steps=400, particles=8, mcmc_steps=2)
    prompt_id, resp = comfy_server.submit(_decode_save(p, "20", "poe_interrupted"))
    assert prompt_id is not None, resp
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:  # wait until sampling has started (progress reached the log or queue)
        queue = comfy_server.get_json("/queue")
        if any(item[1] == prompt_id for item in queue.get("queue_running", [])):
            break
        time.sleep(0.2)
    time.sleep(3.0)
    comfy_server.interrupt()
    entry = comfy_server.wait(prompt_id, timeout=120)
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    assert time.monotonic() - t0 < 100
    # the server is healthy afterwards
    p2, last2 = _base(tiny_checkpoint_name, experts=1)
    p2["20"] = _sample_node(last2, steps=2, particles=2)
    comfy_server.run(_decode_save(p2, "20", "poe_after_interrupt"))


def test_zero_particles_and_bad_options_are_node_errors_naming_the_input(comfy_server, tiny_checkpoint_name):
    p, last = _base(tiny_checkpoint_name)
    p["20"] = _sample_node(last, particles=0)
    prompt_id, resp = comfy_server.submit(_decode_save(p, "20", "poe_bad"))
    assert prompt_id is None and "20" in resp["node_errors"]
    assert "particles" in str(resp["node_errors"]["20"])
    p["20"] = _sample_node(last, weighting="bogus")
    prompt_id, resp = comfy_server.submit(p)
    assert prompt_id is None and "weighting" in str(resp["node_errors"]["20"])


def test_mask_of_the_wrong_shape_is_an_error_naming_the_expert(comfy_server, tiny_checkpoint_name):
    p, last = _base(tiny_checkpoint_name, experts=1, size=(96, 64))
    p["30"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
    p["5"]["inputs"]["mask"] = ["30", 0]
    p["20"] = _sample_node(last)
    prompt_id, _ = comfy_server.submit(_decode_save(p, "20", "poe_badmask"))
    entry = comfy_server.wait(prompt_id, timeout=120)
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and "mask of expert 1" in errors[0]["exception_message"]
    assert errors[0]["node_id"] == "20"
