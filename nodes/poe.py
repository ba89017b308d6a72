"""Product-of-Experts nodes: PoE Expert, PoE Combine (GUIDER), PoE AIS/SMC Sampler (SAMPLER), PoE Sample.

Thin ComfyUI layer over the engine: experts.generative does the product (shared unconditional,
score-sum combination, capture channel), samplers.smc does the sampling. This file only adapts
MODEL / CONDITIONING / LATENT / VAE / MASK and ComfyUI's model loading, previews and interruption.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import node_helpers
from comfy_api.latest import io, ui

from ..experts.base import CONST, EPS, LATENT, PIXEL
from ..experts.generative import GenerativeExpert, capture_predictions, combine_denoised, evaluate_experts
from ..experts.masks import prepare_mask
from ..samplers.plots import plot_series
from ..samplers.resampling import RESAMPLING_SCHEMES
from ..samplers.smc import (
    FK_MODES, GUARDS, MCMC_KINDS, PROPOSALS, SELECTIONS, STEPS, TEMPERINGS, TRACES, SMCReport, sample_poe_smc,
)

from ._types import PoEExperts, PoEJudges

SMC_WEIGHTINGS = ("incremental", "paper", "max", "sum")


# ------------------------------------------------------------------------------------------------
# pure helpers


@dataclass(frozen=True)
class ExpertSpec:
    """What a PoE Expert node outputs (one entry of POE_EXPERTS)."""

    model: Any  # ModelPatcher
    positive: Any
    negative: Any
    cfg: float
    weight: float
    mask: Optional[torch.Tensor]
    feather: float
    name: str


def parameterization_of(model_sampling) -> str:
    """CONST (rectified flow) models use flow coordinates; EPS, V_PREDICTION, EDM and X0 all give
    k-diffusion VE states x = x0 + σ ε with an x0 prediction."""
    return CONST if isinstance(model_sampling, comfy.model_sampling.CONST) else EPS


def latent_signature(patcher) -> tuple:
    fmt = patcher.get_model_object("latent_format")
    return type(fmt).__name__, getattr(fmt, "latent_channels", None), parameterization_of(patcher.get_model_object("model_sampling"))


def check_same_family(specs: list[ExpertSpec]) -> None:
    first = latent_signature(specs[0].model)
    for i, spec in enumerate(specs[1:], start=2):
        sig = latent_signature(spec.model)
        if sig != first:
            raise ValueError(
                f"expert {i} ({spec.name or 'unnamed'}) uses a model with latent format {sig[0]} ({sig[1]} channels, "
                f"{sig[2]}) but expert 1 uses {first[0]} ({first[1]} channels, {first[2]}): experts of a product must "
                "share one latent space (models of the same family)"
            )


def check_mask_fits(spec: ExpertSpec, index: int, latent_shape) -> None:
    """A mask may have any resolution, but not another aspect ratio than the latent."""
    if spec.mask is None:
        return
    mh, mw = spec.mask.shape[-2:]
    lh, lw = latent_shape[-2:]
    if abs(mh / mw - lh / lw) > 0.02 * (lh / lw):
        raise ValueError(
            f"mask of expert {index} ({spec.name or 'unnamed'}) is {mw}x{mh} but the latent is {lw}x{lh} "
            f"({lw * 8}x{lh * 8} px): the aspect ratios differ, resize or crop the mask to the image"
        )


class _ModelHandle:
    """Engine view of one ComfyUI model: grouped by identity, carries its parameterisation."""

    def __init__(self, base_model, parameterization: str):
        self.base = base_model
        self.parameterization = parameterization


class PoEGuider(comfy.samplers.CFGGuider):
    """GUIDER for a product of experts (product semantics, not ComfyUI's area-mixture).

    Experts sharing a model are evaluated in one ``calc_cond_batch`` call with one shared unconditional;
    per-expert predictions go to any sampler that asks through the engine's capture channel, so the
    PoE SMC sampler can compute Feynman-Kac corrector weights. Works with every ComfyUI sampler.
    """

    def __init__(self, specs: list[ExpertSpec], base: Optional[ExpertSpec] = None):
        if not specs:
            raise ValueError("PoE Combine needs at least one expert")
        all_specs = list(specs) + ([base] if base is not None else [])
        check_same_family(all_specs)
        patcher = specs[0].model.clone()
        others, seen = [], {id(specs[0].model)}
        for spec in all_specs[1:]:
            if id(spec.model) not in seen:
                seen.add(id(spec.model))
                others.append(spec.model)
        if others:  # load every expert model together with the first one
            patcher.set_additional_models("poe_experts", others)
        super().__init__(patcher)
        self.specs, self.base_spec = list(specs), base
        self._masks: dict = {}
        conds, self._keys, known = {}, [], {}

        def key_for(cond, negative):
            if cond is None:
                return None
            if id(cond) not in known:
                key = f"poe_{len(known)}"
                known[id(cond)] = key
                conds[key] = node_helpers.conditioning_set_values(cond, {"prompt_type": "negative"}) if negative else cond
            return known[id(cond)]

        for spec in all_specs:
            self._keys.append((key_for(spec.positive, False), key_for(spec.negative, True) if spec.cfg != 1.0 else None))
        self.inner_set_conds(conds)

    def _engine_experts(self, x):
        handles, experts = {}, []
        for spec, (pk, nk) in zip(self.specs + ([self.base_spec] if self.base_spec else []), self._keys):
            base_model = spec.model.model  # clones share their BaseModel; one handle per distinct model
            handle = handles.setdefault(id(base_model), _ModelHandle(base_model, parameterization_of(base_model.model_sampling)))
            mask = self._mask(spec, x) if spec.mask is not None else None
            experts.append(GenerativeExpert(handle, self.conds[pk], self.conds[nk] if nk else None,
                                            cfg=spec.cfg if nk else 1.0, weight=spec.weight, mask=mask, name=spec.name))
        base = experts.pop() if self.base_spec is not None else None
        return experts, base

    def _mask(self, spec: ExpertSpec, x):
        """The expert's mask resized and feathered for this latent shape, computed once per shape (this
        runs on every model evaluation)."""
        key = (id(spec), tuple(x.shape), x.device, x.dtype)
        if key not in self._masks:
            self._masks[key] = prepare_mask(spec.mask, x.shape, spec.feather).to(x.device, x.dtype)
        return self._masks[key]

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        experts, base = self._engine_experts(x)

        def call(handle, conds, x_in, sigma):
            return comfy.samplers.calc_cond_batch(handle.base, conds, x_in, sigma, model_options)

        preds = evaluate_experts(experts, x, timestep, call=call, base=base)
        capture_predictions(model_options, preds)
        return combine_denoised(x, timestep, preds.components(x, "product"), preds.parameterization)


def in_latent_space(judge, base_model):
    """Latent judges score latents as users see them (LATENT outputs, after process_latent_out)."""
    if judge.space != LATENT or judge.noisy:
        return judge
    fn = judge.fn
    return dataclasses.replace(judge, fn=lambda x0: fn(base_model.process_latent_out(x0)))


def per_frame(judge):
    """Pixel judges score images (N, H, W, C); a video VAE decodes to (N, T, H, W, C): score every frame and
    average over frames (one log-potential per particle)."""
    if judge.space != PIXEL:
        return judge
    fn = judge.fn

    def video_fn(x):
        if x.ndim != 5:
            return fn(x)
        n, t = x.shape[:2]
        return fn(x.reshape(n * t, *x.shape[2:])).reshape(n, t).mean(1)

    return dataclasses.replace(judge, fn=video_fn)


def make_smc_sampler(options: dict, judges: Optional[list] = None, vae=None, report: Optional[SMCReport] = None):
    """KSAMPLER around the engine's sample_poe_smc, with ComfyUI decode, interruption and model type.

    The report of the sampler's latest run is kept on the returned object as ``poe_report`` (a fresh
    :class:`SMCReport` per run unless one is given), so PoE SMC Report can show it after sampling."""
    judges = list(judges or [])

    def sample_fn(model, x, sigmas, extra_args=None, callback=None, disable=None):
        run_report = report if report is not None else SMCReport()
        ksampler.poe_report = run_report
        base_model = model.inner_model.inner_model
        decode = None
        if vae is not None:
            decode = lambda x0: vae.decode(base_model.process_latent_out(x0)).to(x0.device)
        return sample_poe_smc(
            model, x, sigmas, extra_args, callback, disable,
            judges=[per_frame(in_latent_space(j, base_model)) for j in judges], decode=decode,
            parameterization=parameterization_of(base_model.model_sampling),
            interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
            report=run_report, **options,
        )

    ksampler = comfy.samplers.KSAMPLER(sample_fn)
    ksampler.poe_report = None
    return ksampler


def check_judges(judges, vae, twist: bool) -> Optional[str]:
    if not judges:
        return None
    if any(j.space == PIXEL for j in judges) and vae is None:
        return "judges: a pixel-space judge (VLM, CLIP, palette …) needs the VAE input to decode x̂0"
    if twist and any(j.space == PIXEL for j in judges):
        return ("twist: gradient twisting inside ComfyUI supports latent-space judges only (gradients cannot "
                "pass through ComfyUI's VAE); turn twist off or use latent judges")
    return None


def render_report(report: SMCReport) -> tuple[str, torch.Tensor]:
    ess = torch.stack(report.ess).mean(1) / max(report.particles, 1) if report.ess else torch.zeros(0)
    series = {"ESS / particles": ess.tolist()}
    if report.acceptance:
        series["MCMC acceptance"] = report.acceptance
    return report.summary(), plot_series(series, "PoE SMC diagnostics")


# ------------------------------------------------------------------------------------------------
# option schema shared by the sampler nodes

def _smc_inputs():
    return [
        io.Int.Input("particles", default=4, min=1, max=512,
                     tooltip="Particles L per image: the sampler keeps L candidates and resamples them by weight. Cost is linear in L."),
        io.Int.Input("mcmc_steps", default=1, min=0, max=50,
                     tooltip="Langevin MCMC steps per noise level (paper: K). Each costs one model evaluation per particle."),
        io.Combo.Input("mcmc", options=list(MCMC_KINDS), default="mala",
                       tooltip="mala: Metropolis-adjusted Langevin (invariant, adaptive step); ula: unadjusted Langevin as in the paper."),
        io.Float.Input("step_scale", default=0.1, min=0.0001, max=10.0, step=0.001,
                       tooltip="MCMC step size c: κ² = c·σ². MALA adapts it toward 57% acceptance (capped at 0.2)."),
        io.Combo.Input("fk_correction", options=list(FK_MODES), default="full",
                       tooltip="Feynman-Kac corrector weights for the product of experts. full: raw cond/uncond predictions (CFG is a product too); product: CFG'd experts; off: the paper's sketch (mode masses come out wrong)."),
        io.Combo.Input("weighting", options=list(SMC_WEIGHTINGS), default="incremental",
                       tooltip="How judges weight particles. incremental: FK difference potential (principled); paper: resample on the current reward every level (Zhang et al. Alg. 1); max / sum: FK-steering heuristics."),
        io.Combo.Input("resampling", options=list(RESAMPLING_SCHEMES), default="systematic",
                       tooltip="Resampling scheme (all unbiased; systematic has the lowest variance)."),
        io.Float.Input("ess_threshold", default=0.5, min=0.0, max=1.0, step=0.01,
                       tooltip="Resample when the effective sample size falls below this fraction of the particles."),
        io.Combo.Input("selection", options=list(SELECTIONS), default="auto",
                       tooltip="Output: argmax (best final judge score, the paper), sample (one drawn by weight), resample / all (every particle; the batch grows L-fold), auto (argmax with judges, else sample)."),
        io.Float.Input("eta", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Noise of the move between levels: 1 ancestral (default), 0 deterministic Euler (the paper's ODE init kernel)."),
        io.Float.Input("judge_sigma_max", default=1000.0, min=0.0, max=1000.0, step=0.01,
                       tooltip="Judges are applied only at noise levels σ <= this (decoding x̂0 and running a VLM is the expensive part); they always score the final images."),
        io.Float.Input("judge_sigma_min", default=0.0, min=0.0, max=1000.0, step=0.01,
                       tooltip="Judges are applied only at noise levels σ >= this (and always at the end)."),
        io.Combo.Input("tempering", options=list(TEMPERINGS), default="capped",
                       tooltip="capped (default): judge weights above 1 count as 1 until the last step, which applies the full weight (keeps every mode's particles alive; same target); constant: full judge weight at every level (paper); linear: ramp the weight from 0 to 1 over the judge window."),
        io.Boolean.Input("twist", default=False,
                         tooltip="Add the gradient of differentiable latent judges to the drift (with the exact proposal correction)."),
        io.Int.Input("chunk_size", default=0, min=0, max=4096,
                     tooltip="Max particles per model call (0: all at once). Lower it when memory runs out."),
        io.Combo.Input("proposal", options=list(PROPOSALS), default="lambda", optional=True,
                       tooltip="lambda (default): move with the experts' consensus as one model at noise σ/√Λ, which keeps the FK weights usable at latent size (see docs/sampler_high_dimension.md); summed: the summed-score reverse SDE of the FK-corrector paper (its weights degenerate at SD latent size for full-weight experts)."),
        io.Combo.Input("trace", options=list(TRACES), default="auto", optional=True,
                       tooltip="Posterior-covariance term of the lambda weights where the expert weights do not sum to 1. auto: exact when the model provides it, else a Hutchinson estimate (one extra model call per step, only when weights do not sum to 1); off: drop it (biased)."),
        io.Combo.Input("guard", options=list(GUARDS), default="fallback", optional=True,
                       tooltip="Collapse guard. fallback: when resampling on the FK weights would destroy the particles' diversity, switch the weights off for that image and continue unweighted (the report says so); off: never."),
        io.Combo.Input("step", options=list(STEPS), default="dpmpp_2m_sde", optional=True,
                       tooltip="Integrator of the move between levels, one model evaluation per level either way. dpmpp_2m_sde (default): second order, reuses the previous level's prediction (DPM-Solver++(2M) SDE; one expert's variance error at 60 levels +2% instead of -17%); ancestral: first-order Euler-Maruyama step (the old default)."),
    ]


def _smc_options(kw: dict) -> dict:
    return dict(
        particles=kw["particles"], mcmc_steps=kw["mcmc_steps"], mcmc=kw["mcmc"], step_scale=kw["step_scale"],
        fk_correction=kw["fk_correction"], weighting=kw["weighting"], resampling=kw["resampling"],
        ess_threshold=kw["ess_threshold"], selection=kw["selection"], eta=kw["eta"],
        judge_window=(kw["judge_sigma_min"], kw["judge_sigma_max"]), tempering=kw["tempering"], twist=kw["twist"],
        chunk_size=kw["chunk_size"] or None, proposal=kw.get("proposal") or "lambda", trace=kw.get("trace") or "auto",
        guard=kw.get("guard") or "fallback", step=kw.get("step") or "dpmpp_2m_sde",
    )


def _check_combos(**values) -> bool | str:
    allowed = dict(mcmc=MCMC_KINDS, fk_correction=FK_MODES, weighting=SMC_WEIGHTINGS, resampling=RESAMPLING_SCHEMES,
                   selection=SELECTIONS, tempering=TEMPERINGS, proposal=PROPOSALS, trace=TRACES, guard=GUARDS,
                   step=STEPS)
    for name, value in values.items():
        if value is not None and name in allowed and value not in allowed[name]:
            return f"{name}: {value!r} is not one of {', '.join(allowed[name])}"
    lo, hi = values.get("judge_sigma_min"), values.get("judge_sigma_max")
    if lo is not None and hi is not None and lo > hi:
        return f"judge_sigma_min ({lo}) must not exceed judge_sigma_max ({hi})"
    return True


# ------------------------------------------------------------------------------------------------
# nodes


class PoEExpert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEExpert",
            display_name="PoE Expert",
            category="poe/sampling",
            description="One generative expert of a product: a model with its own prompt, CFG, weight and optional region.",
            inputs=[
                io.Model.Input("model", tooltip="Diffusion or flow model of this expert. All experts must share a latent space (same model family)."),
                io.Conditioning.Input("positive", tooltip="What this expert asks for."),
                io.Conditioning.Input("negative", tooltip="This expert's negative / unconditional prompt (shared between experts of the same model when it is the same conditioning)."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="This expert's own classifier-free guidance scale."),
                io.Float.Input("weight", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Exponent λ of this expert in the product p1^λ1 · p2^λ2 … (paper: 1)."),
                io.Mask.Input("mask", optional=True, tooltip="Optional region where this expert acts (any resolution with the image's aspect ratio)."),
                io.Float.Input("feather", default=1.0, min=0.0, max=32.0, step=0.5,
                               tooltip="Softens the mask edge: Gaussian blur radius in latent pixels (1 latent pixel = 8 image pixels for SD)."),
                PoEExperts.Input("experts", optional=True, tooltip="Experts to chain onto (the output lists them plus this one)."),
                io.String.Input("name", default="", optional=True, tooltip="Label used in reports and error messages."),
            ],
            outputs=[PoEExperts.Output(display_name="experts")],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, weight, mask=None, feather=1.0, experts=None, name="") -> io.NodeOutput:
        chain = list(experts or [])
        spec = ExpertSpec(model, positive, negative, float(cfg), float(weight), mask, float(feather),
                          name or f"expert {len(chain) + 1}")
        check_same_family(chain + [spec])
        return io.NodeOutput(chain + [spec])


class PoECombine(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoECombine",
            display_name="PoE Combine",
            category="poe/sampling",
            description="Multiply experts into one GUIDER (scores add; CFG per expert; shared unconditional). Use with SamplerCustomAdvanced and any sampler, or the PoE AIS/SMC sampler for Feynman-Kac corrected sampling.",
            inputs=[
                PoEExperts.Input("experts", tooltip="The experts to multiply."),
                PoEExperts.Input("base", optional=True,
                                 tooltip="Optional expert (the first of this list) that fills pixels no expert's mask covers; without it uncovered pixels are an error."),
            ],
            outputs=[io.Guider.Output(display_name="guider")],
        )

    @classmethod
    def execute(cls, experts, base=None) -> io.NodeOutput:
        return io.NodeOutput(PoEGuider(list(experts), base[0] if base else None))


class PoESMCSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoESMCSampler",
            display_name="PoE AIS/SMC Sampler",
            category="poe/sampling",
            description="SAMPLER: annealed importance sampling / sequential Monte Carlo with particles, MCMC refinement, Feynman-Kac corrector weights and resampling. Works with PoE Combine and with ordinary guiders (reward-steered sampling of one model).",
            inputs=_smc_inputs() + [
                PoEJudges.Input("judges", optional=True, tooltip="Discriminative experts (VLM, CLIP, palette, …) multiplied into the target."),
                io.Vae.Input("vae", optional=True, tooltip="VAE that decodes x̂0 for pixel-space judges."),
            ],
            outputs=[io.Sampler.Output(display_name="sampler")],
        )

    @classmethod
    def validate_inputs(cls, mcmc=None, fk_correction=None, weighting=None, resampling=None, selection=None,
                        tempering=None, judge_sigma_min=None, judge_sigma_max=None, proposal=None, trace=None, guard=None,
                        step=None):
        return _check_combos(mcmc=mcmc, fk_correction=fk_correction, weighting=weighting, resampling=resampling,
                             selection=selection, tempering=tempering, judge_sigma_min=judge_sigma_min,
                             judge_sigma_max=judge_sigma_max, proposal=proposal, trace=trace, guard=guard, step=step)

    @classmethod
    def execute(cls, judges=None, vae=None, **kw) -> io.NodeOutput:
        problem = check_judges(judges, vae, kw["twist"])
        if problem:
            raise ValueError(problem)
        return io.NodeOutput(make_smc_sampler(_smc_options(kw), judges, vae))


class PoESample(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoESample",
            display_name="PoE Sample",
            category="poe/sampling",
            description="All-in-one Product-of-Experts sampling with SMC: experts (+ judges) and a latent in, the selected samples and a diagnostics report out.",
            inputs=[
                PoEExperts.Input("experts", tooltip="The generative experts to multiply."),
                io.Latent.Input("latent", tooltip="Empty latent (txt2img) or an encoded image (with denoise < 1)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the initial noise and of every random choice of the sampler."),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Noise levels (model evaluations per particle without MCMC)."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="karras",
                               tooltip="ComfyUI noise schedule."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule to run (1: from pure noise)."),
            ] + _smc_inputs() + [
                PoEJudges.Input("judges", optional=True, tooltip="Discriminative experts (VLM, CLIP, palette, …) multiplied into the target."),
                io.Vae.Input("vae", optional=True, tooltip="VAE that decodes x̂0 for pixel-space judges."),
                PoEExperts.Input("base", optional=True, tooltip="Optional expert that fills pixels no mask covers."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent"),
                io.String.Output(display_name="report"),
                io.Image.Output(display_name="diagnostics"),
            ],
        )

    @classmethod
    def validate_inputs(cls, scheduler=None, mcmc=None, fk_correction=None, weighting=None, resampling=None,
                        selection=None, tempering=None, judge_sigma_min=None, judge_sigma_max=None, proposal=None,
                        trace=None, guard=None, step=None):
        if scheduler is not None and scheduler not in comfy.samplers.SCHEDULER_NAMES:
            return f"scheduler: {scheduler!r} is not one of {', '.join(comfy.samplers.SCHEDULER_NAMES)}"
        return _check_combos(mcmc=mcmc, fk_correction=fk_correction, weighting=weighting, resampling=resampling,
                             selection=selection, tempering=tempering, judge_sigma_min=judge_sigma_min,
                             judge_sigma_max=judge_sigma_max, proposal=proposal, trace=trace, guard=guard, step=step)

    @classmethod
    def execute(cls, experts, latent, seed, steps, scheduler, denoise, judges=None, vae=None, base=None, **kw) -> io.NodeOutput:
        problem = check_judges(judges, vae, kw["twist"])
        if problem:
            raise ValueError(problem)
        guider = PoEGuider(list(experts), base[0] if base else None)
        patcher = guider.model_patcher
        latent_image = comfy.sample.fix_empty_latent_channels(patcher, latent["samples"])
        channels = patcher.get_model_object("latent_format").latent_channels
        if latent_image.shape[1] != channels:
            raise ValueError(f"latent: {latent_image.shape[1]} channels, but the experts' model family uses {channels}")
        for i, spec in enumerate(experts, start=1):
            check_mask_fits(spec, i, latent_image.shape)
        sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), scheduler,
                                                 int(steps / denoise) if 0 < denoise < 1 else steps).cpu()
        if denoise < 1:
            sigmas = sigmas[-(steps + 1):]
        if denoise == 0:
            return io.NodeOutput(latent, "denoise is 0: nothing sampled", plot_series({}, "no sampling"))
        noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
        report = SMCReport()
        options = {**_smc_options(kw), "seed": int(seed)}
        sampler = make_smc_sampler(options, judges, vae, report)
        callback = latent_preview.prepare_callback(patcher, sigmas.shape[-1] - 1, {})
        samples = guider.sample(noise, latent_image, sampler, sigmas, denoise_mask=latent.get("noise_mask"),
                                callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        out = {k: v for k, v in latent.items() if k not in ("samples", "batch_index", "noise_mask")}
        out["samples"] = samples.to(comfy.model_management.intermediate_device())
        text, plot = render_report(report)
        return io.NodeOutput(out, text, plot, ui=ui.PreviewText(text))


class PoESMCReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoESMCReport",
            display_name="PoE SMC Report",
            category="poe/sampling",
            description="Diagnostics of a PoE AIS/SMC Sampler run inside SamplerCustomAdvanced: resampling count, ESS trace, whether the collapse guard fired and what it did, model calls, log Ẑ.",
            inputs=[
                io.Sampler.Input("sampler", tooltip="The PoE AIS/SMC Sampler whose run to report."),
                io.Latent.Input("latent", tooltip="The output of the SamplerCustomAdvanced that used this sampler (this makes the report run after sampling)."),
            ],
            outputs=[io.String.Output(display_name="report"), io.Image.Output(display_name="diagnostics")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, sampler, latent) -> io.NodeOutput:
        if not hasattr(sampler, "poe_report"):
            raise ValueError("sampler: not a PoE AIS/SMC Sampler (only its runs have a report)")
        if sampler.poe_report is None:
            raise ValueError("latent: the sampler has not run yet; connect the latent output of the "
                             "SamplerCustomAdvanced that uses this sampler")
        text, plot = render_report(sampler.poe_report)
        return io.NodeOutput(text, plot, ui=ui.PreviewText(text))


NODES = [PoEExpert, PoECombine, PoESMCSampler, PoESample, PoESMCReport]
