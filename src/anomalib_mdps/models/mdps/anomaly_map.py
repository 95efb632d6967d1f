"""MDPS's anomaly map and score: the difference of eq. 18, averaged over samples (eq. 19), and the
top-S mean of sec. 4.3 (``top_k_mean_score`` in ``components``).
"""

import math
from typing import NamedTuple

import torch
from torch.nn import functional as F  # noqa: N812
from torchmetrics.functional.classification import binary_auroc

from anomalib_mdps.components import perceptual_difference, pixel_difference, top_k_mean_score


def reconstruction_difference(
    x0: torch.Tensor,
    y: torch.Tensor,
    features_x0: list[torch.Tensor],
    features_y: list[torch.Tensor],
    pixel_weight: float,
    pool_size: int = 1,
    term_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """[D(x0, y)]_k = η‖y_k − x0_k‖₁ + Σ_{i∈J} (1 − cos(F_i^k(x0), F_i^k(y))): MDPS eq. 18.

    ``term_scale`` (2,) divides the pixel and the perceptual term by their spread on normal
    images first, so that η weighs two terms of the same scale.
    """
    pixel = pixel_difference(x0, y)
    perceptual = perceptual_difference(features_x0, features_y, tuple(y.shape[-2:]), pool_size)
    return weighted_terms(pixel, perceptual, pixel_weight, term_scale)


def weighted_terms(
    pixel: torch.Tensor, perceptual: torch.Tensor, pixel_weight: float, term_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """η·pixel + perceptual, the sum of eq. 18, each term first divided by ``term_scale`` when given."""
    if term_scale is not None:
        pixel, perceptual = pixel / term_scale[0], perceptual / term_scale[1]
    return pixel_weight * pixel + perceptual


def mean_over_samples(difference: torch.Tensor, num_samples: int) -> torch.Tensor:
    """D̄ = (1/N_s)·Σ_j D(x0^(j), y) for samples stored image-major (b·N_s + j): MDPS eq. 19."""
    return difference.unflatten(0, (-1, num_samples)).mean(dim=1)


# The fused terms, in order: D̄ of eq. 18-19, the per-location feature density, the patch memory's distance.
TERM_NAMES = ("eq18", "density", "memory")
# Weights that ``choose_fusion`` tries: every mix of the available terms in steps of a tenth.
FUSION_STEPS = 10
# Selection pixels scored per image side (every second one): the metric hardly moves, the sort is 4x cheaper.
SELECTION_PIXEL_STRIDE = 2


def fused(terms: list[torch.Tensor | None], coefficients: torch.Tensor) -> torch.Tensor:
    """Σ_i coefficients[i]·term_i over the terms present: an Mdps map, or the map its image score is taken from.

    Not in MDPS: the paper's map and score are D̄ alone (coefficients (1, 0, 0)).
    """
    total = torch.zeros_like(next(term for term in terms if term is not None))
    for term, coefficient in zip(terms, coefficients, strict=True):
        if term is not None:
            total = total + coefficient * term
    return total


class FusionChoice(NamedTuple):
    """The terms' weights in the map and in the score, chosen on the selection split, and what they measured."""

    coefficients: torch.Tensor  # (2, 3): weights of D̄, density and memory in the map (row 0) and the score (row 1)
    # (2, 4): image (row 0) and pixel (row 1) AUROC of each term alone (NaN if absent), then of the chosen mix.
    metrics: torch.Tensor

    def summary(self, normal: int, defective: int) -> str:
        def mix(row: int) -> str:
            return " + ".join(f"{w:.1f}·{name}" for w, name in zip(self.coefficients[row].tolist(), TERM_NAMES,
                                                                      strict=True) if w > 0)

        def alone(row: int) -> str:
            return ", ".join(f"{name} alone {value:.3f}" for name, value in zip(TERM_NAMES, self.metrics[row, :3].tolist(),
                                                                                   strict=True) if value == value)

        return (
            f"Mdps score fusion, chosen on the selection split ({normal} held-out normal training images, {defective} "
            f"with synthetic defects): image score {mix(1)}, selection image AUROC {float(self.metrics[0, 3]):.3f} "
            f"({alone(0)}); map {mix(0)}, selection pixel AUROC {float(self.metrics[1, 3]):.3f} ({alone(1)})"
        )


def fusion_candidates(available: list[bool]) -> list[torch.Tensor]:
    """Every weight vector over the available terms with weights in tenths that sum to one."""
    count = sum(available)
    candidates = []

    def extend(prefix: list[int], left: int) -> None:
        if len(prefix) == count - 1:
            weights = iter([*prefix, left])
            candidates.append(torch.tensor([next(weights) / FUSION_STEPS if ok else 0.0 for ok in available]))
            return
        for step in range(left + 1):
            extend([*prefix, step], left - step)

    extend([], FUSION_STEPS)
    return candidates


def choose_fusion(
    terms: list[torch.Tensor | None], labels: torch.Tensor, masks: torch.Tensor, top_k: int,
    simplest_within_noise: bool = True,
) -> FusionChoice:
    """The weights of the terms in the score and in the map that separate normal from defective best.

    ``terms`` are the selection split's maps (N, 1, h, w) in ``TERM_NAMES`` order (None: absent);
    ``labels`` (N,) and ``masks`` (N, 1, H, W) its synthetic defects. The score's weights are judged
    by image AUROC of the top-S mean, the map's by pixel AUROC (masks at the maps' size, a pixel
    anomalous where at least a quarter of its area is defect). With ``simplest_within_noise``, the
    mix with the fewest terms among those within one standard error of the best AUROC
    (``auroc_standard_error``) is taken: a few dozen selection images cannot tell a mix from one
    term by less than that, and an extra weight fitted to their noise does not carry over to new
    images. Otherwise, and among equally simple mixes, the highest AUROC wins; equal AUROCs go to
    the larger normalised separation of the two groups.
    """
    present = [term for term in terms if term is not None]
    masks = F.interpolate(masks.float(), size=present[0].shape[-2:], mode="area") >= 0.25
    stride = SELECTION_PIXEL_STRIDE
    labels, pixels = labels.bool(), masks[..., ::stride, ::stride]

    def measured(coefficients: torch.Tensor) -> tuple[tuple[float, float], tuple[float, float]]:
        combined = fused(terms, coefficients)
        return (
            _separation(top_k_mean_score(combined, top_k), labels),
            _separation(combined[..., ::stride, ::stride], pixels),
        )

    candidates = fusion_candidates([term is not None for term in terms])
    results = [measured(candidate) for candidate in candidates]

    def chosen(use: int, anomalous: torch.Tensor) -> int:
        best = max(range(len(candidates)), key=lambda i: results[i][use])
        if not simplest_within_noise:
            return best
        auroc, positives = results[best][use][0], int(anomalous.sum())
        floor = auroc - auroc_standard_error(auroc, anomalous.numel() - positives, positives)
        eligible = [i for i in range(len(candidates)) if results[i][use][0] >= floor]
        return max(eligible, key=lambda i: (-int((candidates[i] > 0).sum()), results[i][use]))

    best_score, best_map = chosen(0, labels), chosen(1, pixels)
    metrics = torch.full((2, len(terms) + 1), float("nan"))
    for index, term in enumerate(terms):
        if term is not None:
            alone = measured(torch.eye(len(terms))[index])
            metrics[:, index] = torch.tensor([alone[0][0], alone[1][0]])
    metrics[:, -1] = torch.tensor([results[best_score][0][0], results[best_map][1][0]])
    return FusionChoice(torch.stack([candidates[best_map], candidates[best_score]]), metrics)


def auroc_standard_error(auroc: float, normal: int, defective: int) -> float:
    """Standard error of an AUROC measured on ``normal`` negatives and ``defective`` positives.

    Hanley and McNeil (1982), eq. 2, with their exponential approximations of Q1 and Q2. It treats
    the images as independent; defective copies of one normal image are not, so the true error is
    larger, and the rule that uses it errs towards the more complex mix.
    """
    if normal < 1 or defective < 1:
        return 0.0
    # A perfect separation of a few dozen images is no proof of a zero error: take it as half a misranked pair.
    auroc = min(auroc, 1 - 0.5 / (normal * defective))
    q1, q2 = auroc / (2 - auroc), 2 * auroc**2 / (1 + auroc)
    variance = (auroc * (1 - auroc) + (defective - 1) * (q1 - auroc**2) + (normal - 1) * (q2 - auroc**2))
    return math.sqrt(max(variance, 0.0) / (normal * defective))


def _separation(values: torch.Tensor, anomalous: torch.Tensor) -> tuple[float, float]:
    """(AUROC rounded to 4 decimals, (mean anomalous − mean normal) / normal spread): a sort key."""
    values, anomalous = values.flatten().double(), anomalous.flatten()
    # torchmetrics reads values outside [0, 1] as logits; min-max scaling keeps the ranking exactly.
    scaled = (values - values.min()) / (values.max() - values.min()).clamp(min=1e-12)
    auroc = float(binary_auroc(scaled, anomalous.long()))
    normal = values[~anomalous]
    gap = (values[anomalous].mean() - normal.mean()) / normal.std(correction=0).clamp(min=1e-12)
    return round(auroc, 4), float(gap)
