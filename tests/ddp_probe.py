"""A callback for the DDP test: each rank saves what must agree across ranks after testing."""

from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class RankStateDump(Callback):
    """Writes ``rank<k>.pt``: EMA weights, sampling noise, normal-image statistics, test metrics."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        model = pl_module.model
        self.directory.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "world_size": trainer.world_size,
                "ema": {name: value.detach().cpu() for name, value in model.prior.ema_denoiser.state_dict().items()},
                "noise": model.sampling_noise.detach().cpu(),
                "term_scale": model.term_scale.detach().cpu(),
                "normal_mask_threshold": model.normal_mask_threshold.detach().cpu(),
                "density_mean": model.feature_density.mean.detach().cpu(),
                "density_scale": model.density_scale.detach().cpu(),
                "patch_memory": model.patch_memory.memory.detach().cpu(),
                "fusion": model.fusion.detach().cpu(),
                "metrics": {name: float(value) for name, value in trainer.callback_metrics.items()},
            },
            self.directory / f"rank{trainer.global_rank}.pt",
        )
