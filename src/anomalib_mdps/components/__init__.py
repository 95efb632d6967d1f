"""Diffusion building blocks shared by the plugin's models."""

from .backbone import FeatureExtractor, backbone_size_for, load_efficientnet_lite
from .feature_density import FeatureDensity
from .patch_memory import PatchMemory
from .ddim import ddim_inversion_step, ddim_step, predicted_clean_image
from .denoiser import UNetDenoiser, build_unet, check_unet_input_size, unet_downsampling_factor
from .difference import (
    anomaly_map_blur,
    perceptual_difference,
    pixel_difference,
    top_k_mean_score,
    top_k_for_size,
)
from .prior import Denoiser, DiffusionPrior, TrainingTarget
from .schedule import NoiseSchedule, check_noise_level, ddim_step_pairs, forward_diffusion

__all__ = [
    "Denoiser",
    "DiffusionPrior",
    "FeatureDensity",
    "FeatureExtractor",
    "NoiseSchedule",
    "PatchMemory",
    "UNetDenoiser",
    "anomaly_map_blur",
    "backbone_size_for",
    "build_unet",
    "check_noise_level",
    "check_unet_input_size",
    "ddim_inversion_step",
    "ddim_step",
    "ddim_step_pairs",
    "forward_diffusion",
    "load_efficientnet_lite",
    "perceptual_difference",
    "predicted_clean_image",
    "pixel_difference",
    "top_k_for_size",
    "top_k_mean_score",
    "TrainingTarget",
    "unet_downsampling_factor",
]
