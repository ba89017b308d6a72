"""Alignment trainers on the training core (:mod:`.loop`): reward rollouts (DAG-KL, DAG-DB, DDPO) and
preferences (MaPO, Diffusion-DPO, SFT).  Both train a LoRA (plus, for DAG, the flow network F_φ) with the
core's seeded AdamW loop, so progress, interruption, atomic checkpoints, exact resume and curves come for free.

Reward rollouts, one optimiser step per training step (the reference's epoch with one gradient update):
  1. prompt k = (step − 1) mod |prompts|; sample ``batch_size`` DDPM chains (η = 1, CFG) with the current
     LoRA, storing states, log p_old, ε̂ and the final reward r(x_N) (:mod:`.rollout`);
  2. each chain contributes ⌊N·timestep_fraction⌋ transitions (its own random order, as the reference);
  3. per transition slot: the method's loss (:mod:`.gflownet`), averaged over the batch and the slots; the
     gradient is accumulated slot by slot (the reference's backward per transition) so memory does not grow
     with the number of transitions.
Preferences, one step = one minibatch of pairs: joint augmentation, encoding, ONE noise and ONE timestep
per pair for both images, then the MaPO / DPO / SFT loss (:mod:`.mapo`).
"""
from __future__ import annotations

import copy
import gc
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .gflownet import (
    FlowNetwork, dag_db_loss, dag_kl_loss, ddpo_loss, leave_one_out_advantages, proximal_term, reward_temperature,
    standardised_advantages,
)
from .lora import LoRANetwork
from .loop import CheckpointStore, LoopConfig, StepOutput, TrainResult, step_generator, train
from .mapo import check_method, denoising_losses, dpo_loss, mapo_loss, sft_loss
from .preference import PreferencePairs, joint_augment
from .rollout import Policy, Trajectories, from_vp, rollout, transition_log_probs

ROLLOUT_METHODS = ("dag-kl", "dag-db", "ddpo")
ROLLOUT_STREAM, ORDER_STREAM, PAIR_STREAM = 11, 12, 13


def check_rollout_method(method: str) -> str:
    key = str(method).strip().lower().replace("_", "-").replace(" ", "-")
    key = {"dagkl": "dag-kl", "dagdb": "dag-db", "kl": "dag-kl", "db": "dag-db"}.get(key.replace("-", ""), key)
    if key not in ROLLOUT_METHODS:
        raise ValueError(f"reward method must be one of DAG-KL, DAG-DB, DDPO; got {method!r}")
    return key


# ------------------------------------------------------------------------------------------ trainable set
class TrainableSet(nn.Module):
    """The LoRA plus auxiliary trainable modules (the flow network) seen by the core loop as one LoRA network:
    every parameter is optimised, checkpointed and resumed; only the LoRA is exported as the LoRA file."""

    def __init__(self, lora: LoRANetwork, extras: dict[str, nn.Module]):
        super().__init__()
        self.lora = lora
        self.extras = nn.ModuleDict(extras)

    @property
    def adapters(self):
        return self.lora.adapters

    @property
    def scale(self) -> float:
        return self.lora.scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.lora.scale = float(value)

    def named_lora_parameters(self) -> dict[str, nn.Parameter]:
        params = dict(self.lora.named_lora_parameters())
        for name, module in self.extras.items():
            for pname, p in module.named_parameters():
                params[f"aux.{name}.{pname}"] = p
        return params

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Parameter groups whose gradient norms are clipped separately: the LoRA, then each extra module.
        One global norm would let the flow network's gradient (norms 100–1000 once β·r is large) shrink the
        LoRA's step ~1000× and stall the policy (measured: DAG-KL +0.02 instead of +0.75 reward on digits)."""
        groups = self.lora.clip_groups() + [list(module.parameters()) for module in self.extras.values()]
        return [g for g in groups if g]

    def export_state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.lora.export_state_dict(*args, **kwargs)


