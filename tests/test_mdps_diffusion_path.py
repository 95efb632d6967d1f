"""The diffusion part of Mdps, D̄ of eqs. 18-19, localises defects on its own, and a broken denoiser shows.

The default score and map fuse D̄ with two feature terms that can pass a test on their own; these
tests read D̄ alone, so they fail when the denoiser or the sampler is broken even where the fused
output would still pass.
"""

from pathlib import Path

import pytest
import torch
from anomalib.cli import AnomalibCLI
from sklearn.metrics import roc_auc_score
from torch import nn


# D̄ alone of the smoke preset scored pixel AUROC 0.799 on bottle here; with a denoiser that predicts
# zeros, 0.733 (the input's own features still mark some defects). The floor catches an inverted or
# constant map with room for other CPUs' rounding; the trained denoiser must beat a zeroed one clearly.
EQ18_PIXEL_AUROC_FLOOR = 0.7
TRAINED_OVER_ZEROED = 0.03


class ZeroDenoiser(nn.Module):
    """A denoiser that predicts no noise at all: what a broken or untrained prior amounts to."""

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        del timestep
        return torch.zeros_like(x_t)


@pytest.fixture(scope="module")
def fitted(mdps_smoke_trained: tuple[AnomalibCLI, Path]) -> AnomalibCLI:
    return mdps_smoke_trained[0]


def eq18_pixel_auroc(cli: AnomalibCLI) -> float:
    """Pixel AUROC of D̄ alone (the eq.-18 map of the final pass) on the test set, at the denoiser's size."""
    model = cli.model.eval()
    maps, masks = [], []
    for batch in cli.datamodule.test_dataloader():
        difference = model.model.terms(model.pre_processor.transform(batch.image)).difference
        maps.append(difference.flatten())
        mask = batch.gt_mask.float().reshape(len(batch.image), 1, *batch.gt_mask.shape[-2:])
        masks.append(nn.functional.interpolate(mask, size=difference.shape[-2:], mode="nearest").flatten())
    return float(roc_auc_score(torch.cat(masks).numpy() > 0.5, torch.cat(maps).numpy()))


@pytest.fixture(scope="module")
def trained_auroc(fitted: AnomalibCLI) -> float:
    return eq18_pixel_auroc(fitted)


def test_eq18_map_alone_localises_defects(trained_auroc: float) -> None:
    print(f"D̄ alone, pixel AUROC: {trained_auroc:.3f}")
    assert trained_auroc >= EQ18_PIXEL_AUROC_FLOOR


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_a_zeroed_denoiser_scores_clearly_worse(fitted: AnomalibCLI, trained_auroc: float) -> None:
    prior = fitted.model.model.prior
    trained = prior.ema_denoiser.module
    prior.ema_denoiser.module = ZeroDenoiser()
    try:
        auroc = eq18_pixel_auroc(fitted)
    finally:
        prior.ema_denoiser.module = trained
    print(f"D̄ alone, pixel AUROC: trained denoiser {trained_auroc:.3f}, zeroed denoiser {auroc:.3f}")
    assert auroc < trained_auroc - TRAINED_OVER_ZEROED
