"""MDPS's anomaly map and score: the difference of eq. 18, averaged over samples (eq. 19), and the
top-S mean of sec. 4.3 (``top_k_mean_score`` in ``components``).
"""

import torch

from anomalib_mdps.components import perceptual_difference, pixel_difference


def reconstruction_difference(
    x0: torch.Tensor,
    y: torch.Tensor,
    features_x0: list[torch.Tensor],
    features_y: list[torch.Tensor],
    pixel_weight: float,
    pool_size: int = 1,
    term_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """[D(x0, y)]_k = η‖y_k − x0_k‖₁ + Σ_{i∈J} (1 − cos(F_i^k(x0), F_i^k(y))): MDPS eq. 18.

    ``term_scale`` (2,) divides the pixel and the perceptual term by their spread on normal
    images first, so that η weighs two terms of the same scale.
    """
    pixel = pixel_difference(x0, y)
    perceptual = perceptual_difference(features_x0, features_y, tuple(y.shape[-2:]), pool_size)
    return weighted_terms(pixel, perceptual, pixel_weight, term_scale)


def weighted_terms(
    pixel: torch.Tensor, perceptual: torch.Tensor, pixel_weight: float, term_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """η·pixel + perceptual, the sum of eq. 18, each term first divided by ``term_scale`` when given."""
    if term_scale is not None:
        pixel, perceptual = pixel / term_scale[0], perceptual / term_scale[1]
    return pixel_weight * pixel + perceptual


def mean_over_samples(difference: torch.Tensor, num_samples: int) -> torch.Tensor:
    """D̄ = (1/N_s)·Σ_j D(x0^(j), y) for samples stored image-major (b·N_s + j): MDPS eq. 19."""
    return difference.unflatten(0, (-1, num_samples)).mean(dim=1)
