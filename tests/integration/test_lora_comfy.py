"""LoRA Merge inside a real ComfyUI: merged files load with the core LoraLoader and change the output.

Three tiny random LoRAs are built for the tiny SD1.5 checkpoint's real layer shapes (read from its
safetensors header), one per key format, with different ranks and alphas:
  A kohya (LDM names, rank 8, incl. a LoCon 3×3 conv and CLIP-L q/v), B ComfyUI-native (rank 4, alpha 1),
  C diffusers/PEFT with the plain spelling ComfyUI itself drops (rank 2, names in the diffusers scheme).
They are written to a temporary sub-folder of models/loras, removed afterwards.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.integration

UNET_ATTN = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q")
CONV = "input_blocks.1.0.in_layers.2"          # 3×3 conv of the first resnet (LoCon)
TE = ("self_attn.q_proj", "self_attn.v_proj")
PEFT_LAYER = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",   # diffusers name of
              "input_blocks.1.1.transformer_blocks.0.attn1.to_q")            # this LDM layer


def checkpoint_shapes(path: Path) -> dict[str, tuple]:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def lora_layers(shapes):
    """{(component, dotted path): weight shape} for the chosen layers of the checkpoint."""
    unet = "model.diffusion_model."
    te = "cond_stage_model.transformer."
    layers = {}
    for k, shape in shapes.items():
        if k.startswith(unet) and k.endswith(".weight"):
            path = k[len(unet):-len(".weight")]
            if path.endswith(UNET_ATTN) or path == CONV:
                layers[("unet", path)] = shape
        elif k.startswith(te + "text_model.encoder.layers.") and k.endswith(".weight"):
            path = k[len(te):-len(".weight")]
            layer = int(path.split(".")[3])
            if layer < 2 and path.endswith(TE):
                layers[("te", path)] = shape
    assert ("unet", CONV) in layers and ("unet", PEFT_LAYER[1]) in layers, sorted(layers)[:5]
    return layers


def random_factors(shape, rank, g):
    down = torch.randn((rank, *shape[1:]), generator=g) / math.sqrt(math.prod(shape[1:]))
    up = torch.randn((shape[0], rank, *[1] * (len(shape) - 2)), generator=g) / math.sqrt(rank)
    return up, down


def build_loras(folder: Path, layers) -> dict[str, str]:
    g = torch.Generator().manual_seed(0)
    a, b = {}, {}
    for (comp, path), shape in layers.items():
        up, down = random_factors(shape, 8, g)
        key = ("lora_unet_" if comp == "unet" else "lora_te_") + path.replace(".", "_")
        a.update({f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.alpha": torch.tensor(8.0)})
        if len(shape) == 2:
            up, down = random_factors(shape, 4, g)
            key = ("diffusion_model." if comp == "unet" else "text_encoders.clip_l.transformer.") + path
            b.update({f"{key}.lora_up.weight": 4 * up, f"{key}.lora_down.weight": down,
                      f"{key}.alpha": torch.tensor(1.0)})
    up, down = random_factors(layers[("unet", PEFT_LAYER[1])], 2, g)
    c = {f"unet.{PEFT_LAYER[0]}.lora_A.weight": down, f"unet.{PEFT_LAYER[0]}.lora_B.weight": up}
    names = {}
    for label, sd in (("a_kohya_r8", a), ("b_native_r4", b), ("c_peft_r2", c)):
        save_file({k: v.half().contiguous() for k, v in sd.items()}, str(folder / f"{label}.safetensors"))
        names[label] = f"{folder.name}/{label}.safetensors"
    return names


def txt2img(prefix, model, clip, extra=None, ckpt=None):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": clip}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": clip}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": model, "positive": ["2", 0], "negative": ["3", 0],
              "latent_image": ["4", 0], "seed": 42, "steps": 4, "cfg": 7.0, "sampler_name": "euler",
              "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }
    prompt.update(extra or {})
    return prompt


def image_of(server, entry):
    (path,) = server.output_files(entry)
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def stack(*items):
    nodes, prev = {}, None
    for i, (name, w) in enumerate(items):
        inputs = {"lora_name": name, "weight": w, "clip_weight": w}
        if prev:
            inputs["lora_stack"] = [prev, 0]
        prev = f"s{i}"
        nodes[prev] = {"class_type": "PoELoraStack", "inputs": inputs}
    return nodes, prev


def test_merged_lora_loads_with_core_loader_and_changes_output(comfy_server, tiny_checkpoint_name, lora_folder):
    ckpt_path = comfy_server.comfy_dir / "models" / "checkpoints" / tiny_checkpoint_name
    layers = lora_layers(checkpoint_shapes(ckpt_path))
    names = build_loras(lora_folder, layers)
    log_start = len(comfy_server.log_text())
    run = lambda p: comfy_server.run(p, timeout=600)
    ck = tiny_checkpoint_name

    base = image_of(comfy_server, run(txt2img("lora_base", ["1", 0], ["1", 1], ckpt=ck)))

    # 1. merge A (kohya) + 0.5·B (native) exactly in the node, sample with the node's MODEL/CLIP
    nodes, last = stack((names["a_kohya_r8"], 1.0), (names["b_native_r4"], 0.5))
    save_name = f"{lora_folder.name}/merged_ab"
    nodes["m"] = {"class_type": "PoELoraMerge", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_stack": [last, 0], "method": "concat", "rank": 0,
        "density": 0.5, "seed": 0, "save_name": save_name, "dtype": "fp16", "overwrite": False, "block_weights": ""}}
    entry = run(txt2img("lora_node", ["m", 0], ["m", 1], nodes, ckpt=ck))
    node_img = image_of(comfy_server, entry)
    merged = lora_folder / "merged_ab.safetensors"
    assert merged.is_file()
    report = entry["outputs"]["m"]["text"][0]
    assert "NOT MERGED" not in report and "match no layer" not in report, report

    # 2. the same file through the core LoraLoader, and A then B applied one after another
    loader = {"L": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
              "lora_name": f"{save_name}.safetensors", "strength_model": 1.0, "strength_clip": 1.0}}}
    loader_img = image_of(comfy_server, run(txt2img("lora_loader", ["L", 0], ["L", 1], loader, ckpt=ck)))
    seq = {"LA": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                  "lora_name": names["a_kohya_r8"], "strength_model": 1.0, "strength_clip": 1.0}},
           "LB": {"class_type": "LoraLoader", "inputs": {"model": ["LA", 0], "clip": ["LA", 1],
                  "lora_name": names["b_native_r4"], "strength_model": 0.5, "strength_clip": 0.5}}}
    seq_img = image_of(comfy_server, run(txt2img("lora_seq", ["LB", 0], ["LB", 1], seq, ckpt=ck)))

    changed = np.abs(loader_img - base).mean()
    seq_gap = np.abs(loader_img - seq_img).mean()
    print(f"mean |Δ| vs base {changed:.2f}/255, merged vs sequential {seq_gap:.3f}/255")
    assert changed > 5.0, f"merged LoRA barely changes the image (mean |Δ| = {changed:.2f}/255)"
    assert np.array_equal(node_img, loader_img)               # node output == core LoraLoader on the file
    assert seq_gap < 0.1 * changed, f"merge differs from sequential A→B: {seq_gap:.2f} vs effect {changed:.2f}"

    # 3. all three formats, svd to rank 6: the PEFT spelling ComfyUI drops is matched through the model
    nodes, last = stack((names["a_kohya_r8"], 1.0), (names["b_native_r4"], 0.5), (names["c_peft_r2"], 1.0))
    nodes["m"] = {"class_type": "PoELoraMerge", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_stack": [last, 0], "method": "svd", "rank": 6,
        "density": 0.5, "seed": 0, "save_name": f"{lora_folder.name}/merged_abc_svd6", "dtype": "fp16",
        "overwrite": False, "block_weights": ""}}
    entry = run(txt2img("lora_svd", ["m", 0], ["m", 1], nodes, ckpt=ck))
    report = entry["outputs"]["m"]["text"][0]
    print(report.split("modules:")[0])
    assert "retained energy" in report and "NOT MERGED" not in report, report
    target = f"diffusion_model.{PEFT_LAYER[1]}"
    assert f"{target}  rank 6 <- [1]r8 + [2]r4 + [3]r2" in report, report
    with safe_open(str(lora_folder / "merged_abc_svd6.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        recipe = json.loads(f.metadata()["comfy_poe.lora_merge"])
    assert all(k.startswith(("diffusion_model.", "text_encoders.clip_l.")) for k in keys), sorted(keys)[:5]
    assert f"{target}.lora_down.weight" in keys and recipe["method"] == "svd" and len(recipe["inputs"]) == 3

    log = comfy_server.log_text()[log_start:]
    not_loaded = [line for line in log.splitlines() if "lora key not loaded" in line or "NOT LOADED" in line]
    assert not not_loaded, "\n".join(not_loaded[:20])

    # 4. a traversal save name is refused at validation, before anything runs or is written
    nodes["m"]["inputs"]["save_name"] = "../../evil"
    prompt_id, resp = comfy_server.submit(txt2img("lora_bad", ["m", 0], ["m", 1], nodes, ckpt=ck))
    assert prompt_id is None and "leave the LoRA folder" in json.dumps(resp["node_errors"]), resp
    assert not (comfy_server.comfy_dir / "models" / "evil.safetensors").exists()


def test_bad_merge_inputs_are_clear_errors_and_write_nothing(comfy_server, tiny_checkpoint_name, lora_folder):
    """Validation time where the input is a widget (block_weights, save_name); a NaN factor in a stacked file
    (known only when the node runs) fails the prompt with the file and tensor named, nothing saved."""
    ckpt_path = comfy_server.comfy_dir / "models" / "checkpoints" / tiny_checkpoint_name
    layers = lora_layers(checkpoint_shapes(ckpt_path))
    names = build_loras(lora_folder, layers)
    a = load_file(str(lora_folder / "a_kohya_r8.safetensors"))
    poisoned = next(k for k in a if k.endswith("lora_up.weight"))
    a[poisoned][0, 0] = float("nan")
    save_file(a, str(lora_folder / "nan.safetensors"))
    ck = tiny_checkpoint_name

    def merge_prompt(lora, **inputs):
        nodes, last = stack((lora, 1.0))
        nodes["m"] = {"class_type": "PoELoraMerge", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_stack": [last, 0], "method": "concat", "rank": 0,
            "density": 0.5, "seed": 0, "save_name": f"{lora_folder.name}/bad_out", "dtype": "fp16",
            "overwrite": False, "block_weights": "", **inputs}}
        return txt2img("lora_bad_input", ["m", 0], ["m", 1], nodes, ckpt=ck)

    prompt_id, resp = comfy_server.submit(merge_prompt(names["a_kohya_r8"], block_weights="input_blocks=half"))
    assert prompt_id is None and "PATTERN=WEIGHT" in json.dumps(resp["node_errors"]), resp
    prompt_id, _ = comfy_server.submit(merge_prompt(f"{lora_folder.name}/nan.safetensors"))
    assert prompt_id is not None
    status = comfy_server.wait(prompt_id, timeout=600)["status"]
    messages = json.dumps(status["messages"])
    assert status["status_str"] == "error" and "nan.safetensors" in messages and poisoned in messages, messages
    assert "NaN/inf" in messages
    assert not (lora_folder / "bad_out.safetensors").exists()
