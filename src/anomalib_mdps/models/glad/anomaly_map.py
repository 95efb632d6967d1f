"""GLAD's anomaly map and score: nearest-neighbour feature distances between the input and its
reconstruction, plus an optional pixel term; the image score is the top-k mean of the smoothed map.
"""

import torch

from anomalib_mdps.components import pixel_difference

from .sampler import nearest_neighbour_distance


def reconstruction_distance(
    images: torch.Tensor,
    reconstruction: torch.Tensor,
    features_images: list[torch.Tensor],
    features_reconstruction: list[torch.Tensor],
    pixel_weight: float = 0.0,
) -> torch.Tensor:
    """Σ_stages min_q (1 − cos(F(y)_p, F(x̂0)_q)) at every location p of the input, plus
    ``pixel_weight`` × the per-image max-normalised L1 difference (GLAD's optional pixel term).

    Each input location is compared with its nearest reconstruction feature anywhere, so a
    reconstruction that shifts normal texture a little costs nothing; an anomaly has no near
    neighbour in a normal reconstruction.
    """
    size = tuple(images.shape[-2:])
    distance = nearest_neighbour_distance(features_images, features_reconstruction, size)
    if pixel_weight:
        pixel = pixel_difference(reconstruction, images)
        pixel = pixel / pixel.flatten(1).amax(dim=1).clamp(min=1e-8).view(-1, 1, 1, 1)
        distance = distance + pixel_weight * pixel
    return distance
