"""GLAD as an anomalib model: ``anomalib train --model Glad``.

Paper: Yao et al., "GLAD: Towards Better Reconstruction with Global and Local Adaptive Diffusion
Models for Unsupervised Anomaly Detection" (ECCV 2024). Training fits the pixel-space DDPM prior on
normal images and on synthetic-anomaly versions of them, always towards the normal image; ``forward``
denoises each image from its own adaptive step and scores the nearest-neighbour feature distance
between the image and its reconstruction.
"""

from collections.abc import Sequence
from typing import Any

import torch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from anomalib.models.components import AnomalibModule

from anomalib_mdps.models.common import DiffusionModuleMixin, ScanExportMixin
from anomalib_mdps.models.input_size import square
from anomalib_mdps.models.prior_training import PriorTrainingMixin

from .torch_model import GladModel


class Glad(ScanExportMixin, PriorTrainingMixin, DiffusionModuleMixin, AnomalibModule):
    """Global and local adaptive diffusion.

    Settings of the model itself are :class:`GladModel`'s arguments, declared there once and taken
    here as ``model_settings`` (the CLI lists each). Those of training:

    Args:
        image_size: an integer is the short side, the long side following the training data's
            aspect ratio; a pair (height, width) is used as given.
        anomaly_probability: share of training images given a synthetic anomaly (authors: 0.5):
            a Perlin-noise mask filled with a procedural texture (anomalib's
            ``PerlinAnomalyGenerator`` without a texture folder, so nothing is read or downloaded),
            blended with weight U(0.2, 1) over the image (authors: (1 − β)·texture + β·image,
            β ~ U(0, 0.8)).
        calibration_images: normal training images held out of training, on which
            ``GladModel.calibrate`` measures the lock distance τ.
        step_batch_size: images per Adam step and per sampling call.
        max_epochs: training epochs of the denoiser.
        learning_rate, weight_decay, optimizer, lr_schedule: as for ``Mdps``.
        pre_processor, post_processor, evaluator, visualizer: anomalib components.
        model_settings: :class:`GladModel`'s arguments but ``image_size``.
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = 64,
        anomaly_probability: float = 0.5,
        calibration_images: int = 16,
        step_batch_size: int = 8,
        max_epochs: int = 30,
        learning_rate: float = 5e-4,
        weight_decay: float = 5e-2,
        optimizer: str = "adam",
        lr_schedule: str = "constant",
        pre_processor: torch.nn.Module | bool = True,
        post_processor: torch.nn.Module | bool = True,
        evaluator: Any = True,  # noqa: ANN401
        visualizer: Any = True,  # noqa: ANN401
        **model_settings: Any,  # noqa: ANN401
    ) -> None:
        super().__init__(
            pre_processor=self.configure_pre_processor(square(image_size)) if pre_processor is True else pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model = GladModel(image_size=square(image_size), **model_settings)
        self.short_side = image_size if isinstance(image_size, int) else None
        self.anomaly_generator = PerlinAnomalyGenerator(probability=anomaly_probability, blend_factor=(0.2, 1.0))
        self.setup_prior_training(
            calibration_images, step_batch_size, max_epochs, learning_rate, weight_decay, optimizer, lr_schedule,
        )

    def training_loss(self, images: torch.Tensor) -> torch.Tensor:
        """GLAD's anomaly-aware loss: half the images get a synthetic anomaly, all are led back to normal."""
        anomalous, _ = self.anomaly_generator(images)
        return self.model.training_loss(images, anomalous.clamp(0, 1))
