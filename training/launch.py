"""Train a LoRA on a local diffusers model folder from a config file, on one or many processes:

    python -m comfy_poe.training --config run.toml                              # one process
    accelerate launch --num_processes 8 -m comfy_poe.training --config run.toml  # 8 GPUs, one node
    torchrun --nproc_per_node 2 -m comfy_poe.training --config run.toml          # same, with torchrun

The config is TOML (tomllib) or JSON (by the file suffix):

    method = "mapo"                 # mapo | dpo | sft (preference pairs)
    model = "/models/sd15-diffusers"  # StableDiffusionPipeline.save_pretrained folder (safetensors)
    pairs = "/data/pairs"           # <root>/<pair>/{prompt.txt, chosen.png, rejected.png}
    output = "runs/mapo-1"          # checkpoint folder; the LoRA is <output>/lora.safetensors
    resolution = 512                # pairs resized to this (square) size; 0: keep the first pair's size
    resume = true                   # continue from <output> when it holds a checkpoint of this run
    dtype = "float32"               # float32 | bfloat16 | float16 (frozen weights; the LoRA trains in float32)
    [lora]                          # LoRAConfig: rank, alpha, targets, exclude, init
    [loop]                          # LoopConfig: steps, lr, weight_decay, grad_clip, seed, checkpoint_every, ...
    [preference]                    # PreferenceConfig: batch_size (global), beta_mapo, snr_value, beta_dpo, ...

Data parallel (Accelerate's PartialState sets up the process group: NCCL on GPUs, gloo on CPU): every rank
draws the same step batch from the seeded step generator and trains on its contiguous block of
batch_size / world_size pairs; the LoRA gradients are averaged over ranks (all-reduce) before clipping and the
AdamW step, so all ranks hold the same LoRA and the run equals the one-process run with the same global batch
(up to float summation order). Only rank 0 writes checkpoints; every rank reads them on resume.

The saved LoRA uses the kohya spelling of the diffusers UNet paths (lora_unet_...), which ComfyUI's LoraLoader
maps onto the matching single-file checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from .alignment import PreferenceConfig, PreferenceTrainer
from .lora import LoRAConfig, create_lora
from .loop import CheckpointStore, LoopConfig, StepOutput, train
from .mapo import check_method

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOP_KEYS = {"method", "model", "pairs", "output", "resolution", "resume", "dtype", "lora", "loop", "preference"}
ROLLOUT_NAMES = ("dag-kl", "dag-db", "ddpo", "dual-process", "selma")


def read_config(path: str | Path) -> dict:
    """A config file as a dict: TOML (.toml, tomllib) or JSON (.json)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            with open(path, "rb") as f:
                return tomllib.load(f)
        if path.suffix.lower() == ".json":
            return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"config {path}: {e}") from None
    raise ValueError(f"config {path}: use a .toml or .json file")


def _section(cls, values, name: str):
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"config [{name}]: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    for key in ("betas", "crop"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    return cls(**values)


@dataclasses.dataclass
class RunConfig:
    method: str
    model: str
    pairs: str
    output: str
    resolution: int = 0
    resume: bool = True
    dtype: str = "float32"
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    preference: PreferenceConfig = dataclasses.field(default_factory=PreferenceConfig)


def parse_config(raw: dict, base: Path | None = None) -> RunConfig:
    """Validate a config dict (paths relative to ``base``, the config file's folder) before any work starts."""
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise ValueError(f"config: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(TOP_KEYS))})")
    missing = [k for k in ("method", "model", "output") if not raw.get(k)]
    if missing:
        raise ValueError(f"config: {', '.join(missing)} must be set")
    method = str(raw["method"]).strip().lower()
    if method.replace("_", "-") in ROLLOUT_NAMES:
        raise ValueError(f"config: method {raw['method']!r} is not available in the diffusers trainer yet "
                         "(available: mapo, dpo, sft); train it inside ComfyUI with the pack's nodes")
    method = check_method(method)
    if not raw.get("pairs"):
        raise ValueError(f"config: method {method} needs pairs = <preference folder>")
    if str(raw.get("dtype", "float32")) not in DTYPES:
        raise ValueError(f"config: dtype must be one of {', '.join(DTYPES)}, got {raw.get('dtype')!r}")
    base = base or Path.cwd()

    def where(p):
        return str(Path(p) if Path(p).is_absolute() else base / p)

    loop = _section(LoopConfig, raw.get("loop"), "loop")
    preference = _section(PreferenceConfig, {**(raw.get("preference") or {}), "method": method}, "preference")
    preference.loop = loop
    preference.validate()
    return RunConfig(method=method, model=where(raw["model"]), pairs=where(raw["pairs"]), output=where(raw["output"]),
                     resolution=int(raw.get("resolution", 0)), resume=bool(raw.get("resume", True)),
                     dtype=str(raw.get("dtype", "float32")), lora=_section(LoRAConfig, raw.get("lora"), "lora"),
                     preference=preference)


