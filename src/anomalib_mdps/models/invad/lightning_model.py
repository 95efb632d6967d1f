"""InvAD as an anomalib model: ``anomalib train --model InvAD``.

Paper: Sakai et al., "Reconstruction-Free Anomaly Detection with Diffusion Models via Direct
Latent Likelihood Evaluation". The maths is in ``torch_model``.
"""

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.models.components import AnomalibModule

from anomalib_mdps.models.common import DiffusionModuleMixin
from anomalib_mdps.models.input_size import square

from .feature_cache import TrainingFeatureCache
from .score_statistics import FitScoreStatistics
from .torch_model import InvADModel

logger = logging.getLogger(__name__)


class InvAD(DiffusionModuleMixin, AnomalibModule):
    """Reconstruction-free anomaly detection by the latent likelihood of DDIM-inverted features.

    Settings of the model itself are :class:`InvADModel`'s arguments, declared there once and taken
    here as ``model_settings`` (the CLI lists each; ``seed`` also orders the training batches, see
    ``common.SeededFit``). Those of training:

    Args:
        image_size: (height, width), or an integer short side with the long side following the
            training data's aspect ratio. The default stays square: aspect-aware input measured
            worse for InvAD on KolektorSDD and tire (README).
        max_epochs: training epochs of the denoiser (carried into the trainer arguments).
        learning_rate, weight_decay: AdamW settings.
        cache_features: keep each training image's backbone features after their first use
            (``TrainingFeatureCache``; off by itself where the data module augments training images).
        pre_processor, post_processor, evaluator, visualizer: anomalib components.
        model_settings: :class:`InvADModel`'s arguments but ``image_size``.
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = (256, 256),
        max_epochs: int = 200,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-2,
        cache_features: bool = True,
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
        self.model = InvADModel(image_size=square(image_size), **model_settings)
        self.short_side = image_size if isinstance(image_size, int) else None
        self.max_epochs = max_epochs
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.feature_cache = TrainingFeatureCache(enabled=cache_features)
        self._warned_unfitted = False

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.prior.denoiser.parameters(), lr=self.learning_rate,
                                 weight_decay=self.weight_decay)

    def on_train_start(self) -> None:
        """Measure the feature statistics once, before the denoiser sees any feature (a resumed run
        keeps its checkpoint's: the denoiser was trained on them).
        """
        super().on_train_start()
        if getattr(self.trainer.datamodule, "train_augmentations", None) is not None:
            self.feature_cache.enabled = False
        if not bool(self.model.feature_statistics_fitted):
            self.model.fit_feature_statistics(self.training_features())

    def training_step(self, batch: Batch, *args, **kwargs) -> torch.Tensor:
        del args, kwargs
        loss = self.model.training_loss(self._features(batch))
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch.image.shape[0])
        return loss

    def configure_callbacks(self) -> Any:  # noqa: ANN401
        return [*super().configure_callbacks(), FitScoreStatistics()]

    def training_features(self) -> Iterator[torch.Tensor]:
        """Raw features of every training image, in training-loader batches."""
        for batch in self.trainer.train_dataloader:
            yield self._features(batch)

    def _features(self, batch: Batch) -> torch.Tensor:
        return self.feature_cache.features(batch.image.to(self.device), batch.image_path, self.model.raw_features)

    def on_fit_end(self) -> None:
        self.feature_cache.clear()

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
