"""A Gaussian of normal backbone features at every location (the model of PaDiM, Defard et al. 2021).

Not part of MDPS: Mdps may add its Mahalanobis distance to the eq.-18 map (``density_weight``).
The Gaussian is fit from streamed sums, so neither all embeddings nor one device must hold the
training set: under DDP the sums are added across ranks before the fit.
"""

from collections.abc import Callable

import torch
from anomalib.models.components.base import DynamicBufferMixin
from anomalib.models.image.padim.anomaly_map import AnomalyMapGenerator
from torch import nn
from torch.nn import functional as F  # noqa: N812

from .images import is_tracing

# PaDiM's ridge on the covariance: keeps it invertible with fewer images than dimensions.
COVARIANCE_RIDGE = 0.01


def stacked_stages(features: list[torch.Tensor]) -> torch.Tensor:
    """Backbone stages concatenated along channels at the finest stage's grid."""
    grid = features[0].shape[-2:]
    resized = [F.interpolate(f, size=grid, mode="bilinear", align_corners=False) for f in features[1:]]
    return torch.cat([features[0], *resized], dim=1)


class FeatureDensity(DynamicBufferMixin, nn.Module):
    """Per-location mean and inverse covariance of ``dims`` seeded, randomly chosen feature channels.

    ``accumulate`` adds normal embeddings to running sums; ``fit`` turns the sums into the Gaussian;
    ``distance`` is the Mahalanobis distance of each location of new embeddings to it.
    """

    def __init__(self, channels: int, dims: int = 100, seed: int = 0) -> None:
        super().__init__()
        if dims < 1:
            msg = f"density_dims must be >= 1, got {dims}."
            raise ValueError(msg)
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(channels, generator=generator)[: min(dims, channels)].sort().values
        self.register_buffer("channel_index", index)
        self.register_buffer("mean", torch.empty(0))  # (C, H·W), as anomalib's MultiVariateGaussian
        self.register_buffer("inv_covariance", torch.empty(0))  # (H·W, C, C)
        self.register_buffer("grid_shape", torch.zeros(2, dtype=torch.long))
        self.register_buffer("_count", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("_sum", torch.empty(0, dtype=torch.float64), persistent=False)
        self.register_buffer("_outer", torch.empty(0, dtype=torch.float64), persistent=False)

    @property
    def fitted(self) -> bool:
        return self.mean.numel() > 0

    @property
    def accumulating(self) -> bool:
        """Embeddings were added since the last fit."""
        return bool(self._count > 0)

    def reset(self) -> None:
        """Forget the Gaussian and the running sums (a new training run)."""
        self.mean, self.inv_covariance = self.mean[:0], self.inv_covariance[:0]
        self._count.zero_()
        self._sum, self._outer = self._sum[:0], self._outer[:0]

    def embedding(self, features: list[torch.Tensor]) -> torch.Tensor:
        """(B, C, h, w): the chosen channels of the stacked backbone stages."""
        return stacked_stages(features).index_select(1, self.channel_index)

    @torch.no_grad()
    def accumulate(self, embedding: torch.Tensor) -> None:
        """Add normal embeddings (B, C, h, w) to the running sums."""
        vectors = embedding.double().flatten(2).permute(2, 0, 1)  # (h·w, B, C)
        if self._sum.numel() == 0:
            self._sum = torch.zeros(vectors.shape[0], vectors.shape[2], dtype=torch.float64, device=vectors.device)
            self._outer = torch.zeros(
                vectors.shape[0], vectors.shape[2], vectors.shape[2], dtype=torch.float64, device=vectors.device,
            )
        self.grid_shape.copy_(torch.tensor(embedding.shape[-2:]))
        self._count += vectors.shape[1]
        self._sum += vectors.sum(dim=1)
        self._outer += vectors.transpose(1, 2) @ vectors

    @torch.no_grad()
    def fit(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """The Gaussian of everything accumulated (``reduce_sum`` adds the sums of all DDP ranks)."""
        count, total, outer = self._count, self._sum, self._outer
        if reduce_sum is not None:
            count, total, outer = reduce_sum(count), reduce_sum(total), reduce_sum(outer)
        if float(count) < 2:
            msg = f"The feature density needs at least 2 normal training images, got {int(count)}."
            raise ValueError(msg)
        mean = total / count
        covariance = (outer - count * mean.unsqueeze(2) * mean.unsqueeze(1)) / (count - 1)
        covariance += COVARIANCE_RIDGE * torch.eye(mean.shape[1], dtype=torch.float64, device=mean.device)
        self.mean = mean.T.float().contiguous()
        inverse = torch.linalg.inv(covariance)
        # Symmetric and row-major, as after loading from a state dict: the same layout gives the same rounding.
        self.inv_covariance = ((inverse + inverse.mT) / 2).float().contiguous()
        self._count.zero_()
        self._sum, self._outer = self._sum[:0], self._outer[:0]

    def distance(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w) Mahalanobis distance of each location's embedding to its normal Gaussian."""
        if not is_tracing() and (
            tuple(embedding.shape[-2:]) != self.grid_size or embedding.shape[1] != self.mean.shape[0]
        ):
            msg = (
                f"The feature density was fit on a {self.grid_size} feature grid of {self.mean.shape[0]} "
                f"channels, got {tuple(embedding.shape[1:])}: score images at the size the model was trained at."
            )
            raise ValueError(msg)
        return AnomalyMapGenerator.compute_distance(embedding, [self.mean, self.inv_covariance])

    @property
    def grid_size(self) -> tuple[int, int]:
        return (int(self.grid_shape[0]), int(self.grid_shape[1]))

