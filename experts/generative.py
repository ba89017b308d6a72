"""Generative experts and their product (reference poe_smc.md, "Scores from denoised predictions").

A product of experts p(x) ∝ Π_i p_i(x)^{λ_i M_i} adds scores: S = Σ_i λ_i M_i ⊙ s_i. Expert i's own
classifier-free guidance is itself a geometric product p(x|c)^w · p(x)^(1-w), so the whole product is a
weighted sum of *raw* conditional and unconditional scores ("components") with effective weights
λ_i·w_i·M_i and λ_i·(1-w_i)·M_i; unconditional predictions of experts sharing a model and a negative
prompt are computed once and their weights add.

The combined score is turned back into a denoised prediction (for EPS / VE coordinates)
    D = x + Σ_k W_k ⊙ (D_k - x)
and for CONST flow models
    D = (x + Σ_k W_k ⊙ ((1-σ) D_k - x)) / (1-σ).
Averaging predictions (Σ W_k D_k) is only right where the weights sum to one; for a product of
full-weight experts it is the classic bug.

The sampler needs the components, not only D, for the Feynman-Kac corrector weights. The documented
channel: a caller puts a :class:`PoECapture` under ``model_options[POE_CAPTURE_KEY]`` and calls the
model as usual; a product model fills ``capture.predictions`` with the :class:`ExpertPredictions` of
that call. ComfyUI passes ``model_options`` unchanged from the sampler to the guider, so the same
channel works for the PoE guider inside ComfyUI. A model that ignores the key is a single expert.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from .base import _expand, canonical_parameterization, is_flow

POE_CAPTURE_KEY = "poe_capture"

# call(model, conds, x, sigma) -> list of denoised predictions, one per cond, each shaped like x.
ModelCall = Callable[[Any, list, torch.Tensor, torch.Tensor], list]


def default_model_call(model, conds, x, sigma):
    """Evaluate an engine denoiser: ``model.denoise(x, sigma, conds)`` (see :class:`GenerativeExpert`)."""
    return list(model.denoise(x, sigma, conds))


@dataclass(eq=False)
class GenerativeExpert:
    """One diffusion / flow expert of a product.

    model:     a denoiser with ``parameterization`` and ``denoise(x, sigma, conds) -> [x0 per cond]``
               (inside ComfyUI the guider evaluates it through ``calc_cond_batch`` instead).
    positive:  the expert's conditioning (any object the model understands; None for unconditional).
    negative:  conditioning of the unconditional / negative branch; required when ``cfg != 1``.
    cfg:       the expert's own classifier-free guidance scale w.
    weight:    the expert's exponent λ in the product.
    mask:      optional soft region mask in [0, 1], broadcastable to one latent (C, H, W, ...) or to
               its spatial dims; the expert acts where the mask is non-zero.
    """

    model: Any
    positive: Any = None
    negative: Any = None
    cfg: float = 1.0
    weight: float = 1.0
    mask: Optional[torch.Tensor] = None
    name: str = ""

    def __post_init__(self):
        self.cfg = float(self.cfg)
        self.weight = float(self.weight)
        if not torch.isfinite(torch.tensor([self.cfg, self.weight])).all():
            raise ValueError(f"expert {self.name!r}: cfg and weight must be finite")
        if self.negative is None and self.cfg != 1.0:
            raise ValueError(
                f"expert {self.name!r}: cfg={self.cfg} needs a negative (unconditional) conditioning"
            )
        if self.mask is not None:
            mask = torch.as_tensor(self.mask, dtype=torch.float32)
            if torch.isnan(mask).any() or (mask < 0).any() or (mask > 1).any():
                raise ValueError(f"expert {self.name!r}: mask values must lie in [0, 1]")
            self.mask = mask

    @property
    def uses_cfg(self) -> bool:
        return self.negative is not None and self.cfg != 1.0


def expert_parameterization(expert: GenerativeExpert) -> str:
    return canonical_parameterization(getattr(expert.model, "parameterization", "eps"))


def mask_for(mask: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """Broadcast a region mask onto a batch x of shape (N, C, *spatial) (or (N, D) points).

    Accepted mask shapes: (*spatial), (C|1, *spatial) or (N|1, C|1, *spatial). A size that differs from
    the latent's is an error naming both shapes (resize masks to the latent resolution first; the
    ComfyUI node does that for you).
    """
    if mask is None:
        return None
    mask = mask.to(device=x.device, dtype=x.dtype)
    if mask.ndim > x.ndim or mask.ndim < max(1, x.ndim - 2):
        raise ValueError(f"mask of shape {tuple(mask.shape)} cannot apply to latents of shape {tuple(x.shape)}")
    mask = mask.reshape((1,) * (x.ndim - mask.ndim) + tuple(mask.shape))
    for dim, (m, n) in enumerate(zip(mask.shape, x.shape)):
        if m != n and m != 1:
            what = "batch" if dim == 0 else "channel" if dim == 1 else "spatial"
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not match latents of shape {tuple(x.shape)} "
                f"({what} dim {dim}: {m} vs {n})"
            )
    return mask


@dataclass
class ModelGroup:
    """All experts that share one model: their distinct conditionings, evaluated in one batched call."""

    model: Any
    conds: list = field(default_factory=list)
    expert_slots: list = field(default_factory=list)  # per expert of the group: (expert idx, pos slot, neg slot|None)


def plan_expert_calls(experts: Sequence[GenerativeExpert]) -> list[ModelGroup]:
    """Group experts by model identity and deduplicate conditionings by identity.

    Experts of one model with the same negative conditioning object share one unconditional
    prediction; every model is then evaluated once per step on all its distinct conditionings.
    """
    groups: dict[int, ModelGroup] = {}
    for idx, expert in enumerate(experts):
        group = groups.setdefault(id(expert.model), ModelGroup(model=expert.model))

        def slot(cond):
            for j, known in enumerate(group.conds):
                if known is cond:
                    return j
            group.conds.append(cond)
            return len(group.conds) - 1

        pos = slot(expert.positive)
        neg = slot(expert.negative) if expert.uses_cfg else None
        group.expert_slots.append((idx, pos, neg))
    return list(groups.values())


@dataclass
class ExpertPredictions:
    """Raw predictions of every expert at one (x, sigma) — the payload of the capture channel.

    cond[i]:   expert i's conditional denoised prediction.
    uncond[i]: its unconditional prediction (the *same tensor object* for experts sharing it), or None.
    """

    experts: Sequence[GenerativeExpert]
    cond: list
    uncond: list
    parameterization: str
    base: Optional[GenerativeExpert] = None
    base_weight: Optional[torch.Tensor] = None  # map filling uncovered pixels, None when no base
    cond_var: Optional[list] = None  # exact diag Cov[x0 | x] per prediction, when the model provides it
    uncond_var: Optional[list] = None

    def components(self, x: torch.Tensor, mode: str = "full", variances: bool = False) -> list[tuple[torch.Tensor, Any]]:
        """(denoised, weight) pairs whose weighted score sum is the product's score.

        mode "full": raw conditional and shared unconditional predictions with effective weights
        λ·w·M and Σ λ·(1-w)·M (CFG is a product too); mode "product": each expert's CFG-guided
        prediction with weight λ·M. Both give the same combined prediction; they differ only in
        which Feynman-Kac corrector they imply. ``variances=True`` returns the posterior variances diag
        Cov[x0 | x] in place of the predictions (same weights; Cov = σ² ∂D/∂x is linear in D, so a CFG'd
        expert's variance combines like its prediction), or None when the model gave none.
        """
        if variances and self.cond_var is None:
            return None
        if mode not in ("full", "product"):
            raise ValueError(f"components mode must be 'full' or 'product', got {mode!r}")
        out: list[tuple[torch.Tensor, Any]] = []
        shared: dict[int, int] = {}
        all_experts = list(self.experts) + ([self.base] if self.base is not None else [])
        for i, expert in enumerate(all_experts):
            is_base = i == len(self.experts)
            m = self.base_weight if is_base else mask_for(expert.mask, x)
            lam = expert.weight if m is None else expert.weight * m
            cond, uncond = self.cond[i], self.uncond[i]
            if variances:
                cond, uncond = self.cond_var[i], (self.uncond_var[i] if uncond is not None else None)
            if uncond is None:
                out.append((cond, lam))
            elif mode == "product":
                out.append((uncond + expert.cfg * (cond - uncond), lam))
            else:
                out.append((cond, lam * expert.cfg))
                w_u = lam * (1.0 - expert.cfg)
                key = id(self.uncond[i])
                if key in shared:
                    k = shared[key]
                    out[k] = (uncond, out[k][1] + w_u)
                else:
                    shared[key] = len(out)
                    out.append((uncond, w_u))
        return out


def combine_denoised(x: torch.Tensor, sigma, components, parameterization: str) -> torch.Tensor:
    """Weighted score sum of components converted back to one denoised prediction (exact product).

    EPS / VE: D = x + Σ W_k (D_k - x);  CONST: D = (x + Σ W_k ((1-σ) D_k - x)) / (1-σ).
    """
    flow = is_flow(parameterization)
    s = _expand(sigma, x)
    acc = torch.zeros_like(x)
    for denoised, w in components:
        target = (1 - s) * denoised if flow else denoised
        acc = acc + w * (target - x)
    if not flow:
        return x + acc
    pure_noise = torch.as_tensor(s >= 1.0)
    if not bool(pure_noise.any()):
        return (x + acc) / (1 - s)
    # At σ = 1 (infinite VE noise) each expert is ≈ N(D_k, σ²) around its prediction, so the product is
    # centred on the Λ-weighted mean of the predictions; the general formula would be 0/0 there.
    lam = torch.zeros_like(x)
    mean = torch.zeros_like(x)
    for denoised, w in components:
        lam = lam + w
        mean = mean + w * denoised
    return torch.where(pure_noise, mean / lam, (x + acc) / torch.where(pure_noise, torch.ones_like(s), 1 - s))


def coverage(experts: Sequence[GenerativeExpert], x: torch.Tensor) -> Optional[torch.Tensor]:
    """Σ_i M_i per element, or None when some expert is unmasked (covers everything)."""
    total = None
    for expert in experts:
        m = mask_for(expert.mask, x)
        if m is None:
            return None
        total = m.expand_as(x) if total is None else total + m
    return total


def evaluate_experts(
    experts: Sequence[GenerativeExpert],
    x: torch.Tensor,
    sigma: torch.Tensor,
    call: ModelCall = default_model_call,
    base: Optional[GenerativeExpert] = None,
    groups: Optional[list[ModelGroup]] = None,
) -> ExpertPredictions:
    """Evaluate every expert once: one ``call`` per distinct model with all its conditionings.

    ``base`` (optional) is an expert that fills pixels no mask covers, with weight
    clamp(1 - Σ M_i, 0, 1). Without a base, uncovered pixels are an error.
    """
    if not experts:
        raise ValueError("a product of experts needs at least one generative expert")
    all_experts = list(experts) + ([base] if base is not None else [])
    params = {expert_parameterization(e) for e in all_experts}
    flows = {p == "const" for p in params}
    if len(flows) > 1:
        raise ValueError(
            "experts mix flow (CONST) and diffusion (EPS/V) models; every expert of a product must use the "
            f"same latent space and noise parameterization, got {sorted(params)}"
        )
    cov = coverage(experts, x)
    base_weight = None
    if cov is not None:
        uncovered = cov <= 0
        if base is None and bool(uncovered.any()):
            frac = float(uncovered.float().mean())
            raise ValueError(
                f"{frac:.1%} of the latent is covered by no expert's mask; add an unmasked expert, "
                "widen the masks, or give a base expert to fill the rest"
            )
        if base is not None:
            base_weight = (1.0 - cov).clamp(0.0, 1.0)
    if groups is None:
        groups = plan_expert_calls(all_experts)
    cond: list = [None] * len(all_experts)
    uncond: list = [None] * len(all_experts)
    for group in groups:
        preds = call(group.model, group.conds, x, sigma)
        if len(preds) != len(group.conds):
            raise RuntimeError(f"model returned {len(preds)} predictions for {len(group.conds)} conditionings")
        for pred in preds:
            if pred.shape != x.shape:
                raise ValueError(f"a model returned a prediction of shape {tuple(pred.shape)} for input {tuple(x.shape)}")
        for idx, pos, neg in group.expert_slots:
            cond[idx] = preds[pos]
            uncond[idx] = preds[neg] if neg is not None else None
    return ExpertPredictions(
        experts=list(experts),
        cond=cond,
        uncond=uncond,
        parameterization=params.pop(),
        base=base,
        base_weight=base_weight,
    )


@dataclass
class PoECapture:
    """Mutable slot the sampler hands a model through ``model_options[POE_CAPTURE_KEY]``."""

    predictions: Optional[ExpertPredictions] = None
    want_variance: bool = False  # the sampler asks for exact posterior variances (models that have them)


def capture_predictions(model_options: Optional[dict], predictions: ExpertPredictions) -> None:
    """Hand per-expert predictions to whoever asked through the capture channel (no-op otherwise)."""
    if model_options:
        capture = model_options.get(POE_CAPTURE_KEY)
        if capture is not None:
            capture.predictions = predictions


def add_posterior_variances(product: "ProductOfExperts", preds: ExpertPredictions, x, sigma) -> None:
    """Fill ``preds.cond_var`` / ``uncond_var`` when every model has ``posterior_variance(x, sigma, conds)``
    (the analytic experts do; real networks do not, and the sampler estimates the trace instead)."""
    if not all(hasattr(g.model, "posterior_variance") for g in product.groups):
        return
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    n = len(preds.cond)
    cond_var, uncond_var = [None] * n, [None] * n
    for group in product.groups:
        out = group.model.posterior_variance(x, sigma, group.conds)
        for idx, pos, neg in group.expert_slots:
            cond_var[idx] = out[pos]
            uncond_var[idx] = out[neg] if neg is not None else None
    preds.cond_var, preds.uncond_var = cond_var, uncond_var


class ProductOfExperts:
    """A product of generative experts as one k-diffusion-style model: ``model(x, sigma) -> D``.

    Fills the capture channel (module docstring) so :func:`comfy_poe.samplers.sample_poe_smc` can
    compute Feynman-Kac corrector weights from the individual predictions.
    """

    def __init__(
        self,
        experts: Sequence[GenerativeExpert],
        base: Optional[GenerativeExpert] = None,
        call: ModelCall = default_model_call,
    ):
        self.experts = list(experts)
        self.base = base
        self.call = call
        if not self.experts:
            raise ValueError("a product of experts needs at least one generative expert")
        self.groups = plan_expert_calls(self.experts + ([base] if base is not None else []))
        self.parameterization = expert_parameterization(self.experts[0])

    def predict(self, x: torch.Tensor, sigma) -> ExpertPredictions:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        return evaluate_experts(self.experts, x, sigma, self.call, base=self.base, groups=self.groups)

    def __call__(self, x: torch.Tensor, sigma, model_options: Optional[dict] = None, **_unused) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        preds = self.predict(x, sigma)
        capture = (model_options or {}).get(POE_CAPTURE_KEY)
        if capture is not None and capture.want_variance:
            add_posterior_variances(self, preds, x, sigma)
        capture_predictions(model_options, preds)
        return combine_denoised(x, sigma, preds.components(x, "product"), preds.parameterization)
