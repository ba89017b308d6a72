"""PoE FK-Steering Sampler: the FK steering recipe (Singhal et al. 2025) as a SAMPLER.

Thin ComfyUI layer over samplers.fk_steering; the sampling itself is the PoE AIS/SMC sampler's
(nodes.poe.make_smc_sampler) with a resampling schedule by step index and the terminal correction.
"""
from __future__ import annotations

import dataclasses

from comfy_api.latest import io

from ..samplers.fk_steering import FK_SELECTIONS, POTENTIALS, FKSteering, fk_steering_options, scaled_judges
from ..samplers.resampling import RESAMPLING_SCHEMES
from ._types import PoEJudges
from .poe import check_judges, make_smc_sampler

DEFAULTS = FKSteering()


class PoEFKSteeringSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEFKSteeringSampler",
            display_name="PoE FK-Steering Sampler",
            category="poe/sampling",
            description="SAMPLER: Feynman-Kac steering (Singhal et al. 2025) with a reward judge — k particles, "
                        "resampled every few steps on the reward of the decoded x̂0. Defaults are the published "
                        "recipe (k = 4, every 20 of 100 steps in [20, 80], potential max, λ = 10 for ImageReward). "
                        "Use with SamplerCustomAdvanced and any guider.",
            inputs=[
                io.Int.Input("particles", default=DEFAULTS.particles, min=1, max=512,
                             tooltip="Particles k per image (cost is linear in k)."),
                io.Int.Input("interval", default=DEFAULTS.interval, min=1, max=1000,
                             tooltip="Resample every this many sampler steps inside the window."),
                io.Int.Input("start", default=DEFAULTS.start, min=0, max=1000,
                             tooltip="First resampling step (0 = the first, noisiest step). Steps at or beyond the "
                                     "end of the schedule are skipped; the final image is always scored."),
                io.Int.Input("end", default=DEFAULTS.end, min=0, max=1000,
                             tooltip="Last step at which resampling may happen (inclusive)."),
                io.Combo.Input("potential", options=list(POTENTIALS), default=DEFAULTS.potential,
                               tooltip="max: exp(λ · best reward so far); diff: exp(λ · reward increase since the "
                                       "last resampling); sum: exp(λ · summed rewards)."),
                io.Float.Input("lmbda", default=DEFAULTS.lmbda, min=0.001, max=1000.0, step=0.1,
                               tooltip="λ: sharpness of the reward tilt (multiplies the judges' weights). The paper "
                                       "uses 2–10 for ImageReward; PickScore / HPS (×100 scale) need ≈ 0.1–1."),
                io.Boolean.Input("final_correction", default=DEFAULTS.final_correction,
                                 tooltip="Divide the final weights by the potentials already used (max / sum), so "
                                         "the weights target p(x) · exp(λ · reward); matters for selection 'sample'."),
                io.Combo.Input("selection", options=list(FK_SELECTIONS), default=DEFAULTS.selection,
                               tooltip="argmax: the particle with the best final reward; sample: one drawn by the "
                                       "final weights; all: every particle (the batch grows k-fold)."),
                io.Combo.Input("resampling", options=list(RESAMPLING_SCHEMES), default=DEFAULTS.resampling,
                               tooltip="Resampling scheme; the reference code uses multinomial."),
                io.Int.Input("chunk_size", default=0, min=0, max=4096,
                             tooltip="Max particles per model call (0: all at once). Lower it when memory runs out."),
                PoEJudges.Input("judges", tooltip="The reward: Reward Model Judge (or any judges, chained)."),
                io.Vae.Input("vae", optional=True, tooltip="VAE that decodes x̂0 for pixel-space judges."),
            ],
            outputs=[io.Sampler.Output(display_name="sampler")],
        )

    @classmethod
    def validate_inputs(cls, start=None, end=None, potential=None, selection=None, resampling=None):
        if start is not None and end is not None and end < start:
            return f"end ({end}) must not be before start ({start})"
        for name, value, allowed in (("potential", potential, POTENTIALS), ("selection", selection, FK_SELECTIONS),
                                     ("resampling", resampling, RESAMPLING_SCHEMES)):
            if value is not None and value not in allowed:
                return f"{name}: {value!r} is not one of {', '.join(allowed)}"
        return True

    @classmethod
    def execute(cls, particles, interval, start, end, potential, lmbda, final_correction, selection, resampling,
                chunk_size, judges, vae=None) -> io.NodeOutput:
        if not judges:
            raise ValueError("judges: FK steering needs a reward; connect a Reward Model Judge (or another judge)")
        problem = check_judges(judges, vae, twist=False)
        if problem:
            raise ValueError(problem)
        config = dataclasses.replace(DEFAULTS, particles=particles, interval=interval, start=start, end=end,
                                     potential=potential, lmbda=lmbda, final_correction=final_correction,
                                     selection=selection, resampling=resampling)
        options = {**fk_steering_options(config), "chunk_size": chunk_size or None}
        return io.NodeOutput(make_smc_sampler(options, scaled_judges(judges, config.lmbda), vae))


NODES = [PoEFKSteeringSampler]
