"""Training of a pixel-space diffusion prior on normal images, shared by Mdps and Glad: fixed-size Adam
steps with the EMA after each, an optional cosine learning rate, and normal images held out of
training on which the torch model measures its normal-image statistics (``calibrate``).
"""

import math
from typing import Any

import torch
from anomalib.data import Batch

from .calibration import CalibrationHoldout

LR_SCHEDULES = ("constant", "cosine")
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


class PriorTrainingMixin:
    """Lightning hooks for a module whose ``model`` has ``prior``, ``update_ema`` and ``calibrate``.

    Modules call ``setup_prior_training`` in ``__init__`` and may override ``training_loss``.
    """

    def setup_prior_training(
        self,
        calibration_images: int,
        step_batch_size: int,
        max_epochs: int,
        learning_rate: float,
        weight_decay: float,
        optimizer: str,
        lr_schedule: str,
        selection_images: int = 0,
    ) -> None:
        if lr_schedule not in LR_SCHEDULES:
            msg = f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}."
            raise ValueError(msg)
        self.calibration = CalibrationHoldout(calibration_images, selection_images)
        self.step_batch_size = step_batch_size
        # One Adam step per ``step_batch_size`` images, whatever the datamodule's batch size.
        self.automatic_optimization = False
        self.max_epochs = max_epochs
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.optimizer_name = optimizer
        self.lr_schedule = lr_schedule

    def training_loss(self, images: torch.Tensor) -> torch.Tensor:
        """The loss of one Adam step on normal training images in [0, 1]."""
        return self.model.training_loss(images)

    def configure_optimizers(self) -> Any:  # noqa: ANN401
        if self.optimizer_name not in OPTIMIZERS:
            msg = f"optimizer must be one of {sorted(OPTIMIZERS)}, got {self.optimizer_name!r}."
            raise ValueError(msg)
        optimizer = OPTIMIZERS[self.optimizer_name](
            self.model.prior.denoiser.parameters(),
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
                loss = self.training_loss(images)
            else:  # a DDP rank whose images of this step were all held out: a zero gradient, in step
                loss = sum(parameter.sum() for parameter in self.model.prior.denoiser.parameters()) * 0.0
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
        """Normal-image statistics for the weights as they are now."""
        if self.calibration.stale and self.calibration.calibration_keys:
            self.model.calibrate(self.held_out_images(), batch_size=self.images_per_sampling_call)
        self.calibration.stale = False

    @property
    def images_per_sampling_call(self) -> int:
        """Images sampled together: at least one, and as many as keep their N_s samples within
        ``step_batch_size`` UNet inputs, as in training. Sampling holds N_s copies of every image
        and of its backbone features, so this bounds memory at any eval batch size; on 2 CPU cores
        it was also the fastest split (README, "Eight samples per image").
        """
        return max(1, self.step_batch_size // getattr(self.model, "num_samples", 1))

    def held_out_images(self, part: str = "calibration") -> torch.Tensor:
        """The held-out normal images of ``part`` (``calibration`` or ``selection``) as the
        pre-processor hands images to the model (resized).
        """
        transform = getattr(self.pre_processor, "transform", None) or (lambda image: image)
        return self.calibration.stacked(transform, self.device, part)

    def score_batch(self, batch: Batch) -> Batch:
        # Each image's map is independent of its batch (shared sampling noise): the split is exact.
        parts = [self.model.reconstruct(chunk) for chunk in batch.image.split(self.images_per_sampling_call)]
        output = type(parts[0])(*(None if field[0] is None else torch.cat(field) for field in zip(*parts, strict=True)))
        batch.update(pred_score=output.pred_score, anomaly_map=output.anomaly_map)
        batch.reconstruction = output.reconstruction
        if hasattr(output, "score_terms"):
            batch.score_terms = output.score_terms
        return batch

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        # No clipping: eq. 5 sums over pixels, and a clipped gradient would shrink the loss term
        # against Adam's weight decay again.
        return self.diffusion_trainer_arguments(self.max_epochs, gradient_clip_val=None)
