"""Samplers: AIS / SMC for products of experts, k-diffusion signature — engine code, no ComfyUI."""
from .resampling import (
    RESAMPLING_SCHEMES, effective_sample_size, log_mean_weight, normalized_log_weights, resample_indices,
)
from .smc import (
    FK_MODES, GUARDS, LOCALIZE, MCMC_KINDS, PRESETS, PROPOSALS, STEPS, TRACES, SELECTIONS, WEIGHTINGS, SMCReport,
    ancestral_sigmas, dpmpp_2m_coefficient, fk_increment,
    fk_lambda_numerator, fk_product_numerator, sample_best_of_n, sample_naive_composition, sample_poe_smc,
)
