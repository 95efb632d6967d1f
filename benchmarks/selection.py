"""Scoring a trained Mdps on its dataset's selection split, for the scripts that choose settings
(``mdps_ablation``, ``leave_one_out``).

The split is what the model itself chooses on while it trains (``anomalib_mdps.selection_split``:
held-out normal training images and synthetic defects). A rule that chooses weights on the split
would be judged on the images it chose on, so it is scored by two-fold cross-fitting: weights
chosen on half of the source images (each normal image with its defective copies), scored on the
other half, and the two halves averaged.
"""

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from sklearn.metrics import roc_auc_score
from torch.nn import functional as F  # noqa: N812

# A rule: (terms, labels, masks) of the images it may look at -> (2, 3) map and score weights.
WeightRule = Callable[[list, torch.Tensor, torch.Tensor], torch.Tensor]


class SelectionTerms:
    """A model's three terms on the selection split of its held-out images, computed once."""

    def __init__(self, model: Any, holdout: Any, batch_size: int = 2, cache: Path | None = None) -> None:  # noqa: ANN401
        from torchvision.transforms.v2.functional import resize

        from anomalib_mdps.selection_split import DEFECTS_PER_IMAGE, selection_split

        normal = holdout.stacked(lambda image: resize(image, list(model.full_size), antialias=True), "cpu", "selection")
        self.split = selection_split(normal, seed=model.seed)
        self.terms = terms_of(model, self.split.images, batch_size, cache)
        self.top_k = model.top_k
        # The source image of each split image: the normals first, then DEFECTS_PER_IMAGE copies of each.
        count = torch.arange(len(normal))
        self.source = torch.cat([count, count.repeat_interleave(DEFECTS_PER_IMAGE)])

    def subset(self, index: torch.Tensor) -> tuple[list, torch.Tensor, torch.Tensor]:
        return [None if t is None else t[index] for t in self.terms], self.split.labels[index], self.split.masks[index]

    def scored(self, rule: WeightRule, cross_fit: bool) -> dict[str, float]:
        """Image and pixel AUROC of ``rule``'s weights: on the whole split, or cross-fitted over two halves."""
        if not cross_fit:
            everything = self.subset(torch.ones_like(self.source, dtype=torch.bool))
            return metrics(everything[0], rule(*everything), *everything[1:], self.top_k)
        folds = [self.source % 2 == half for half in (0, 1)]
        results = []
        for choose_on, score_on in ((folds[0], folds[1]), (folds[1], folds[0])):
            scored_terms, labels, masks = self.subset(score_on)
            results.append(metrics(scored_terms, rule(*self.subset(choose_on)), labels, masks, self.top_k))
        return {key: sum(result[key] for result in results) / len(results) for key in results[0]}


@torch.no_grad()
def terms_of(
    model: Any, images: torch.Tensor, batch_size: int = 2, cache: Path | None = None,  # noqa: ANN401
) -> list[torch.Tensor | None]:
    """D̄, density and memory maps of ``images`` (None for a term the model does not compute).

    With ``cache`` (a folder), the maps are kept there under a digest of the images and of every
    tensor of the model, so a rerun on the same weights and images reads them instead of sampling.
    """
    target = None
    if cache is not None:
        digest = hashlib.sha256(images.contiguous().numpy().tobytes())
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        target = cache / f"terms-{digest.hexdigest()[:20]}.pt"
        if target.is_file():
            return torch.load(target)
    parts = [model.terms(chunk).maps for chunk in images.split(batch_size)]
    terms = [None if group[0] is None else torch.cat(group) for group in zip(*parts, strict=True)]
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(terms, target)
    return terms


def metrics(terms: list, weights: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, top_k: int) -> dict:
    """Image AUROC (top-S mean of the score map) and pixel AUROC (at the terms' size) of weighted terms."""
    from anomalib_mdps.components import top_k_mean_score
    from anomalib_mdps.models.mdps.anomaly_map import fused

    anomaly_map, score_map = fused(terms, weights[0]), fused(terms, weights[1])
    masks = F.interpolate(masks.float(), size=anomaly_map.shape[-2:], mode="area") >= 0.25
    return {
        "image_auroc": float(roc_auc_score(labels.numpy(), top_k_mean_score(score_map, top_k).numpy())),
        "pixel_auroc": float(roc_auc_score(masks.flatten().numpy(), anomaly_map.flatten().numpy())),
    }


def chosen_by_model(
    top_k: int, use: tuple[bool, bool, bool] = (True, True, True), simplest_within_noise: bool = True,
) -> WeightRule:
    """The rule of ``score_fusion='auto'``: ``choose_fusion`` over the terms marked in ``use``."""
    from anomalib_mdps.models.mdps.anomaly_map import choose_fusion

    def rule(terms: list, labels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        kept = [term if keep else None for term, keep in zip(terms, use, strict=True)]
        return choose_fusion(kept, labels, masks, top_k, simplest_within_noise).coefficients

    return rule


def fixed(weights: Any) -> WeightRule:  # noqa: ANN401
    """A rule with the same (2, 3) weights whatever it sees."""
    weights = torch.as_tensor(weights, dtype=torch.float32)
    return lambda terms, labels, masks: weights
