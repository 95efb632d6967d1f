"""InvAD's anomaly map and scores: the likelihood of the inverted latent z_T under N(0, I), per image
and per location, and their standardisation with normal training statistics.
"""

import math

import torch


def gaussian_negative_log_likelihood(latent: torch.Tensor) -> torch.Tensor:
    """−log N(z_T; 0, I) = ½‖z_T‖² + (d/2)·log 2π per sample: InvAD's anomaly score."""
    dimensions = latent[0].numel()
    return 0.5 * latent.pow(2).flatten(1).sum(dim=1) + 0.5 * dimensions * math.log(2 * math.pi)


def latent_norm_map(latent: torch.Tensor) -> torch.Tensor:
    """‖z_T‖ over channels at every grid location, (B, 1, h, w): InvAD's anomaly map."""
    return latent.pow(2).sum(dim=1, keepdim=True).sqrt()


def spatial_score(norm_map: torch.Tensor) -> torch.Tensor:
    """max − min of the per-location ‖z_T‖ per sample: the spatial term the InvAD code adds to the
    NLL, sensitive to a small anomaly that barely moves the image-wide likelihood.
    """
    flat = norm_map.flatten(1)
    return flat.amax(dim=1) - flat.amin(dim=1)


def standardised(values: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(v − μ) / σ with μ, σ measured on normal training data (never on test data)."""
    return (values - mean) / std
