"""Backbone features of InvAD's training images, kept after their first use.

The backbone is frozen, so a training image's features never change: caching them is exact as long
as the data module does not augment the training images (``InvAD`` switches the cache off then).
"""

from collections.abc import Callable, Sequence

import torch


class TrainingFeatureCache:
    """Features by image path; ``enabled`` false (or batches without paths) computes every time."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._features: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def features(
        self, images: torch.Tensor, paths: Sequence[str] | None, extract: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        if not self.enabled or paths is None:
            return extract(images)
        if all(path in self._features for path in paths):
            return torch.stack([self._features[path] for path in paths]).to(images.device)
        features = extract(images)
        for path, feature in zip(paths, features, strict=True):
            self._features[path] = feature.detach().clone()
        return features

    def clear(self) -> None:
        self._features.clear()
