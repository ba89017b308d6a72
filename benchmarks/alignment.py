"""Alignment benchmark on the digits models (CPU, minutes): reward vs number of trajectories for DAG-KL, DAG-DB
and DDPO (with diversity), and MaPO vs Diffusion-DPO vs SFT (win rate by the held-out judge, held memory, peak
RSS, time per step).

Task (digits_benchmark.md): the unconditional digits model, reward = the guidance classifier's p(y ∈ {6, 8} | x)
(exp of ``classifier_judge``), judge = the separately trained evaluator (never the reward).
- rollouts: DDPM 10 steps, B chains per step, timestep_fraction 0.3; after training, 128 fresh samples:
  reward, share of samples the evaluator puts in {6, 8}, diversity = entropy (nats) of the evaluator's class
  histogram and mean pairwise distance of evaluator features;
- preferences: pairs made in-graph — 4 base-model samples per group, ranked by the reward, best vs worst
  (``pairs_from_scores``); win rate = share of seeds where the trained model's sample (same noise) has a higher
  judge score log p_eval({6, 8}) than the base model's; ties count ½.

    python -m comfy_poe.benchmarks.alignment --model unet --steps 15 --pref-steps 40
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from .. import digits
from ..training import LoopConfig, LoRAConfig, create_lora
from ..training.alignment import (
    PreferenceConfig, PreferenceTrainer, RewardRolloutTrainer, RolloutConfig, frozen_copy, live_tensor_bytes,
)
from ..training.mapo import ddpm_training_sigmas
from ..training.preference import pairs_from_scores
from ..training.rewards import reward_function
from ..training.rollout import Policy, rollout

TARGET = (6, 8)


def decode(x):
    return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).repeat(1, 1, 1, 3)


def encode(images):
    return images[..., :1].permute(0, 3, 1, 2) * 2 - 1


def setup(model: str, seed: int = 0):
    den = digits.load_denoiser(with_classifier=False, model=model)
    targets = r"^mlp\.\d+$" if model == "mlp" else "attention"
    lora = create_lora(den.network, LoRAConfig(rank=4, alpha=4, targets=targets), seed=seed).attach(den.network)
    return den, lora


@torch.no_grad()
def judge_scores(evaluator, x):
    log_p = evaluator.log_probs(x.clamp(-1, 1))
    return torch.logsumexp(log_p[:, list(TARGET)], dim=1), log_p.argmax(1), evaluator.features(x.clamp(-1, 1))


def diversity(classes, features):
    hist = torch.bincount(classes, minlength=10).float()
    p = hist / hist.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    d = torch.cdist(features, features)
    n = features.shape[0]
    return entropy, float(d.sum() / (n * (n - 1)))


def target_probability():
    """Reward p(y ∈ {6, 8} | x) in [0, 1] from the guidance classifier (its log is heavy-tailed, ~ −7 on average)."""
    from ..experts import DiscriminativeExpert

    judge = digits.classifier_judge(set(TARGET))
    return DiscriminativeExpert(lambda x: judge.fn(x).exp(), name="p(6 or 8)")


def run_rollouts(args) -> list[dict]:
    evaluator = digits.load_evaluator()
    reward = reward_function([target_probability()])
    rows = []
    for method in ("dag-kl", "dag-db", "ddpo"):
        den, lora = setup(args.model)
        policy = Policy(den, digits.karras_sigmas(args.sample_steps), (1, 8, 8))
        config = RolloutConfig(method=method, loop=LoopConfig(steps=args.steps, lr=args.lr, weight_decay=1e-4, seed=0),
                               batch_size=args.batch, timestep_fraction=args.fraction, reward_exp=args.beta)
        trainer = RewardRolloutTrainer(policy, [None], reward, lora, config)
        curve = []
        start = time.perf_counter()
        result = trainer.train(progress=lambda s, n, rec: curve.append((int(rec["trajectories"]), rec["reward"])))
        seconds = time.perf_counter() - start
        for scale, label in ((0.0, "base"), (1.0, method)):
            lora.scale = scale
            final = trainer.sample(None, args.eval, seed=1234).final
            score, classes, feats = judge_scores(evaluator, final)
            ent, spread = diversity(classes, feats)
            rows.append({"method": label, "trajectories": args.steps * args.batch,
                         "reward": float(reward(final).mean()),
                         "in_set": float(sum((classes == c).sum() for c in TARGET)) / final.shape[0],
                         "class_entropy": ent, "feature_spread": spread,
                         "seconds": seconds if scale else 0.0,
                         "curve": [(t, round(r, 4)) for t, r in curve[:: max(1, len(curve) // 5)]] if scale else []})
        lora.scale = 1.0
        del result
    return rows


def make_pairs(model: str, groups: int, per_group: int, seed: int = 0):
    den = digits.load_denoiser(with_classifier=False, model=model)
    reward = reward_function([target_probability()])
    policy = Policy(den, digits.karras_sigmas(10), (1, 8, 8))
    traj = rollout(policy, None, groups * per_group, torch.Generator().manual_seed(seed), reward)
    images = decode(traj.final)
    group_ids = [i // per_group for i in range(groups * per_group)]
    return pairs_from_scores(images, traj.rewards, ["null"] * len(group_ids), groups=group_ids)


def run_one_preference(args, method: str) -> dict:
    pairs = make_pairs(args.model, args.pairs, 4)
    before = live_tensor_bytes()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    den, lora = setup(args.model)
    model_bytes = sum(p.numel() * p.element_size() for p in den.network.parameters())
    ref = frozen_copy(den, lora, den.network) if method == "dpo" else None
    config = PreferenceConfig(method=method, loop=LoopConfig(steps=args.pref_steps, lr=args.pref_lr, weight_decay=1e-2,
                                                             seed=0), batch_size=8)
    trainer = PreferenceTrainer(den, pairs, encode, lambda p: None, lora, config, ddpm_training_sigmas(1000),
                                reference=ref)
    margin_before = trainer.margin(draws=2)
    times = []
    trainer.train(progress=lambda s, n, rec: times.append(time.perf_counter()))
    step_time = (times[-1] - times[0]) / max(1, len(times) - 1)
    held = live_tensor_bytes() - before - model_bytes
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    evaluator = digits.load_evaluator()
    policy = Policy(den, digits.karras_sigmas(10), (1, 8, 8))
    out = {}
    for scale in (0.0, 1.0):
        lora.scale = scale
        final = rollout(policy, None, args.eval, torch.Generator().manual_seed(4321)).final
        out[scale] = judge_scores(evaluator, final)[0]
    wins = (out[1.0] > out[0.0]).float() + 0.5 * (out[1.0] == out[0.0]).float()
    return {"method": method, "pairs": len(pairs), "margin_before": margin_before, "margin_after": trainer.margin(draws=2),
            "win_rate": float(wins.mean()), "held_MB": held / 1e6, "model_MB": model_bytes / 1e6,
            "peak_rss_growth_MB": (peak_rss - rss_before) / 1024, "step_ms": 1000 * step_time}


def run_preferences(args) -> list[dict]:
    rows = []
    for method in ("mapo", "dpo", "sft"):  # one fresh process each so peak RSS is per method
        cmd = [sys.executable, "-m", "comfy_poe.benchmarks.alignment", "--one", method, "--model", args.model,
               "--pref-steps", str(args.pref_steps), "--pref-lr", str(args.pref_lr), "--pairs", str(args.pairs),
               "--eval", str(args.eval), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def table(rows: list[dict], keys: list[str]) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="unet", choices=["unet", "mlp"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--fraction", type=float, default=0.3)
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--beta", type=float, default=100.0)
    p.add_argument("--pref-steps", type=int, default=40)
    p.add_argument("--pref-lr", type=float, default=1e-3)
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--eval", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--skip", default="", help="comma list: rollouts,preferences")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one_preference(args, args.one)))
        return
    skip = set(args.skip.split(","))
    if "rollouts" not in skip:
        rows = run_rollouts(args)
        print(table(rows, ["method", "trajectories", "reward", "in_set", "class_entropy", "feature_spread", "seconds"]))
        for r in rows:
            if r["curve"]:
                print(r["method"], "reward vs trajectories:", r["curve"])
    if "preferences" not in skip:
        rows = run_preferences(args)
        print(table(rows, ["method", "pairs", "margin_before", "margin_after", "win_rate", "held_MB", "model_MB",
                           "peak_rss_growth_MB", "step_ms"]))


if __name__ == "__main__":
    main()