# ------------------------------------------------------------------------------------------ rollouts
@dataclass
class RolloutConfig:
    """Reference defaults (DAG-GFlowNet ``config/sd.yaml``; DDPO): AdamW 3e-4, wd 1e-4, clip 1, β_max 100 with a
    linear anneal over the first half, proximal weight 1, PPO clip 1e-4, advantages clipped to ±5."""

    method: str = "dag-kl"
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(lr=3e-4, weight_decay=1e-4, grad_clip=1.0))
    batch_size: int = 8              # chains per step (one prompt); DAG-KL needs >= 2
    timestep_fraction: float = 1.0   # share of each chain's transitions trained on
    reward_exp: float = 100.0        # β_max
    anneal: str = "linear"           # linear | none
    anneal_steps: int = 0            # epochs of the anneal horizon (0: the run's steps)
    unetreg: float = 1.0             # proximal term weight (DAG only)
    klpf: float = 1.0                # weight of DAG-KL's REINFORCE term
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    flow_channels: tuple = (32, 64, 128)
    flow_emb_dim: int = 128

    def validate(self) -> None:
        self.method = check_rollout_method(self.method)
        self.loop.validate()
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.method == "dag-kl" and int(self.batch_size) < 2:
            raise ValueError("DAG-KL uses leave-one-out advantages: batch_size must be >= 2")
        if self.method == "ddpo" and int(self.batch_size) < 2:
            raise ValueError("DDPO standardises rewards over the batch: batch_size must be >= 2")
        if not 0 < float(self.timestep_fraction) <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        for name in ("reward_exp", "unetreg", "klpf", "clip_range", "adv_clip"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if self.anneal not in ("linear", "none"):
            raise ValueError(f"anneal must be 'linear' or 'none', got {self.anneal!r}")

    def fingerprint(self) -> dict:
        d = asdict(self)
        d.pop("loop")
        d["flow_channels"] = list(d["flow_channels"])
        return d


def trained_transitions(n_steps: int, fraction: float) -> int:
    """⌊N·fraction⌋ (the reference's ``int``), at least one."""
    return max(1, min(n_steps, int(n_steps * float(fraction) + 1e-9)))


class RewardRolloutTrainer:
    """DAG-KL / DAG-DB / DDPO on a :class:`~.rollout.Policy` whose model has ``network`` (a LoRA) applied.

    prompts:   conditionings accepted by ``policy.model.denoise`` (cycled, one per step);
    reward_fn: final latents (B, C, H, W) -> (B,) rewards (:func:`.rewards.reward_function`), or one such
               function per prompt (judges that score an image against the prompt it was made from).
    """

    def __init__(self, policy: Policy, prompts: Sequence[Any], reward_fn: Callable[[torch.Tensor], torch.Tensor],
                 network: LoRANetwork, config: RolloutConfig, prompt_names: Optional[Sequence[str]] = None):
        config.validate()
        if len(prompts) == 0:
            raise ValueError("prompts: give at least one conditioning to train on")
        self.policy, self.prompts, self.config = policy, list(prompts), config
        self.reward_fns = list(reward_fn) if isinstance(reward_fn, (list, tuple)) else [reward_fn] * len(self.prompts)
        if len(self.reward_fns) != len(self.prompts):
            raise ValueError(f"reward_fn: {len(self.reward_fns)} reward functions for {len(self.prompts)} prompts")
        self.prompt_names = list(prompt_names) if prompt_names is not None else [str(i) for i in range(len(prompts))]
        self.network = network
        self.flow = None
        self.trainable: nn.Module = network
        if config.method != "ddpo":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(config.loop.seed))
                self.flow = FlowNetwork(policy.latent_shape[0], tuple(config.flow_channels), n_prompts=len(self.prompts),
                                        emb_dim=int(config.flow_emb_dim))
            first = next(iter(network.named_lora_parameters().values()))
            self.flow.to(device=first.device)
            self.trainable = TrainableSet(network, {"flow": self.flow})
        # data parallel: (rank, world size), and gather(local (b/world,) tensor) -> the batch's (b,) in rank order
        self.shard, self.gather = (0, 1), None

    def batch_rows(self) -> slice:
        rank, world = self.shard
        b = int(self.config.batch_size)
        return slice(rank * b // world, (rank + 1) * b // world)

    def across_batch(self, fn, values: torch.Tensor, clip: float) -> torch.Tensor:
        """``fn(values of the whole batch, clip)`` restricted to this rank's rows (batch statistics over ranks)."""
        if self.gather is None:
            return fn(values, clip)
        return fn(self.gather(values), clip)[self.batch_rows()]

    # -- pieces ------------------------------------------------------------------------------------
    @torch.no_grad()
    def lookahead_reward(self, z: torch.Tensor, sigma: torch.Tensor, cond, prompt_index: int = 0) -> torch.Tensor:
        """r(decode(x̂0(x_t))) with the current LoRA model, conditional, no CFG, no gradient (reference)."""
        x = from_vp(z, sigma)
        x0 = self.policy.denoised(x, sigma, cond, guided=False)
        return self.reward_fns[prompt_index](x0).float().to(z.device)

    def beta(self, step: int) -> float:
        horizon = int(self.config.anneal_steps) or int(self.config.loop.steps)
        return reward_temperature(step - 1, horizon, self.config.reward_exp, self.config.anneal)

    def step(self, step: int) -> StepOutput:
        cfg, policy = self.config, self.policy
        prompt_index = (step - 1) % len(self.prompts)
        cond = self.prompts[prompt_index]
        mine = self.batch_rows()
        traj = rollout(policy, cond, int(cfg.batch_size), step_generator(cfg.loop.seed, step, ROLLOUT_STREAM),
                       self.reward_fns[prompt_index], rows=mine)
        n, b = traj.n_steps, int(cfg.batch_size)
        k = trained_transitions(n, cfg.timestep_fraction)
        order = step_generator(cfg.loop.seed, step, ORDER_STREAM)
        perms = torch.stack([torch.randperm(n, generator=order) for _ in range(b)])[mine]
        beta = self.beta(step)
        advantages = (self.across_batch(standardised_advantages, traj.rewards, cfg.adv_clip)
                      if cfg.method == "ddpo" else None)
        rows = torch.arange(traj.rewards.shape[0])
        accumulated, last, info = 0.0, None, {"log_pf": 0.0, "flow": 0.0, "proximal": 0.0}
        for j in range(k):
            losses, parts = self.transition_losses(traj, rows, perms[:, j], prompt_index, beta, advantages)
            slot_loss = losses.mean() / k
            for key, value in parts.items():
                info[key] = info.get(key, 0.0) + float(value) / k
            if j < k - 1:
                slot_loss.backward()  # free this slot's graph now (gradient accumulation, as the reference)
                accumulated += float(slot_loss.detach())
            else:
                last = slot_loss
        loss = last + accumulated  # value: the whole step's loss; gradient: the last slot (the rest is in .grad)
        all_rewards = traj.rewards if self.gather is None else self.gather(traj.rewards)
        metrics = {"reward": float(all_rewards.mean()), "reward_std": float(all_rewards.std(unbiased=False)),
                   "beta": beta, "trajectories": float(step * b), **info}
        return StepOutput(loss, metrics)

    def transition_losses(self, traj: Trajectories, rows: torch.Tensor, idx: torch.Tensor, prompt_index: int,
                          beta: float, advantages: Optional[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        cfg, policy, cond = self.config, self.policy, traj.cond
        z_t, z_s = traj.states[rows, idx], traj.states[rows, idx + 1]
        sig_t, sig_s = traj.sigmas[idx].to(z_t.device), traj.sigmas[idx + 1].to(z_t.device)
        log_pf, log_pb, eps = transition_log_probs(policy, z_t, z_s, sig_t, sig_s, cond)
        log_old = traj.log_probs[rows, idx]
        parts = {"log_pf": log_pf.detach().mean()}
        if cfg.method == "ddpo":
            return ddpo_loss(advantages.to(log_pf), log_pf, log_old, cfg.clip_range), parts
        # forward-looking flows: log F(x) = F_φ(x, t, c) + β·r(x̂0(x)); the chain's end is β·r(x_N) exactly
        flow_t = self.flow(z_t, sig_t, prompt_index) + beta * self.lookahead_reward(z_t, sig_t, cond, prompt_index)
        terminal = (idx + 1 == traj.n_steps).to(z_t.device)
        reward_next = beta * traj.rewards.float().clone()
        inner = ~terminal
        if inner.any():
            reward_next[inner] = beta * self.lookahead_reward(z_s[inner], sig_s[inner], cond, prompt_index)
        flow_raw = self.flow(z_s, sig_s, prompt_index)
        flow_s = torch.where(terminal, beta * traj.rewards.float(), flow_raw + reward_next)
        if cfg.method == "dag-db":
            losses = dag_db_loss(flow_t, log_pf, log_pb, flow_s)
        else:
            losses, extra = dag_kl_loss(flow_t, log_pf, log_pb, flow_s, log_old, cfg.klpf, cfg.clip_range,
                                        cfg.adv_clip,
                                        advantage_fn=lambda d, c: self.across_batch(leave_one_out_advantages, d, c))
            parts["policy_loss"] = extra["policy_loss"].mean()
        if cfg.unetreg > 0:
            prox = proximal_term(eps, traj.eps[rows, idx])
            losses = losses + cfg.unetreg * prox
            parts["proximal"] = prox.detach().mean()
        parts["flow"] = flow_t.detach().mean()
        return losses, parts

    def fingerprint(self) -> dict:
        return {"rollout": self.config.fingerprint(), "sigmas": [round(float(s), 6) for s in self.policy.sigmas],
                "cfg": self.policy.cfg, "eta": self.policy.eta, "prompts": self.prompt_names}

    def train(self, *, checkpoints: Optional[CheckpointStore] = None, resume: bool = True,
              fingerprint: Optional[dict] = None, progress=None, should_stop=None) -> TrainResult:
        return train(self.trainable, self.step, self.config.loop, checkpoints=checkpoints, resume=resume,
                     fingerprint={**self.fingerprint(), **(fingerprint or {})}, progress=progress,
                     should_stop=should_stop)

    @torch.no_grad()
    def sample(self, cond, n: int, seed: int, prompt_index: int = 0) -> Trajectories:
        """Fresh chains of the current model (evaluation; same seed → same noise), rewarded by the reward
        function of prompt ``prompt_index``."""
        return rollout(self.policy, cond, n, torch.Generator().manual_seed(int(seed)), self.reward_fns[prompt_index])


# ------------------------------------------------------------------------------------------ preferences
@dataclass
class PreferenceConfig:
    """Reference defaults (MaPO ``train.py`` / README; Diffusion-DPO): AdamW, wd 1e-2, clip 1, constant lr,
    β_MaPO 0.1, s = 0.5, T = number of training timesteps, β_DPO 5000 (SD1.5)."""

    method: str = "mapo"
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(lr=1e-5, weight_decay=1e-2, grad_clip=1.0))
    batch_size: int = 8              # pairs per step
    beta_mapo: float = 0.1
    snr_value: float = 0.5
    beta_dpo: float = 5000.0
    crop: Optional[tuple] = None     # (H, W) joint crop; None: no crop
    random_crop: bool = True
    flip: bool = True

    def validate(self) -> None:
        self.method = check_method(self.method)
        self.loop.validate()
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("beta_mapo", "snr_value", "beta_dpo"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive number, got {v}")

    def fingerprint(self) -> dict:
        d = asdict(self)
        d.pop("loop")
        d["crop"] = list(d["crop"]) if d["crop"] else None
        return d


def frozen_copy(model: Any, network: Optional[LoRANetwork] = None, root: Optional[nn.Module] = None) -> Any:
    """A frozen deep copy of an engine model WITHOUT the LoRA (the Diffusion-DPO reference): the LoRA's hooks
    are removed while copying (``root`` = the module the LoRA is attached to) and put back afterwards."""
    if network is not None:
        if root is None:
            raise ValueError("frozen_copy: pass root= (the module the LoRA is attached to)")
        network.detach()
    try:
        ref = copy.deepcopy(model)
    finally:
        if network is not None:
            network.attach(root)
    for obj in (ref, getattr(ref, "network", None)):
        if isinstance(obj, nn.Module):
            obj.requires_grad_(False)
            obj.eval()
    return ref


def live_tensor_bytes() -> int:
    """Bytes of all live torch tensors of this process (unique storages, found by the garbage collector) —
    a deterministic measure of what a trainer holds (model copies, adapters, optimiser state)."""
    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance on deprecated module attributes warns during the walk
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if torch.is_tensor(obj)]
    for obj in objects:
        try:
            if not torch.is_tensor(obj) or obj.device.type == "meta":
                continue
            storage = obj.untyped_storage()
            key = (storage.data_ptr(), storage.device.type)
            if key in seen or storage.data_ptr() == 0:
                continue
            seen.add(key)
            total += storage.nbytes()
        except (RuntimeError, ReferenceError):
            continue
    return total


class PreferenceTrainer:
    """MaPO / Diffusion-DPO / SFT on preference pairs.

    model:          engine model (``.denoise(x, sigma, conds)``, VE coordinates) with ``network`` applied;
    encode:         IMAGE (N, H, W, C) in [0, 1] -> latents in model coordinates (VAE encode);
    encode_prompt:  prompt string -> conditioning for ``model.denoise``;
    train_sigmas:   the model's discrete training noise levels (ComfyUI ``model_sampling.sigmas``); a timestep
                    t ~ U{0..T−1} per pair, T = len(train_sigmas) (the MaPO margin's T);
    reference:      DPO only — a frozen copy of the model without the LoRA (:func:`frozen_copy`).
    """

    def __init__(self, model: Any, pairs: PreferencePairs, encode: Callable[[torch.Tensor], torch.Tensor],
                 encode_prompt: Callable[[str], Any], network: LoRANetwork, config: PreferenceConfig,
                 train_sigmas: torch.Tensor, reference: Any = None, parameterization: Optional[str] = None):
        config.validate()
        if not isinstance(pairs, PreferencePairs):
            raise TypeError("pairs must be PreferencePairs (load_preference_folder / pairs_from_scores)")
        self.model, self.pairs, self.encode, self.encode_prompt = model, pairs, encode, encode_prompt
        self.network, self.config = network, config
        self.train_sigmas = torch.as_tensor(train_sigmas, dtype=torch.float32).flatten()
        if self.train_sigmas.numel() < 1 or not bool((self.train_sigmas > 0).all()):
            raise ValueError("train_sigmas must be a non-empty list of positive noise levels")
        self.parameterization = parameterization or getattr(model, "parameterization", "eps")
        if config.method == "dpo" and reference is None:
            raise ValueError("Diffusion-DPO needs a frozen reference model (reference=frozen_copy(model, lora, root))")
        self.reference = reference if config.method == "dpo" else None
        self._cond_cache: dict[str, Any] = {}
        self.shard = (0, 1)  # (rank, world size): data-parallel ranks train on their rows of each step's batch

    def cond(self, prompt: str):
        if prompt not in self._cond_cache:
            self._cond_cache[prompt] = self.encode_prompt(prompt)
        return self._cond_cache[prompt]

    def losses(self, model: Any, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
               prompts: Sequence[str]) -> torch.Tensor:
        """Per-sample denoising losses; rows sharing a prompt go through one model call."""
        x_t = x0 + sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0) * noise
        parts, order = [], []
        for prompt in dict.fromkeys(prompts):
            rows = [i for i, p in enumerate(prompts) if p == prompt]
            index = torch.tensor(rows, device=x0.device)
            parts.append(model.denoise(x_t[index], sigma[index].to(x0), [self.cond(prompt)])[0])
            order.extend(rows)
        stacked = torch.cat(parts)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        denoised = stacked[inverse.to(stacked.device)]
        return denoising_losses(denoised, x0, noise, sigma, self.parameterization)

    def draw(self, step: int):
        """Pairs, augmentation, shared noise and timestep of training step ``step`` (seeded).

        The whole step's batch is drawn on every rank (same generator), then each rank keeps its contiguous
        block of rows (``shard``): the ranks' mean losses average to the one-process loss of the same batch."""
        cfg, n = self.config, len(self.pairs)
        g = step_generator(cfg.loop.seed, step, PAIR_STREAM)
        b = int(cfg.batch_size)
        idx = torch.randperm(n, generator=g)[:b] if n >= b else torch.randint(0, n, (b,), generator=g)
        chosen, rejected = joint_augment(self.pairs.chosen[idx], self.pairs.rejected[idx], cfg.crop, g,
                                         cfg.flip, cfg.random_crop)
        rank, world = self.shard
        rows = slice(rank * b // world, (rank + 1) * b // world)
        with torch.no_grad():
            x_w, x_l = self.encode(chosen[rows]), self.encode(rejected[rows])
        noise = torch.randn((b, *x_w.shape[1:]), generator=g)[rows].to(x_w)
        t = torch.randint(0, self.train_sigmas.numel(), (b,), generator=g)[rows]
        sigma = self.train_sigmas[t].to(x_w.device)
        return [self.pairs.prompts[i] for i in idx[rows].tolist()], x_w, x_l, noise, sigma

    def step(self, step: int) -> StepOutput:
        cfg = self.config
        prompts, x_w, x_l, noise, sigma = self.draw(step)
        if cfg.method == "sft":
            losses_w = self.losses(self.model, x_w, noise, sigma, prompts)
            loss, metrics = sft_loss(losses_w)
            return StepOutput(loss, {"loss_w": float(losses_w.mean().detach()), **metrics})
        both = torch.cat([x_w, x_l])
        noise2, sigma2, prompts2 = torch.cat([noise, noise]), torch.cat([sigma, sigma]), list(prompts) * 2
        losses_w, losses_l = self.losses(self.model, both, noise2, sigma2, prompts2).chunk(2)
        if cfg.method == "mapo":
            loss, metrics = mapo_loss(losses_w, losses_l, cfg.beta_mapo, self.train_sigmas.numel(), cfg.snr_value)
        else:
            with torch.no_grad():
                ref_w, ref_l = self.losses(self.reference, both, noise2, sigma2, prompts2).chunk(2)
            loss, metrics = dpo_loss(losses_w, losses_l, ref_w, ref_l, cfg.beta_dpo)
        metrics.update({"loss_w": float(losses_w.mean().detach()), "loss_l": float(losses_l.mean().detach()),
                        "margin": float((losses_l - losses_w).mean().detach())})
        return StepOutput(loss, metrics)

    @torch.no_grad()
    def margin(self, pairs: Optional[PreferencePairs] = None, draws: int = 4, seed: int = 0,
               model: Any = None) -> float:
        """Chosen-vs-rejected margin mean(L_l − L_w) over ``draws`` fixed (noise, timestep) per pair (no
        augmentation) — positive when the model denoises the chosen images better."""
        pairs = pairs or self.pairs
        model = model or self.model
        g = torch.Generator().manual_seed(int(seed))
        x_w, x_l = self.encode(pairs.chosen), self.encode(pairs.rejected)
        total = 0.0
        for _ in range(int(draws)):
            noise = torch.randn(x_w.shape, generator=g).to(x_w)
            sigma = self.train_sigmas[torch.randint(0, self.train_sigmas.numel(), (len(pairs),), generator=g)].to(x_w.device)
            lw = self.losses(model, x_w, noise, sigma, pairs.prompts)
            ll = self.losses(model, x_l, noise, sigma, pairs.prompts)
            total += float((ll - lw).mean())
        return total / int(draws)

    def fingerprint(self) -> dict:
        return {"preference": self.config.fingerprint(), "pairs": len(self.pairs), "pair_names": self.pairs.names[:64],
                "train_sigmas": self.train_sigmas.numel(), "parameterization": self.parameterization}

    def train(self, *, checkpoints: Optional[CheckpointStore] = None, resume: bool = True,
              fingerprint: Optional[dict] = None, progress=None, should_stop=None,
              reduce_gradients=None) -> TrainResult:
        return train(self.network, self.step, self.config.loop, checkpoints=checkpoints, resume=resume,
                     fingerprint={**self.fingerprint(), **(fingerprint or {})}, progress=progress,
                     should_stop=should_stop, reduce_gradients=reduce_gradients)


__all__ = [
    "ROLLOUT_METHODS", "RolloutConfig", "RewardRolloutTrainer", "TrainableSet", "PreferenceConfig",
    "PreferenceTrainer", "frozen_copy", "live_tensor_bytes", "trained_transitions", "check_rollout_method",
]
