"""Experts: generative (diffusion / flow denoisers) and discriminative (log-potentials) — engine code, no ComfyUI."""
from .base import (
    CONST, EPS, LATENT, PIXEL, V_PREDICTION, X0, DiscriminativeExpert, canonical_parameterization,
    denoised_from_score, evaluate_potentials, from_ve, is_flow, score_from_denoised, sigma_to_ve, to_ve,
)
from .generative import (
    POE_CAPTURE_KEY, ExpertPredictions, GenerativeExpert, PoECapture, ProductOfExperts, capture_predictions,
    combine_denoised, evaluate_experts, mask_for, plan_expert_calls,
)
from .gmm import GaussianMixture, GMMDenoiser, gaussian_reward, product_of_mixtures
