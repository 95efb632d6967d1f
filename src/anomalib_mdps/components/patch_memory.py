"""Distance of each patch to its nearest normal patch, wherever that one sat (the idea of PatchCore,
Roth et al. 2022).

Not part of MDPS. The per-location Gaussian of ``feature_density`` assumes that parts sit in the same
place in every image; tyres, hanging plates and many users' parts do not. This memory does not index
by location. It keeps a seeded random subsample of the normal training patches instead of
PatchCore's greedy coreset, whose k-center loop takes half an hour per category on two CPU cores.
"""

from collections.abc import Callable

import torch
from anomalib.models.components.base import DynamicBufferMixin
from torch import nn
from torch.nn import functional as F  # noqa: N812

from .images import is_tracing

# Local aggregation of the embedding before it is stored or compared (PatchCore's 3 x 3 neighbourhood),
# and the stride of the patch grid: every second location of the backbone's finest grid.
PATCH_POOL = 3
PATCH_STRIDE = 2
# Query patches compared at once: bounds the distance matrix to QUERY_CHUNK x memory size floats.
QUERY_CHUNK = 2048


class PatchMemory(DynamicBufferMixin, nn.Module):
    """``size`` normal patch embeddings; ``distance`` is each new patch's distance to the nearest.

    ``accumulate`` collects normal embeddings (B, C, h, w); ``fit`` draws the memory from them.
    """

    def __init__(self, size: int = 16384, seed: int = 0) -> None:
        super().__init__()
        if size < 1:
            msg = f"memory_size must be >= 1, got {size}."
            raise ValueError(msg)
        self.size = size
        self.seed = seed
        self.register_buffer("memory", torch.empty(0))  # (M, C)
        self._collected: list[torch.Tensor] = []

    @property
    def fitted(self) -> bool:
        return self.memory.numel() > 0

    @property
    def accumulating(self) -> bool:
        return bool(self._collected)

    def reset(self) -> None:
        self.memory = self.memory[:0]
        self._collected = []

    @staticmethod
    def patches(embedding: torch.Tensor) -> torch.Tensor:
        """(B, C, h', w'): the embedding averaged over 3 x 3 neighbourhoods, on a grid of stride 2."""
        pooled = F.avg_pool2d(embedding, PATCH_POOL, stride=1, padding=PATCH_POOL // 2, count_include_pad=False)
        return pooled[..., ::PATCH_STRIDE, ::PATCH_STRIDE]

    @torch.no_grad()
    def accumulate(self, embedding: torch.Tensor) -> None:
        """Keep the patches of normal embeddings (in float16: a memory of them, not a sum)."""
        patches = self.patches(embedding)
        self._collected.append(patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1]).half())

    @torch.no_grad()
    def fit(self, gather: Callable[[torch.Tensor], torch.Tensor] | None = None, world_size: int = 1) -> None:
        """Draw ``size`` of the collected patches, seeded. Under DDP each rank draws ``size / world_size``
        of its own and ``gather`` (all-gather, stacked by rank) joins them.
        """
        if not self._collected:
            msg = "The patch memory needs normal training images; none were collected."
            raise ValueError(msg)
        collected = torch.cat(self._collected)
        self._collected = []
        share = max(1, self.size // world_size)
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(collected), generator=generator)
        # Repeating patches when a rank has fewer than its share keeps the gathered shapes equal.
        picked = collected[order.repeat(-(-share // len(order)))[:share].to(collected.device)].float()
        if gather is not None:
            picked = gather(picked).reshape(-1, picked.shape[-1])
        self.memory = picked.contiguous()

    def distance(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, 1, h', w'): each patch's Euclidean distance to its nearest patch in the memory."""
        if not is_tracing() and (not self.fitted or embedding.shape[1] != self.memory.shape[1]):
            msg = (
                f"The patch memory holds {tuple(self.memory.shape)} embeddings, got {embedding.shape[1]} channels: "
                "train the model (it fills the memory in the first epoch) or call fit_feature_density."
            )
            raise ValueError(msg)
        patches = self.patches(embedding)
        batch, channels, height, width = patches.shape
        queries = patches.permute(0, 2, 3, 1).reshape(-1, channels)
        if is_tracing():
            # An exported graph takes the whole batch at once (its length is symbolic) and has no cdist:
            # ‖q‖² − 2 q·m + ‖m‖², which is also how cdist computes it for matrices this large.
            squared = queries.pow(2).sum(dim=1, keepdim=True) - 2 * queries @ self.memory.T + self.memory.pow(2).sum(1)
            nearest = squared.amin(dim=1).clamp(min=0).sqrt()
        else:
            nearest = torch.cat([torch.cdist(chunk, self.memory).amin(dim=1) for chunk in queries.split(QUERY_CHUNK)])
        return nearest.reshape(batch, 1, height, width)
