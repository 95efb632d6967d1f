"""Diffusion building blocks shared by the plugin's models."""

from .backbone import FeatureExtractor, load_efficientnet_lite
from .ddim import ddim_inversion_step, ddim_step, predicted_clean_image
from .denoiser import UNetDenoiser, build_unet, check_unet_input_size, exponential_moving_average, unet_downsampling_factor
from .difference import (
    anomaly_map_blur,
    mean_over_samples,
    perceptual_difference,
    pixel_difference,
    reconstruction_difference,
    weighted_terms,
    top_k_mean_score,
    top_k_for_size,
)
from .schedule import NoiseSchedule, ddim_step_pairs

__all__ = [
    "FeatureExtractor",
    "NoiseSchedule",
    "UNetDenoiser",
    "exponential_moving_average",
    "anomaly_map_blur",
    "build_unet",
    "check_unet_input_size",
    "ddim_inversion_step",
    "ddim_step",
    "ddim_step_pairs",
    "load_efficientnet_lite",
    "mean_over_samples",
    "perceptual_difference",
    "predicted_clean_image",
    "pixel_difference",
    "reconstruction_difference",
    "weighted_terms",
    "top_k_for_size",
    "top_k_mean_score",
    "unet_downsampling_factor",
]
