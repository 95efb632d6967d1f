"""When InvAD measures its score statistics: once the denoiser is final, before anything scores."""

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn


class FitScoreStatistics(Callback):
    """Fits ``InvADModel``'s score statistics on the training images' features with the final denoiser.

    During fit, validation runs once, after the last training step (see ``trainer_arguments``), and
    before the checkpoint is written: its scores, the thresholds and the checkpoint need the
    statistics, so they are fitted when validation starts; without validation, at the last epoch's
    end. Once per training step count, however many of these points are reached.
    """

    def __init__(self) -> None:
        self._fitted_at_step: int | None = None

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._fit(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.current_epoch + 1 >= (trainer.max_epochs or 0) or trainer.should_stop:
            self._fit(trainer, pl_module)

    def _fit(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._fitted_at_step == trainer.global_step:
            return
        with torch.inference_mode(False), torch.no_grad():
            pl_module.model.fit_score_statistics(pl_module.training_features())
        self._fitted_at_step = trainer.global_step
