"""MDPS as an anomalib model: ``anomalib train --model Mdps``.

Paper: Wu et al., "Unsupervised Anomaly Detection via Masked Diffusion Posterior Sampling".
Training fits a DDPM ε-denoiser on normal images; ``forward`` runs Algorithm 1 twice
(m = 1, then the mask of eq. 20) and scores the averaged difference map (eqs. 18–19), fused with
the feature terms; where the fusion gives D̄ no weight, it runs neither pass.
"""

from collections.abc import Sequence
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.models.components import AnomalibModule

from anomalib_mdps.models.common import DiffusionModuleMixin, ScanExportMixin
from anomalib_mdps.models.input_size import square
from lightning.pytorch.utilities import rank_zero_info

from anomalib_mdps.models.prior_training import PriorTrainingMixin
from anomalib_mdps.selection_split import selection_split

from .sampler import Guidance, GuidanceNorm, ThresholdMode
from .torch_model import DensityStatistics, MdpsModel, ScoreFusion



class Mdps(ScanExportMixin, PriorTrainingMixin, DiffusionModuleMixin, AnomalibModule):
    """Masked Diffusion Posterior Sampling.

    The model arguments are those of :class:`MdpsModel` plus:

    Args:
        image_size: an integer is the short side, the long side following the training data's
            aspect ratio (a 250 × 630 part runs at 64 × 160, not squashed to 64 × 64); a pair
            (height, width) is used as given.
        step_batch_size: images per Adam step (a datamodule batch is split into such steps) and
            UNet inputs per sampling call (``step_batch_size // num_samples`` images, at least one),
            which bounds memory at any batch size.
        calibration_images: normal training images held out of the denoiser's training (chosen
            by a hash of their file names) on which ``MdpsModel.calibrate`` measures the
            normal-image statistics before validation, test and predict.
        selection_images: further held-out normal training images; with ``score_fusion='auto'``
            they and copies of them with synthetic defects (``selection_split``) choose the fusion
            of D̄ and the density (``MdpsModel.choose_fusion``), printed and saved with the weights.
            Calibration and selection together hold out at most half of the training images.
        max_epochs: training epochs of the denoiser (carried into the trainer arguments).
        learning_rate, weight_decay: Adam settings (paper: 1e-4 and 5e-2).
        optimizer: ``adam`` (paper) or ``adamw`` (decoupled weight decay).
        lr_schedule: ``constant`` (paper) or ``cosine``: the learning rate decays to zero over the
            trainer's epochs (stepped per epoch), so that short CPU runs end on settled weights.
        density_weight, score_density_weight, density_dims, density_statistics, input_scale, score_fusion,
        memory_size: see
            ``MdpsModel``; the density is fit on the first training epoch's images (held-out ones
            excluded). The pre-processor resizes images to ``input_scale`` × the denoiser's size.
        pre_processor, post_processor, evaluator, visualizer: anomalib components.
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = 64,
        unet_channels: Sequence[int] = (32, 64, 128, 256),
        layers_per_block: int = 1,
        attention_levels: Sequence[bool] | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        noise_level: int = 200,
        num_steps: int = 5,
        guidance_scale: float = 0.0,
        mask_guidance_scale: float | None = 1.0,
        guidance_norm: str = GuidanceNorm.SQUARED.value,
        ddim_eta: float = 1.0,
        num_samples: int = 4,
        use_mask: bool = True,
        mask_threshold: float = 0.5,
        threshold_mode: str = ThresholdMode.NORMAL.value,
        mask_quantile: float = 0.2,
        standardize: bool = True,
        guidance: str = Guidance.JACOBIAN_FREE.value,
        masked_guidance: bool = True,
        pixel_weight: float = 1.0,
        backbone: str = "tf_efficientnet_lite0",
        feature_layers: Sequence[str] = ("blocks.1", "blocks.2", "blocks.4"),
        feature_pool_size: int = 3,
        backbone_input_size: Sequence[int] | None = None,
        blur_sigma: float = 4.0,
        top_k: int = 500,
        ema_decay: float = 0.995,
        train_max_noise_level: int | None = 400,
        seed: int = 0,
        calibration_images: int = 16,
        selection_images: int = 16,
        step_batch_size: int = 8,
        max_epochs: int = 20,
        learning_rate: float = 5e-4,
        weight_decay: float = 5e-2,
        optimizer: str = "adam",
        lr_schedule: str = "constant",
        density_weight: float = 0.5,
        score_density_weight: float = 4.0,
        density_dims: int = 100,
        density_statistics: str = DensityStatistics.PER_LOCATION.value,
        input_scale: int = 4,
        score_fusion: str = ScoreFusion.AUTO.value,
        memory_size: int = 16384,
        pre_processor: torch.nn.Module | bool = True,
        post_processor: torch.nn.Module | bool = True,
        evaluator: Any = True,  # noqa: ANN401
        visualizer: Any = True,  # noqa: ANN401
    ) -> None:
        model = MdpsModel(
            image_size=square(image_size),
            unet_channels=unet_channels,
            layers_per_block=layers_per_block,
            attention_levels=attention_levels,
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            noise_level=noise_level,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            mask_guidance_scale=mask_guidance_scale,
            guidance_norm=guidance_norm,
            ddim_eta=ddim_eta,
            num_samples=num_samples,
            use_mask=use_mask,
            mask_threshold=mask_threshold,
            threshold_mode=threshold_mode,
            mask_quantile=mask_quantile,
            standardize=standardize,
            guidance=guidance,
            masked_guidance=masked_guidance,
            pixel_weight=pixel_weight,
            backbone=backbone,
            feature_layers=feature_layers,
            feature_pool_size=feature_pool_size,
            backbone_input_size=backbone_input_size,
            blur_sigma=blur_sigma,
            top_k=top_k,
            ema_decay=ema_decay,
            train_max_noise_level=train_max_noise_level,
            seed=seed,
            density_weight=density_weight,
            score_density_weight=score_density_weight,
            density_dims=density_dims,
            density_statistics=density_statistics,
            input_scale=input_scale,
            score_fusion=score_fusion,
            memory_size=memory_size,
        )
        super().__init__(
            # Images enter at the torch model's ``full_size`` (``input_scale`` × the denoiser's size).
            pre_processor=self.configure_pre_processor(model.full_size) if pre_processor is True else pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model = model
        self.short_side = image_size if isinstance(image_size, int) else None
        self.setup_prior_training(
            calibration_images, step_batch_size, max_epochs, learning_rate, weight_decay, optimizer, lr_schedule,
            selection_images if score_fusion == ScoreFusion.AUTO else 0,
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
                world_size = self.trainer.world_size
                gather = strategy.all_gather if world_size > 1 else None
                self.model.patch_memory.fit(gather, world_size)
            self.calibration.stale = True

    @classmethod
    def checkpoint_safe_globals(cls) -> Sequence[Any]:
        return (Guidance, GuidanceNorm, ThresholdMode, ScoreFusion)
