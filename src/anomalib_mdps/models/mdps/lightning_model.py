"""MDPS as an anomalib model: ``anomalib train --model Mdps``.

Paper: Wu et al., "Unsupervised Anomaly Detection via Masked Diffusion Posterior Sampling".
Training fits a DDPM ε-denoiser on normal images; ``forward`` runs Algorithm 1 twice
(m = 1, then the mask of eq. 20) and scores the averaged difference map (eqs. 18–19).
"""

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.models.components import AnomalibModule

from anomalib_mdps.models.common import DiffusionModuleMixin
from anomalib_mdps.models.input_size import square

from .calibration import CalibrationHoldout
from .sampler import Guidance, GuidanceNorm, ThresholdMode
from .torch_model import MdpsModel


LR_SCHEDULES = ("constant", "cosine")


class Mdps(DiffusionModuleMixin, AnomalibModule):
    """Masked Diffusion Posterior Sampling.

    The model arguments are those of :class:`MdpsModel` plus:

    Args:
        image_size: an integer is the short side, the long side following the training data's
            aspect ratio (a 250 × 630 part runs at 64 × 160, not squashed to 64 × 64); a pair
            (height, width) is used as given.
        step_batch_size: images per Adam step; a datamodule batch is split into such steps.
        calibration_images: normal training images held out of the denoiser's training (chosen
            by a hash of their file names) on which ``MdpsModel.calibrate`` measures the
            normal-image statistics before validation, test and predict.
        max_epochs: training epochs of the denoiser (carried into the trainer arguments).
        learning_rate, weight_decay: Adam settings (paper: 1e-4 and 5e-2).
        optimizer: ``adam`` (paper) or ``adamw`` (decoupled weight decay).
        lr_schedule: ``constant`` (paper) or ``cosine``: the learning rate decays to zero over the
            trainer's epochs (stepped per epoch), so that short CPU runs end on settled weights.
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
        num_samples: int = 2,
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
    ) -> None:
        super().__init__(
            pre_processor=self.configure_pre_processor(square(image_size)) if pre_processor is True else pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model = MdpsModel(
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
        )
        self.short_side = image_size if isinstance(image_size, int) else None
        self.calibration = CalibrationHoldout(calibration_images)
        self.step_batch_size = step_batch_size
        # One Adam step per ``step_batch_size`` images, whatever the datamodule's batch size.
        self.automatic_optimization = False
        self.max_epochs = max_epochs
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.optimizer_name = optimizer
        if lr_schedule not in LR_SCHEDULES:
            msg = f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}."
            raise ValueError(msg)
        self.lr_schedule = lr_schedule

    def configure_optimizers(self) -> Any:  # noqa: ANN401
        optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
        if self.optimizer_name not in optimizers:
            msg = f"optimizer must be one of {sorted(optimizers)}, got {self.optimizer_name!r}."
            raise ValueError(msg)
        optimizer = optimizers[self.optimizer_name](
            self.model.denoiser.parameters(),
            lr=self.learning_rate,
            weight_decay=self.weight_decay,
        )
        epochs = self.trainer.max_epochs if self._trainer is not None else self.max_epochs
        if self.lr_schedule == "constant" or not epochs or epochs < 1:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)}

    def on_train_epoch_end(self) -> None:
        """Manual optimisation steps its learning-rate schedule itself, once per epoch."""
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.calibration.choose(self.attached_datamodule)

    def training_step(self, batch: Batch, *args, **kwargs) -> None:
        """Adam steps of ``step_batch_size`` images (the paper's batch 8), each followed by the EMA
        update, so that the training budget of ``max_epochs`` does not depend on the datamodule's
        batch size (anomalib's default is 32: a quarter of the steps).
        """
        del args, kwargs
        optimizer = self.optimizers()
        for images in self.adam_steps(batch, self.trainer.world_size):
            if images.shape[0]:
                loss = self.model.training_loss(images)
            else:  # a DDP rank whose images of this step were all held out: a zero gradient, in step
                loss = sum(parameter.sum() for parameter in self.model.denoiser.parameters()) * 0.0
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            self.model.update_ema()
            if images.shape[0]:
                self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=images.shape[0])
        self.calibration.stale = True

    def adam_steps(self, batch: Batch, world_size: int = 1) -> list[torch.Tensor]:
        """The batch's training images (held-out ones removed) in chunks of ``step_batch_size``.

        Under DDP (``world_size`` > 1) every rank must run as many gradient all-reduces as the
        others, so the chunk count follows the batch as loaded (equal on all ranks), padded with
        empty chunks, not what is left after the held-out images.
        """
        # A batch of held-out images only leaves nothing to train on (split gives one empty chunk).
        chunks = [chunk for chunk in self.calibration.split_off(batch).split(self.step_batch_size) if len(chunk)]
        if world_size > 1:
            steps = math.ceil(batch.image.shape[0] / self.step_batch_size)
            chunks += [batch.image[:0]] * (steps - len(chunks))
        return chunks

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:  # noqa: ANN401
        """The EMA is updated after each Adam step inside ``training_step``."""
        del outputs, batch, batch_idx

    def on_validation_start(self) -> None:
        self._calibrate_if_stale()

    def on_test_start(self) -> None:
        self._calibrate_if_stale()

    def on_predict_start(self) -> None:
        self._calibrate_if_stale()

    def _calibrate_if_stale(self) -> None:
        """Normal-image statistics for the weights as they are now (eq. 18 scales, eq. 20 threshold)."""
        if self.calibration.stale and len(self.calibration.images):
            self.model.calibrate(self.held_out_images())
        self.calibration.stale = False

    def held_out_images(self) -> torch.Tensor:
        """The held-out normal images as the pre-processor hands images to the model (resized)."""
        transform = getattr(self.pre_processor, "transform", None) or (lambda image: image)
        return self.calibration.stacked(transform, self.device)

    def score_batch(self, batch: Batch) -> Batch:
        output = self.model.reconstruct(batch.image)
        batch.update(pred_score=output.pred_score, anomaly_map=output.anomaly_map)
        batch.reconstruction = output.reconstruction
        return batch

    def to_torch(self, *args, **kwargs) -> Path:
        """Exported models use the autograd-free guidance (see ``MdpsModel.exportable``)."""
        with self.model.exportable():
            return super().to_torch(*args, **kwargs)

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs,  # noqa: ANN003
    ) -> Path:
        """Exported models use the autograd-free guidance (see ``MdpsModel.exportable``).

        The DDIM loop becomes one ONNX ``Scan`` (opset 18). Its body is traced with a symbolic batch
        on which diffusers' upsampler branches (``batch >= 64``), so the batch axis is exported as
        ``Dim.DYNAMIC`` (ranges may be refined) instead of anomalib's strict ``Dim("batch_size")``.
        Without ``input_size`` the graph takes images at the model's size (``image_size``).
        """
        input_size = tuple(input_size) if input_size is not None else self.model.image_size
        if "dynamic_shapes" not in kwargs and "dynamic_axes" not in kwargs:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim.DYNAMIC},)
        kwargs.setdefault("opset_version", 18)
        with self.model.exportable():
            return super().to_onnx(export_root, model_file_name, input_size, **kwargs)

    @classmethod
    def checkpoint_safe_globals(cls) -> Sequence[Any]:
        return (Guidance, GuidanceNorm, ThresholdMode)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        # No clipping: eq. 5 sums over pixels, and a clipped gradient would shrink the loss term
        # against Adam's weight decay again.
        return self.diffusion_trainer_arguments(self.max_epochs, gradient_clip_val=None)

    @property
    def learning_type(self) -> LearningType:
        return LearningType.ONE_CLASS
