"""MDPS as an anomalib model: ``anomalib train --model Mdps``.

Paper: Wu et al., "Unsupervised Anomaly Detection via Masked Diffusion Posterior Sampling". The
maths is in ``torch_model``; this module trains it and holds out the images that calibrate it.
"""

from collections.abc import Sequence
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.models.components import AnomalibModule
from lightning.pytorch.utilities import rank_zero_info

from anomalib_mdps.models.common import DiffusionModuleMixin, ScanExportMixin
from anomalib_mdps.models.input_size import square
from anomalib_mdps.models.prior_training import PriorTrainingMixin
from anomalib_mdps.selection_split import selection_split

from .sampler import Guidance, GuidanceNorm, ThresholdMode
from .torch_model import DensityStatistics, MdpsModel, ScoreFusion


class Mdps(ScanExportMixin, PriorTrainingMixin, DiffusionModuleMixin, AnomalibModule):
    """Masked Diffusion Posterior Sampling.

    Settings of the model itself are :class:`MdpsModel`'s arguments, declared there once and taken
    here as ``model_settings`` (the CLI lists each, ``--model.num_samples``). Those of training:

    Args:
        image_size: an integer is the short side, the long side following the training data's aspect
            ratio (a 250 × 630 part runs at 64 × 160); a pair (height, width) is used as given.
        step_batch_size: images per Adam step, and UNet inputs per sampling call (``step_batch_size
            // num_samples`` images, at least one), which bounds memory at any batch size.
        calibration_images: normal training images held out of training (by a hash of their file
            names), on which ``MdpsModel.calibrate`` measures the normal-image statistics.
        selection_images: further held-out normal training images; with ``score_fusion='auto'``
            they and copies with synthetic defects (``selection_split``) choose the fusion of the
            terms (``MdpsModel.choose_fusion``), printed and saved with the weights. Calibration and
            selection together hold out at most half of the training images.
        max_epochs: training epochs of the denoiser (carried into the trainer arguments).
        learning_rate, weight_decay: Adam settings (paper: 1e-4 and 5e-2).
        optimizer: ``adam`` (paper) or ``adamw`` (decoupled weight decay).
        lr_schedule: ``constant`` (paper) or ``cosine`` (to zero over the trainer's epochs).
        pre_processor, post_processor, evaluator, visualizer: anomalib components.
        model_settings: :class:`MdpsModel`'s arguments but ``image_size``. The feature density and
            the patch memory are fit on the first training epoch's images, held-out ones excluded.
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = 64,
        calibration_images: int = 16,
        selection_images: int = 16,
        step_batch_size: int = 8,
        max_epochs: int = 20,
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
        model = MdpsModel(image_size=square(image_size), **model_settings)
        super().__init__(
            pre_processor=self.configure_pre_processor(model.full_size) if pre_processor is True else pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model = model
        self.short_side = image_size if isinstance(image_size, int) else None
        self.setup_prior_training(
            calibration_images, step_batch_size, max_epochs, learning_rate, weight_decay, optimizer, lr_schedule,
            selection_images if model.score_fusion == ScoreFusion.AUTO else 0,
        )

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.current_epoch == 0:
            self.model.feature_density.reset()
            if self.model.patch_memory is not None:
                self.model.patch_memory.reset()

    def training_step(self, batch: Batch, *args, **kwargs) -> None:
        """The denoiser's Adam steps; in the first epoch also the feature density's sums and the patch memory."""
        if self.model.uses_density and self.current_epoch == 0 and not self.model.feature_density.fitted:
            self.model.accumulate_feature_density(self.calibration.split_off(batch))
        super().training_step(batch, *args, **kwargs)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self._fit_density_if_accumulated()

    def _calibrate_if_stale(self) -> None:
        # Lightning validates before ``on_train_epoch_end``: the first calibration needs the density.
        self._fit_density_if_accumulated()
        stale = self.calibration.stale
        super()._calibrate_if_stale()
        if stale and self.model.score_fusion == ScoreFusion.AUTO and self.calibration.has_selection:
            split = selection_split(self.held_out_images("selection"), seed=self.model.seed)
            choice = self.model.choose_fusion(split, batch_size=self.images_per_sampling_call)
            normal = int((split.labels == 0).sum())
            rank_zero_info(choice.summary(normal, len(split.labels) - normal))

    def _fit_density_if_accumulated(self) -> None:
        if self.model.feature_density.accumulating:
            strategy = self.trainer.strategy
            self.model.feature_density.fit(lambda total: strategy.reduce(total, reduce_op="sum"))
            if self.model.patch_memory is not None and self.model.patch_memory.accumulating:
                gather = strategy.all_gather if self.trainer.world_size > 1 else None
                self.model.patch_memory.fit(gather, self.trainer.world_size)
            self.calibration.stale = True

    @classmethod
    def checkpoint_safe_globals(cls) -> Sequence[Any]:
        return (Guidance, GuidanceNorm, ThresholdMode, ScoreFusion, DensityStatistics)
