"""InvAD as an anomalib model: ``anomalib train --model InvAD``.

Paper: Sakai et al., "Reconstruction-Free Anomaly Detection with Diffusion Models via Direct
Latent Likelihood Evaluation". Training fits an ε-denoiser on backbone features of normal
images; ``forward`` inverts an image's features to z_T with a few deterministic DDIM steps and
scores −log N(z_T; 0, I), standardised with statistics of the normal training images.
"""

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.models.components import AnomalibModule
from lightning.pytorch.trainer.states import TrainerFn

from anomalib_mdps.models.common import DiffusionModuleMixin
from anomalib_mdps.models.input_size import square

from .torch_model import InvADModel

logger = logging.getLogger(__name__)


class InvAD(DiffusionModuleMixin, AnomalibModule):
    """Reconstruction-free anomaly detection by the latent likelihood of DDIM-inverted features.

    The model arguments are those of :class:`InvADModel` (``seed`` also orders the training
    batches, see ``DiffusionModuleMixin.on_fit_start``) plus:

    Args:
        image_size: (height, width), or an integer short side with the long side following the
            training data's aspect ratio (a 250 × 630 part runs at 256 × 640). The default stays
            square: aspect-aware input measured worse for InvAD on KolektorSDD and tire (README).
        max_epochs: training epochs of the denoiser (carried into the trainer arguments).
        learning_rate, weight_decay: AdamW settings.
        cache_features: keep each training image's backbone features after their first use;
            the backbone is frozen, so this is exact unless the data module augments training
            images (then the cache is switched off automatically).
        pre_processor, post_processor, evaluator, visualizer: anomalib components.
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = (256, 256),
        backbone: str = "tf_efficientnet_lite0",
        feature_layers: Sequence[str] = ("blocks.1", "blocks.2", "blocks.4"),
        feature_neighbourhood: int = 1,
        denoiser_channels: Sequence[int] = (32, 64),
        layers_per_block: int = 1,
        attention_levels: Sequence[bool] | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        noise_level: int = 1000,
        num_steps: int = 2,
        spatial_weight: float = 1.0,
        blur_sigma: float = 4.0,
        ema_decay: float = 0.995,
        seed: int = 0,
        max_epochs: int = 200,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-2,
        cache_features: bool = True,
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
        self.model = InvADModel(
            image_size=square(image_size),
            backbone=backbone,
            feature_layers=feature_layers,
            feature_neighbourhood=feature_neighbourhood,
            denoiser_channels=denoiser_channels,
            layers_per_block=layers_per_block,
            attention_levels=attention_levels,
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            noise_level=noise_level,
            num_steps=num_steps,
            spatial_weight=spatial_weight,
            blur_sigma=blur_sigma,
            ema_decay=ema_decay,
            seed=seed,
        )
        self.short_side = image_size if isinstance(image_size, int) else None
        self.max_epochs = max_epochs
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.cache_features = cache_features
        self._feature_cache: dict[str, torch.Tensor] = {}
        self._score_statistics_step: int | None = None
        self._warned_unfitted = False

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.model.prior.denoiser.parameters(),
            lr=self.learning_rate,
            weight_decay=self.weight_decay,
        )

    # ----------------------------------------------------------------- training
    def on_train_start(self) -> None:
        """Measure the feature statistics once, before the denoiser sees any feature.

        A resumed run keeps the statistics of its checkpoint: the denoiser was trained on them.
        """
        super().on_train_start()
        if self._augments_training_images():
            self.cache_features = False
        if not bool(self.model.feature_statistics_fitted):
            self.model.fit_feature_statistics(self._training_features())

    def training_step(self, batch: Batch, *args, **kwargs) -> torch.Tensor:
        del args, kwargs
        loss = self.model.training_loss(self._features(batch))
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch.image.shape[0])
        return loss

    def on_validation_start(self) -> None:
        # Validation during fit runs once, after the last training step (see the trainer
        # arguments), and before the checkpoint is written: the score statistics of the final
        # denoiser must exist by then for validation scores, thresholds and the checkpoint.
        if self.trainer.state.fn == TrainerFn.FITTING:
            self._fit_score_statistics()

    def on_train_epoch_end(self) -> None:
        # Without validation the last epoch's end is the last point before the checkpoint.
        if self.current_epoch + 1 >= (self.trainer.max_epochs or 0) or self.trainer.should_stop:
            self._fit_score_statistics()

    def _fit_score_statistics(self) -> None:
        if self._score_statistics_step == self.global_step:
            return
        with torch.inference_mode(False), torch.no_grad():
            self.model.fit_score_statistics(self._training_features())
        self._score_statistics_step = self.global_step

    def _training_features(self) -> Iterator[torch.Tensor]:
        """Raw features of every training image, in training-loader batches."""
        for batch in self.trainer.train_dataloader:
            yield self._features(batch)

    @torch.no_grad()
    def _features(self, batch: Batch) -> torch.Tensor:
        images = batch.image.to(self.device)
        paths = batch.image_path
        if not self.cache_features or paths is None:
            return self.model.raw_features(images)
        if all(path in self._feature_cache for path in paths):
            return torch.stack([self._feature_cache[path] for path in paths]).to(self.device)
        features = self.model.raw_features(images)
        for path, feature in zip(paths, features, strict=True):
            self._feature_cache[path] = feature.detach().clone()
        return features

    def _augments_training_images(self) -> bool:
        datamodule = getattr(self.trainer, "datamodule", None)
        return getattr(datamodule, "train_augmentations", None) is not None

    def on_fit_end(self) -> None:
        self._feature_cache.clear()

    # ---------------------------------------------------------------- inference
    def score_batch(self, batch: Batch) -> Batch:
        if not bool(self.model.score_statistics_fitted) and not self._warned_unfitted:
            logger.warning("InvAD scores with unfitted training statistics: train the model or load its checkpoint.")
            self._warned_unfitted = True
        output = self.model.score(batch.image)
        batch.update(pred_score=output.pred_score, anomaly_map=output.anomaly_map)
        return batch

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """The diffusion defaults, but evaluation runs under ``inference_mode``: InvAD needs no gradients."""
        return {**self.diffusion_trainer_arguments(self.max_epochs), "inference_mode": True}
