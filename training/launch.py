"""Train a LoRA on a local diffusers model folder from a config file, on one or many processes:

    python -m comfy_poe.training --config run.toml                              # one process
    accelerate launch --multi_gpu --num_processes 8 -m comfy_poe.training --config run.toml  # 8 GPUs
    torchrun --nproc_per_node 2 -m comfy_poe.training --config run.toml   # 2 processes (CPU: gloo)

The config is TOML (tomllib) or JSON (by the file suffix):

    method = "mapo"                 # mapo | dpo | sft | dag-kl | dag-db | ddpo | selma | dual-process
    model = "/models/sd15-diffusers"  # a pipeline's save_pretrained folder (safetensors): SD 1.x/2.x, SDXL, SD3, Flux
    output = "runs/mapo-1"          # checkpoint folder; the LoRA is <output>/lora.safetensors
    resolution = 512                # pairs resized to this (square) size / rollout image size (pixels)
    resume = true                   # continue from <output> when it holds a checkpoint of this run
    dtype = "float32"               # float32 | bfloat16 | float16 (frozen weights; the LoRA trains in float32)
    pairs = "/data/pairs"           # preference methods: <root>/<pair>/{prompt.txt, chosen.png, rejected.png}
    prompts = ["a cat", "a dog"]    # rollout methods: prompts cycled one per step
    reward = "brightness"           # rollout methods: brightness | jpeg-compressibility | jpeg-incompressibility, or
    [reward]                        # a model: kind = pickscore | hps | imagereward | aesthetic | vlm | clip, path,
                                    # prompt / question, weight ... ([[reward]]s sum; training.rewards.JudgeSpec)
    sampling_steps = 20             # rollout methods: DDPM transitions per chain (evenly spaced training levels)
    cfg = 1.0                       # rollout methods: CFG of the behaviour policy (negative = "" prompt)
    [lora]                          # LoRAConfig: rank, alpha, targets, exclude, init
    [loop]                          # LoopConfig: steps, lr, weight_decay, grad_clip, seed, checkpoint_every, ...
    [preference]                    # PreferenceConfig: batch_size (global), beta_mapo, snr_value, beta_dpo, ...
    [rollout]                       # RolloutConfig: batch_size (global chains), timestep_fraction, reward_exp, ...
    dataset = "/data/skill"         # selma: a SELMA skill dataset folder (the pack's SELMA dataset nodes)
    preset = "small"                # selma: reference | small | tiny, then [selma]: SkillTrainConfig overrides
    prompt = "a cat"                # dual-process: the prompt; judge = "brightness" or {kind = "vlm", path, question,
                                    # answer} (differentiable: brightness or a model, as [reward]); [dual_process]

Data parallel (Accelerate's PartialState sets up the process group: NCCL on GPUs, gloo on CPU): every rank
draws the same step batch from the seeded step generators and works on its contiguous block of
batch_size / world_size pairs or chains (a rank samples its own chains: the noise of the whole batch is drawn,
its rows are used); batch statistics (DDPO's reward standardisation, DAG-KL's leave-one-out advantages) are
taken over all ranks' chains (all_gather); the gradients (LoRA and DAG flow network) are averaged over ranks
(all-reduce) before clipping and the AdamW step, so all ranks hold the same weights and the run equals the
one-process run with the same global batch (up to float summation order). Only rank 0 writes checkpoints;
every rank reads them on resume.

The saved LoRA uses the kohya spelling of the diffusers UNet paths (lora_unet_..., SD 1.x / SDXL) or the diffusers
spelling of the transformer paths (transformer..., SD3 / Flux), which ComfyUI's LoraLoader maps onto the matching
model.  The model family comes from the folder (diffusers_model.model_family); every method trains every family
(on SD3 / Flux the rollout methods' DDPM chain runs on the flow's x̂0, see DiffusersFlow.chain_sigmas).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from ..experts.base import X0
from ..extras import exit_unless_installed
from .alignment import (
    ROLLOUT_METHODS, PreferenceConfig, PreferenceTrainer, RewardRolloutTrainer, RolloutConfig, check_rollout_method,
)
from .lora import LoRAConfig, create_lora
from .loop import CheckpointStore, LoopConfig, StepOutput, train
from .mapo import check_method
from .rewards import MODEL_FREE_REWARDS, JudgeLoader, JudgeSpec, parse_judge_specs, reward_function

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOP_KEYS = {"method", "model", "pairs", "output", "resolution", "resume", "dtype", "lora", "loop", "preference",
            "rollout", "prompts", "negative", "reward", "sampling_steps", "cfg", "dataset", "preset", "selma",
            "dual_process", "prompt", "judge"}
NOT_YET = ()
DUAL_PROCESS_NAMES = ("dual-process", "dualprocess", "dual_process")
JUDGES = ("brightness",)   # the model-free differentiable judges; reward models and VLMs come from folders
REWARDS = MODEL_FREE_REWARDS


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


def _section(base, values, name: str, skip=()):
    """``base`` (a dataclass instance holding the method's defaults) with the config section's values."""
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(base)} - set(skip)
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"config [{name}]: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    for key in ("betas", "crop", "flow_channels"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    return dataclasses.replace(base, **values)


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
    preference: PreferenceConfig | None = None
    rollout: RolloutConfig | None = None
    prompts: tuple = ()
    negative: str = ""
    reward: tuple = (JudgeSpec("brightness"),)   # JudgeSpecs (training.rewards)
    sampling_steps: int = 20
    cfg: float = 1.0
    dataset: str = ""
    selma: object = None   # selma.trainer.SkillTrainConfig
    dual_process: object = None   # dual_process.DualProcessConfig
    prompt: str = ""
    judge: tuple = (JudgeSpec("brightness"),)

    @property
    def trainer_config(self):
        return next(c for c in (self.preference, self.rollout, self.selma, self.dual_process) if c is not None)


def parse_config(raw: dict, base: Path | None = None) -> RunConfig:
    """Validate a config dict (paths relative to ``base``, the config file's folder) before any work starts."""
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise ValueError(f"config: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(TOP_KEYS))})")
    missing = [k for k in ("method", "model", "output") if not raw.get(k)]
    if missing:
        raise ValueError(f"config: {', '.join(missing)} must be set")
    method = str(raw["method"]).strip().lower()
    if method.replace("_", "-").replace(" ", "-") in NOT_YET:
        raise ValueError(f"config: method {raw['method']!r} is not available in the diffusers trainer yet "
                         "(available: mapo, dpo, sft, dag-kl, dag-db, ddpo, selma); train it inside ComfyUI with the "
                         "pack's nodes")
    if raw.get("dtype", "float32") not in DTYPES:
        raise ValueError(f"config: dtype must be one of {', '.join(DTYPES)}, got {raw.get('dtype')!r}")
    if method == "selma":
        return parse_selma(raw, base or Path.cwd())
    if method in DUAL_PROCESS_NAMES:
        return parse_dual_process(raw, base or Path.cwd())
    try:
        method = check_method(method)
        rollout = False
    except ValueError:
        try:
            method = check_rollout_method(method)
        except ValueError:
            raise ValueError(f"config: method must be one of mapo, dpo, sft, {', '.join(ROLLOUT_METHODS)}; "
                             f"got {raw['method']!r}") from None
        rollout = True
    if str(raw.get("dtype", "float32")) not in DTYPES:
        raise ValueError(f"config: dtype must be one of {', '.join(DTYPES)}, got {raw.get('dtype')!r}")
    base = base or Path.cwd()

    def where(p):
        return str(Path(p) if Path(p).is_absolute() else base / p)

    common = dict(method=method, model=where(raw["model"]), output=where(raw["output"]),
                  resolution=int(raw.get("resolution", 0)), resume=bool(raw.get("resume", True)),
                  dtype=str(raw.get("dtype", "float32")), lora=_section(LoRAConfig(), raw.get("lora"), "lora"))
    if not rollout:
        if raw.get("rollout") or raw.get("prompts"):
            raise ValueError(f"config: [rollout] and prompts belong to dag-kl / dag-db / ddpo, not {method}")
        if not raw.get("pairs"):
            raise ValueError(f"config: method {method} needs pairs = <preference folder>")
        preference = _section(PreferenceConfig(method=method), raw.get("preference"), "preference", skip=("method", "loop"))
        preference.loop = _section(preference.loop, raw.get("loop"), "loop")
        preference.validate()
        return RunConfig(pairs=where(raw["pairs"]), preference=preference, **common)
    if raw.get("preference") or raw.get("pairs"):
        raise ValueError(f"config: [preference] and pairs belong to mapo / dpo / sft, not {method}")
    prompts = raw.get("prompts")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"config: method {method} needs prompts = [\"...\", ...] (non-empty strings)")
    reward = parse_judge_specs(raw.get("reward", "brightness"), base, "reward", REWARDS, default_mode="yes_no")
    if not common["resolution"]:
        raise ValueError(f"config: method {method} needs resolution = <image size of the rollouts, pixels>")
    steps = int(raw.get("sampling_steps", 20))
    if steps < 1:
        raise ValueError(f"config: sampling_steps must be >= 1, got {steps}")
    rollout_cfg = _section(RolloutConfig(method=method), raw.get("rollout"), "rollout", skip=("method", "loop"))
    rollout_cfg.loop = _section(rollout_cfg.loop, raw.get("loop"), "loop")
    rollout_cfg.validate()
    return RunConfig(pairs="", rollout=rollout_cfg, prompts=tuple(prompts), negative=str(raw.get("negative", "")),
                     reward=reward, sampling_steps=steps, cfg=float(raw.get("cfg", 1.0)), **common)


class VEDenoiser:
    """A flow model's ``denoise`` (VE coordinates, x̂0 = x_f − s·v̂) seen as an x̂0 predictor: what a DDPM chain
    (rollout.Policy) needs; see DiffusersFlow.chain_sigmas."""

    parameterization = X0

    def __init__(self, model):
        self.model = model

    def denoise(self, x, sigma, conds):
        return self.model.denoise(x, sigma, conds)


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


def parse_selma(raw: dict, base: Path) -> RunConfig:
    """SELMA skill LoRA: dataset = a SkillDataset folder (the pack's SELMA dataset nodes), preset + [selma]."""
    from ..selma.trainer import SkillTrainConfig, preset_config

    wrong = sorted(set(raw) & {"lora", "loop", "preference", "rollout", "pairs", "prompts", "reward"})
    if wrong:
        raise ValueError(f"config: {', '.join(wrong)} do not apply to selma (its LoRA and loop settings are in "
                         "[selma]: rank, alpha, targets, lr, steps, batch_size, micro_batch, seed, ...)")
    if not raw.get("dataset"):
        raise ValueError("config: method selma needs dataset = <SELMA skill dataset folder>")
    selma = preset_config(str(raw.get("preset", "reference")))
    selma = _section(selma, raw.get("selma"), "selma")
    selma.validate()

    def where(p):
        return str(Path(p) if Path(p).is_absolute() else base / p)

    return RunConfig(method="selma", model=where(raw["model"]), pairs="", output=where(raw["output"]),
                     resolution=int(raw.get("resolution", 0)), resume=bool(raw.get("resume", True)),
                     dtype=str(raw.get("dtype", "float32")), dataset=where(raw["dataset"]), selma=selma)


def parse_dual_process(raw: dict, base: Path) -> RunConfig:
    """Dual-Process: one prompt, a differentiable judge, [dual_process] = DualProcessConfig, [lora], [loop]."""
    from .dual_process import DualProcessConfig

    wrong = sorted(set(raw) & {"preference", "rollout", "selma", "pairs", "prompts", "reward", "dataset", "preset"})
    if wrong:
        raise ValueError(f"config: {', '.join(wrong)} do not apply to dual-process")
    if not str(raw.get("prompt", "")).strip():
        raise ValueError("config: method dual-process needs prompt = \"...\"")
    judge = parse_judge_specs(raw.get("judge", "brightness"), base, "judge", JUDGES, default_mode="dual_process")
    if not int(raw.get("resolution", 0)):
        raise ValueError("config: method dual-process needs resolution = <image size, pixels>")
    dual = _section(DualProcessConfig(), raw.get("dual_process"), "dual_process", skip=("loop",))
    dual.loop = _section(dual.loop, raw.get("loop"), "loop")
    dual.validate()

    def where(p):
        return str(Path(p) if Path(p).is_absolute() else base / p)

    steps = int(raw.get("sampling_steps", 20))
    if steps < 1:
        raise ValueError(f"config: sampling_steps must be >= 1, got {steps}")
    return RunConfig(method="dual-process", model=where(raw["model"]), pairs="", output=where(raw["output"]),
                     resolution=int(raw["resolution"]), resume=bool(raw.get("resume", True)),
                     dtype=str(raw.get("dtype", "float32")), lora=_section(LoRAConfig(), raw.get("lora"), "lora"),
                     dual_process=dual, prompt=str(raw["prompt"]), negative=str(raw.get("negative", "")), judge=judge,
                     sampling_steps=steps, cfg=float(raw.get("cfg", 1.0)))


def run_dual_process(config: RunConfig, state, model, network, store, progress):
    """Dual-Process tuning (training.dual_process.tune) on this process's share of every step's noises."""
    from .diffusers_model import FLOW_FAMILIES
    from .dual_process import Generator, tune

    world = state.num_processes
    if world > 1 and config.dual_process.pixel_range == "minmax":
        raise ValueError("dual_process pixel_range 'minmax' rescales over the whole batch, which ranks do not share; "
                         "use pixel_range = 'clamp' (or 'none') with several processes")
    cond, negative = model.encode_prompt(config.prompt), model.encode_prompt(config.negative)
    side = config.resolution // model.vae_factor
    if model.family in FLOW_FAMILIES:  # Euler on the flow itself (dual_process's CONST form), times 1 -> 0
        model_denoise, sigmas = model.denoise_flow, model.sampling_sigmas(config.sampling_steps, (side, side))
    else:
        model_denoise = model.denoise
        sigmas = torch.cat([model.sampling_sigmas(config.sampling_steps), torch.zeros(1)])

    def denoise(x, sigma):
        if config.cfg == 1.0:
            return model_denoise(x, sigma, [cond])[0]
        d_cond, d_uncond = model_denoise(x, sigma, [cond, negative])
        return d_uncond + config.cfg * (d_cond - d_uncond)

    generator = Generator(denoise, sigmas, (model.latent_channels, side, side), model.parameterization,
                          decode=model.decode_latents, device=state.device)
    judges = JudgeLoader(config.judge, device=state.device).judges(config.prompt)  # each rank loads its own copy
    judge_fp = judges_fingerprint(config.judge)
    return tune(generator, judges, network, config.dual_process, checkpoints=store,
                resume=config.resume, fingerprint={"model": Path(config.model).name, "prompt": config.prompt,
                                                   "cfg": config.cfg, "lora": config.lora.fingerprint(),
                                                   **({} if judge_fp == "brightness" else {"judge": judge_fp})},
                progress=progress, shard=(state.process_index, world),
                reduce_gradients=gradient_averager(world) if world > 1 else None,
                wrap_step=(lambda step_fn: global_values(step_fn, world)) if world > 1 else None)


def run_selma(config: RunConfig, state, model, log):
    """One SELMA skill LoRA on this process's share (selma.trainer.train_skill_lora, the pack's SELMA core)."""
    from ..selma.trainer import train_skill_lora
    from .diffusers_model import FLOW_FAMILIES

    if model.parameterization not in ("eps", "const"):
        raise ValueError(f"SELMA trains EPS (or flow) models; this UNet predicts {model.parameterization}")
    world = state.num_processes
    if model.family in FLOW_FAMILIES:  # SELMA's flow-matching loss in the model's own coordinates
        denoise, sigmas = (lambda x, s, c: model.denoise_flow(x, s, [c])[0]), model.flow_sigmas
    else:
        denoise, sigmas = (lambda x, s, c: model.denoise(x, s, [c])[0]), model.train_sigmas

    def progress(step, total, record):
        if state.is_main_process:
            log(f"step {step}/{total} loss {record['loss']:.5f} grad_norm {record['grad_norm']:.4f}", flush=True)

    return train_skill_lora(config.dataset, model.denoiser, denoise, model.encode_prompt, model.encode_images,
                            config=config.selma, sigmas=sigmas, parameterization=model.parameterization,
                            device=state.device, run_dir=config.output, resume=config.resume,
                            export=lambda net: net.export_state_dict(key_fn=model.lora_key),
                            metadata={"comfy_poe.method": "selma", "comfy_poe.base_model": Path(config.model).name},
                            progress=progress, shard=(state.process_index, world),
                            reduce_gradients=gradient_averager(world) if world > 1 else None,
                            writer=state.is_main_process)


def gather_rows(world_size: int):
    """``gather(t)``: the ranks' equal-sized (b/world, ...) tensors concatenated in rank order (all_gather)."""
    import torch.distributed as dist

    def gather(t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    return gather


def judges_fingerprint(specs) -> object:
    """The judges' part of a run fingerprint: the bare name for one model-free reward (as before models came)."""
    fps = [s.fingerprint() for s in specs]
    return fps[0] if len(fps) == 1 and isinstance(fps[0], str) else fps


def reward_fns_for(specs, prompts, decode, device):
    """One reward function per prompt (reward models score against the chain's own prompt); the models are
    loaded once on this rank's device and shared."""
    loader = JudgeLoader(specs, device=device)
    return [reward_function(loader.judges(p), decode=decode) for p in prompts]


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

    from .diffusers_model import FLOW_FAMILIES, load_diffusers_model, model_family
    from .preference import load_preference_folder

    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: gloo process group for CPU ranks
    rank, world = state.process_index, state.num_processes
    cfg = config.trainer_config
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} (the global batch) must be a multiple of the {world} processes")
    model_family(config.model)  # an unsupported folder is refused before any weight is read
    model = load_diffusers_model(config.model, device=state.device, dtype=DTYPES[config.dtype])
    if config.selma is not None:
        result = run_selma(config, state, model, log)
        state.wait_for_everyone()
        if state.is_main_process:
            log(result.summary(), flush=True)
            log(f"LoRA: {Path(config.output) / 'lora.safetensors'} ({world} process(es), {result.steps_done} steps, "
                f"resumed from step {result.resumed_from})", flush=True)
        return result
    network = create_lora(model.denoiser, config.lora, seed=cfg.loop.seed, device=state.device).attach(model.denoiser)
    if config.dual_process is not None:
        store = CheckpointStore(config.output, export=lambda net: net.export_state_dict(key_fn=model.lora_key),
                                metadata={"comfy_poe.method": "dual-process",
                                          "comfy_poe.base_model": Path(config.model).name},
                                writer=state.is_main_process)

        def progress(step, total, record):
            if state.is_main_process:
                log(f"step {step}/{total} loss {record['loss']:.5f} grad_norm {record['grad_norm']:.4f}", flush=True)

        result = run_dual_process(config, state, model, network, store, progress)
        if state.is_main_process:  # the final LoRA at the evaluation weight (eval_scale folded into alpha)
            from ..lora.io import atomic_write_safetensors

            atomic_write_safetensors(store.lora_path, network.export_state_dict(key_fn=model.lora_key),
                                     metadata={**store.metadata, "comfy_poe.training_step": str(result.steps_done)})
        state.wait_for_everyone()
        if state.is_main_process:
            log(f"LoRA: {store.lora_path} ({world} process(es), {result.steps_done} steps, resumed from step "
                f"{result.resumed_from})", flush=True)
        return result
    if config.preference is not None:
        pairs = load_preference_folder(config.pairs, size=config.resolution or None)
        reference = WithoutLoRA(model, network) if cfg.method == "dpo" else None
        trainer = PreferenceTrainer(model, pairs, model.encode_images, model.encode_prompt, network, cfg,
                                    model.train_sigmas, reference=reference, parameterization=model.parameterization)
        trainable, extra = network, {}
    else:
        from .rollout import Policy

        side = config.resolution // model.vae_factor
        # the chain needs x̂0 in VE coordinates, which every family's denoise gives (flow models included)
        chain_model = VEDenoiser(model) if model.family in FLOW_FAMILIES else model
        policy = Policy(chain_model, model.chain_sigmas(config.sampling_steps, (side, side)),
                        (model.latent_channels, side, side),
                        cfg=config.cfg, negative=model.encode_prompt(config.negative), device=state.device)
        trainer = RewardRolloutTrainer(policy, [model.encode_prompt(p) for p in config.prompts],
                                       reward_fns_for(config.reward, config.prompts, model.decode_latents,
                                                      state.device), network, cfg,
                                       prompt_names=list(config.prompts))
        if world > 1:
            trainer.gather = gather_rows(world)
        trainable = trainer.trainable
        extra = {"reward": judges_fingerprint(config.reward), "sampling_steps": config.sampling_steps, "cfg": config.cfg,
                 "negative": config.negative}
    trainer.shard = (rank, world)
    store = CheckpointStore(config.output, export=lambda net: net.export_state_dict(key_fn=model.lora_key),
                            metadata={"comfy_poe.method": cfg.method, "comfy_poe.base_model": Path(config.model).name,
                                      "comfy_poe.world_size": str(world)},
                            writer=state.is_main_process)

    def progress(step, total, record):
        if state.is_main_process:
            log(f"step {step}/{total} loss {record['loss']:.5f} grad_norm {record['grad_norm']:.4f}", flush=True)

    step_fn = trainer.step if world == 1 else global_values(trainer.step, world)
    # the global batch is part of the run's identity; the number of processes is not
    result = train(trainable, step_fn, cfg.loop, checkpoints=store, resume=config.resume,
                   fingerprint={**trainer.fingerprint(), **extra, "model": Path(config.model).name,
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
                                     description=__doc__.split("\n\nThe config")[0],
                                     epilog="The config file format and the data-parallel rules: docs/scale_out.md.")
    parser.add_argument("--config", required=True, help="run config, .toml or .json (see docs/scale_out.md)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if the output holds a checkpoint")
    args = parser.parse_args(argv)
    exit_unless_installed("train", "The diffusers trainer")
    try:
        config = parse_config(read_config(args.config), Path(args.config).resolve().parent)
        if args.no_resume:
            config.resume = False
        run(config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
