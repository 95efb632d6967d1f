"""Difference maps between an image and its reconstruction, and map-to-score reductions."""

import math

import torch
from anomalib.models.components.filters import GaussianBlur2d
from torch import nn
from torch.nn import functional as F  # noqa: N812


def pixel_difference(x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pixel L1 difference, averaged over channels: the pixel term of MDPS eq. 18.

    Images are in [0, 1]; the result has shape (B, 1, H, W).
    """
    return (y - x0).abs().mean(dim=1, keepdim=True)


def perceptual_difference(
    features_x0: list[torch.Tensor],
    features_y: list[torch.Tensor],
    size: tuple[int, int],
    pool_size: int = 1,
) -> torch.Tensor:
    """Σ_i (1 - cos(F_i(x0), F_i(y))) over feature stages, upsampled: the perceptual term of MDPS eq. 18.

    ``pool_size`` > 1 averages each stage over a local window first (the authors' code uses 3),
    which tolerates sub-feature misalignment between the reconstruction and the input.
    """
    total = torch.zeros(features_x0[0].shape[0], 1, *size, device=features_x0[0].device, dtype=features_x0[0].dtype)
    for fx, fy in zip(features_x0, features_y, strict=True):
        if pool_size > 1:
            fx = F.avg_pool2d(fx, pool_size, stride=1, padding=pool_size // 2)
            fy = F.avg_pool2d(fy, pool_size, stride=1, padding=pool_size // 2)
        dissimilarity = 1 - F.cosine_similarity(fx, fy, dim=1, eps=1e-6).unsqueeze(1)
        total = total + F.interpolate(dissimilarity, size=size, mode="bilinear", align_corners=False)
    return total


def anomaly_map_blur(image_size: tuple[int, int], sigma_at_256: float) -> nn.Module:
    """Gaussian smoothing of anomaly maps; σ is given for 256 px and scales with the image."""
    if sigma_at_256 <= 0:
        return nn.Identity()
    sigma = sigma_at_256 * min(image_size) / 256
    kernel_size = 2 * math.ceil(3 * sigma) + 1
    return GaussianBlur2d(sigma=sigma, channels=1, kernel_size=kernel_size)


def top_k_for_size(image_size: tuple[int, int], top_k_at_256: int) -> int:
    """S of MDPS scales with the image area: 500 pixels at 256², at least one."""
    return max(1, round(top_k_at_256 * image_size[0] * image_size[1] / 256**2))


def top_k_mean_score(anomaly_map: torch.Tensor, k: int) -> torch.Tensor:
    """Image score: the mean of the ``k`` largest pixel scores of each map (MDPS, sec. 4.3)."""
    flat = anomaly_map.flatten(1)
    return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(dim=1)