class WithoutLoRA:
    """The model with the LoRA switched off (adapter weight 0): Diffusion-DPO's frozen reference, no copy."""

    def __init__(self, model, network):
        self.model, self.network = model, network
        self.parameterization = model.parameterization

    @torch.no_grad()
    def denoise(self, x, sigma, conds):
        scale, self.network.scale = self.network.scale, 0.0
        try:
            return self.model.denoise(x, sigma, conds)
        finally:
            self.network.scale = scale


def gradient_averager(world_size: int):
    """``reduce(grads)``: all-reduce (sum) the flattened gradients, divide by the world size, in place."""
    import torch.distributed as dist

    def reduce(grads):
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    return reduce


def global_values(step_fn, world_size: int):
    """Wrap a step so the recorded loss and metrics are the means over all ranks (what one process would
    record for the whole batch) while the gradient stays this rank's own: loss + (mean − loss).detach()."""
    import torch.distributed as dist

    def step(k: int) -> StepOutput:
        out = step_fn(k)
        names = sorted(out.metrics)
        values = torch.tensor([float(out.loss.detach())] + [float(out.metrics[n]) for n in names], dtype=torch.float64)
        dist.all_reduce(values)
        values /= world_size
        loss = out.loss + (values[0].to(out.loss) - out.loss.detach())
        return StepOutput(loss, {n: float(v) for n, v in zip(names, values[1:].tolist())})

    return step


def run(config: RunConfig, log=print):
    """Train on this process's share (see module docstring); returns the core loop's TrainResult."""
    from accelerate import PartialState

    from .diffusers_model import kohya_unet_key, load_diffusers_sd
    from .preference import load_preference_folder

    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: gloo process group for CPU ranks
    rank, world = state.process_index, state.num_processes
    cfg = config.preference
    if cfg.batch_size % world:
        raise ValueError(f"preference batch_size {cfg.batch_size} (the global batch) must be a multiple of the "
                         f"{world} processes")
    model = load_diffusers_sd(config.model, device=state.device, dtype=DTYPES[config.dtype])
    pairs = load_preference_folder(config.pairs, size=config.resolution or None)
    network = create_lora(model.unet, config.lora, seed=cfg.loop.seed, device=state.device).attach(model.unet)
    reference = WithoutLoRA(model, network) if cfg.method == "dpo" else None
    trainer = PreferenceTrainer(model, pairs, model.encode_images, model.encode_prompt, network, cfg,
                                model.train_sigmas, reference=reference, parameterization=model.parameterization)
    trainer.shard = (rank, world)
    store = CheckpointStore(config.output, export=lambda net: net.export_state_dict(key_fn=kohya_unet_key),
                            metadata={"comfy_poe.method": cfg.method, "comfy_poe.base_model": Path(config.model).name,
                                      "comfy_poe.world_size": str(world)},
                            writer=state.is_main_process)

    def progress(step, total, record):
        if state.is_main_process:
            log(f"step {step}/{total} loss {record['loss']:.5f} grad_norm {record['grad_norm']:.4f}", flush=True)

    step_fn = trainer.step if world == 1 else global_values(trainer.step, world)
    # the global batch is part of the run's identity; the number of processes is not
    result = train(network, step_fn, cfg.loop, checkpoints=store, resume=config.resume,
                   fingerprint={**trainer.fingerprint(), "model": Path(config.model).name,
                                "resolution": config.resolution, "lora": config.lora.fingerprint(),
                                "dtype": config.dtype},
                   progress=progress, reduce_gradients=gradient_averager(world) if world > 1 else None)
    state.wait_for_everyone()
    if state.is_main_process:
        log(f"LoRA: {store.lora_path} ({world} process(es), {result.steps_done} steps, resumed from step "
            f"{result.resumed_from})", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comfy_poe.training",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description=__doc__.split("\n\n")[0], epilog="See docs/scale_out.md.")
    parser.add_argument("--config", required=True, help="run config, .toml or .json (see docs/scale_out.md)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if the output holds a checkpoint")
    args = parser.parse_args(argv)
    try:
        import accelerate  # noqa: F401
    except ImportError:
        print("error: the diffusers trainer needs accelerate: pip install 'comfy-poe[train]'", file=sys.stderr)
        return 2
    try:
        config = parse_config(read_config(args.config), Path(args.config).resolve().parent)
        if args.no_resume:
            config.resume = False
        run(config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
