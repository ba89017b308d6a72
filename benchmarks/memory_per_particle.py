"""Peak memory per particle of the PoE samplers: what a GPU user needs to pick a particle count.

    COMFY_POE_COMFYUI_DIR=ComfyUI /path/to/comfy/venv/bin/python benchmarks/memory_per_particle.py \\
        --family flux --size 512 --batches 1,2,3

Each row runs one model forward (ComfyUI's own model classes, loaded from the integration fixtures that
``tests/integration/make_fixtures.py`` builds, ``--models-dir``) on a batch of B latents in a fresh process and
reports the resident-memory peak above the loaded-model baseline (sampled every 2 ms from /proc). The slope over B
is the activation memory of one model-batch item at that resolution; the SMC sampler's own state is latents
(computed exactly). Families: ``flux`` (the fixture has Flux's full 3072-wide blocks, 24 heads, so one block's
working set, which is the forward's peak in inference, is that of the real model), ``sd15`` (the tiny SD1.5: its
first, full-resolution level is SD1.5's, the level whose attention dominates), ``sd3`` / ``wan21`` (narrow fixtures:
their numbers are lower bounds, not the real models'). CPU numbers; on a GPU, activations are of the same order
(attention kernels there avoid materialising the score matrices, so they are upper bounds).

    peak ≈ W + min(L, chunk) · K · a(size) + L · (3 + 2·K) · latent_bytes

W weights, L particles, K conditionings evaluated per particle (experts' positives plus distinct negatives;
K = 2 for one expert with CFG), ``chunk`` the sampler's ``chunk_size`` (0 = L), a(size) the slope printed here,
latent_bytes = C · (T ·) H/8 · W/8 · 4.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

FILES = {"flux": ("diffusion_models", "tiny_flux_dev.safetensors"), "sd3": ("diffusion_models", "tiny_sd3.safetensors"),
         "wan21": ("diffusion_models", "tiny_wan21_t2v.safetensors"), "sd15": ("checkpoints", "tiny_random_sd15.safetensors")}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(family: str, size: int, batch: int, models_dir: Path, comfy_dir: Path) -> dict:
    sys.path.insert(0, str(comfy_dir))
    import torch
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.sd
    folder, name = FILES[family]
    path = str(models_dir / folder / name)
    if family == "sd15":
        patcher = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False)[0]
    else:
        patcher = comfy.sd.load_diffusion_model(path)
    model = patcher.model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    h = w = size // 8
    channels = model.latent_format.latent_channels
    shape = (batch, channels, 2, h, w) if family == "wan21" else (batch, channels, h, w)
    x = torch.randn(shape)
    sigma = torch.full((batch,), 0.5)
    ctx = {"sd15": 768, "flux": 4096, "sd3": 4096, "wan21": 4096}[family]
    kwargs = {"c_crossattn": torch.randn(batch, 77, ctx)}
    if family in ("flux", "sd3"):
        kwargs["y"] = torch.randn(batch, 2048)
    if family == "flux":
        kwargs["guidance"] = torch.full((batch,), 3.5)
    dtype = model.get_dtype()
    x, kwargs = x.to(dtype), {k: v.to(dtype) for k, v in kwargs.items()}
    with torch.inference_mode():
        model.apply_model(x[:1], sigma[:1], **{k: v[:1] for k, v in kwargs.items()})  # warm-up (lazy inits)
    base, peak, stop = rss_bytes(), [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    t0 = time.time()
    with torch.inference_mode():
        out = model.apply_model(x, sigma, **kwargs)
    seconds = time.time() - t0
    stop.set()
    t.join()
    peak[0] = max(peak[0], rss_bytes())
    assert torch.isfinite(out.float()).all()
    return {"family": family, "size": size, "batch": batch, "weights_mib": weights / 2**20,
            "activation_mib": (peak[0] - base) / 2**20, "seconds": seconds, "dtype": str(dtype),
            "latent_bytes": x[:1].numel() * 4}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=sorted(FILES), default="flux")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--batches", default="1,2,3", help="model batch sizes B (particles × conditionings)")
    ap.add_argument("--comfy-dir", default=os.environ.get("COMFY_POE_COMFYUI_DIR", ""))
    ap.add_argument("--models-dir", default=None, help="default: <comfy-dir>/models")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if not a.comfy_dir:
        ap.error("--comfy-dir (or COMFY_POE_COMFYUI_DIR) is required")
    comfy_dir = Path(a.comfy_dir).resolve()
    models = Path(a.models_dir).resolve() if a.models_dir else comfy_dir / "models"
    batches = [int(b) for b in a.batches.split(",")]
    if a.child:
        print(json.dumps(child(a.family, a.size, batches[0], models, comfy_dir)))
        return 0
    rows = []
    for b in batches:
        cmd = [sys.executable, __file__, "--child", "--family", a.family, "--size", str(a.size), "--batches", str(b),
               "--comfy-dir", str(comfy_dir), "--models-dir", str(models)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{a.family} at {a.size}x{a.size} px, weights {rows[0]['weights_mib']:.0f} MiB ({rows[0]['dtype']}), "
          f"latent {rows[0]['latent_bytes'] / 2**10:.1f} KiB per particle (fp32)")
    print("| batch B | activation peak (MiB) | forward (s) |")
    print("|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['activation_mib']:.0f} | {r['seconds']:.2f} |")
    if len(rows) > 1:
        n = len(rows)
        mb = sum(r["batch"] for r in rows) / n
        ma = sum(r["activation_mib"] for r in rows) / n
        slope = sum((r["batch"] - mb) * (r["activation_mib"] - ma) for r in rows) / sum((r["batch"] - mb) ** 2 for r in rows)
        print(f"a({a.size}px) = {slope:.0f} MiB per model-batch item (least-squares slope), intercept {ma - slope * mb:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
