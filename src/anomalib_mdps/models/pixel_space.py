"""What the pixel-space diffusion models (Mdps, GLAD) share: their size handling and their backbone."""

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_mdps.components import (
    anomaly_map_blur,
    backbone_size_for,
    check_unet_input_size,
    top_k_for_size,
    unet_downsampling_factor,
)
from anomalib_mdps.components.images import as_rgb_batch


class PixelSpaceModel(nn.Module):
    """A denoiser UNet on images at ``image_size`` and a feature extractor that scores them.

    Subclasses set ``unet_channels``, ``top_k_at_256``, ``blur_sigma``, ``fixed_backbone_input_size``
    and ``feature_extractor``, call ``track_input_size(self)``, then ``set_image_size``.
    """

    def set_image_size(self, image_size: Sequence[int]) -> None:
        """Run at ``image_size`` (height, width): the UNet is fully convolutional, so only the
        size-dependent parts follow (the top-k of the score, the blur, the backbone input).
        """
        size = (int(image_size[0]), int(image_size[1]))
        check_unet_input_size(*size, self.unet_channels)
        self.image_size = size
        self.full_size = size  # the size images enter at (Mdps: a multiple of it)
        self.input_size.copy_(torch.tensor(size))
        self.top_k = top_k_for_size(size, self.top_k_at_256)
        self.blur = anomaly_map_blur(size, self.blur_sigma)
        self.backbone_input_size = self.fixed_backbone_input_size or backbone_size_for(size)

    @property
    def size_factor(self) -> int:
        """Image sides must be multiples of this (the UNet's downsampling)."""
        return unet_downsampling_factor(self.unet_channels)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Backbone features of images in [0, 1], seen at ``backbone_input_size``."""
        images = F.interpolate(images, size=self.backbone_input_size, mode="bilinear", align_corners=False)
        return self.feature_extractor(images)

    def _checked(self, images: torch.Tensor) -> torch.Tensor:
        images = as_rgb_batch(images)
        check_unet_input_size(images.shape[-2], images.shape[-1], self.unet_channels)
        return images
