"""What a benchmark job measures besides anomalib's own test metrics.

- Raw scores: anomalib's ``PostProcessor`` min-max normalises and clamps scores to [0, 1], which
  creates ties and can move AUROC. :class:`Measurements` copies each test batch's raw
  ``pred_score`` and ``anomaly_map`` before the post-processor sees them, and :func:`raw_metrics`
  computes AUROC/AUPRO on those, cross-checked against scikit-learn.
- Latency: each validation batch (pre-processing + model), batch size 1, after warm-up: the
  first time a model scores images (the plugin's models reuse validation scores in a test pass
  over the same images, so test batches would time a lookup); test batches when a model has no
  validation pass.
- Training time: Lightning's fit minus the time it spends scoring validation images (timed per
  batch: PatchCore and PaDiM fit their memory bank in ``on_validation_start``, which is training).
- Peak RSS: the job's own process (each job runs in a fresh process, see ``job.py``).
"""

import resource
import sys
from types import SimpleNamespace

import torch
from anomalib.metrics import AUPRO, AUROC
from lightning.pytorch import Callback, LightningModule, Trainer
from sklearn.metrics import roc_auc_score
from torch.nn import functional as F  # noqa: N812

from .timing import PerImageTimes

# anomalib's AUROC and scikit-learn must agree on the same raw scores; a larger gap means a
# metric pitfall (see NOTES §7, where a clamped pipeline reported exactly 0.5).
AUROC_AGREEMENT = 1e-4
AUPRO_FPR_LIMIT = 0.3
# The columns of Mdps's ``score_terms``: its image score from D̄ (eq. 18-19), the density and the patch memory alone.
SCORE_TERM_NAMES = ("eq18", "density", "memory")


class MetricMismatchError(RuntimeError):
    """anomalib's metric and scikit-learn disagree on the same raw scores."""


class Measurements(Callback):
    """Validation and test latency, and the raw test outputs.

    Trainer callbacks run before the model's own (pre-processor, post-processor, evaluator:
    Lightning appends those from ``configure_callbacks``), so a batch's start fires before
    pre-processing and its end before the post-processor rewrites scores.
    """

    def __init__(self, warmup_images: int = 3) -> None:
        self.validation = PerImageTimes(warmup_images)
        self.test = PerImageTimes(warmup_images)
        self.pred_scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.maps: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []
        # Mdps: the image score of each of its terms alone (D̄ of eq. 18-19, the feature density).
        self.score_terms: list[torch.Tensor] = []

    @staticmethod
    def _synchronize(module: LightningModule) -> None:
        # CUDA kernels run asynchronously: without this, latency would only time the launch.
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args, **kwargs) -> None:
        self._synchronize(pl_module)
        self.validation.start()

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, *args, **kwargs) -> None:
        self._synchronize(pl_module)
        self.validation.stop(len(outputs.image))

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        post_processor = getattr(pl_module, "post_processor", None)
        callbacks = trainer.callbacks
        if post_processor in callbacks and callbacks.index(post_processor) < callbacks.index(self):
            msg = "The post-processor runs before the raw-score recorder; raw AUROC would be post-processed."
            raise RuntimeError(msg)

    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args, **kwargs) -> None:
        self._synchronize(pl_module)
        self.test.start()

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, *args, **kwargs) -> None:
        self._synchronize(pl_module)
        batch_size = len(outputs.image)
        self.test.stop(batch_size)
        anomaly_map = outputs.anomaly_map
        score = outputs.pred_score
        if score is None:  # the post-processor would take the map's maximum too
            score = torch.amax(anomaly_map, dim=tuple(range(1, anomaly_map.ndim)))
        self.pred_scores.append(score.detach().float().reshape(-1).cpu().clone())
        self.labels.append(outputs.gt_label.detach().reshape(-1).int().cpu())
        if getattr(outputs, "score_terms", None) is not None:
            self.score_terms.append(outputs.score_terms.detach().float().reshape(batch_size, -1).cpu().clone())
        if anomaly_map is not None and outputs.gt_mask is not None:
            mask = outputs.gt_mask.detach().reshape(batch_size, *outputs.gt_mask.shape[-2:]).bool().cpu()
            values = anomaly_map.detach().float().reshape(batch_size, 1, *anomaly_map.shape[-2:])
            if values.shape[-2:] != mask.shape[-2:]:
                values = F.interpolate(values, size=mask.shape[-2:], mode="bilinear", align_corners=False)
            self.maps.append(values[:, 0].cpu().clone())
            self.masks.append(mask)

    @property
    def latency(self) -> PerImageTimes:
        """The timed pass: validation batches, else test batches."""
        return self.validation if len(self.validation) else self.test


def _unit_interval(values: torch.Tensor) -> torch.Tensor:
    """Min-max scale to [0, 1] in float64: monotone, so every AUROC stays exactly the same.

    Needed because torchmetrics (under anomalib's AUROC) treats scores outside [0, 1] as logits
    and applies a sigmoid, which saturates raw PatchCore/PaDiM distances (tens) to 1.0 and
    reports 0.5 (the pitfall of NOTES §7).
    """
    values = values.double()
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else torch.zeros_like(values)


def auroc(scores: torch.Tensor, targets: torch.Tensor, what: str) -> tuple[float, float]:
    """AUROC by anomalib's metric and by scikit-learn on the same raw values; they must agree."""
    metric = AUROC(fields=["scores", "targets"])
    metric.update(SimpleNamespace(scores=_unit_interval(scores), targets=targets))
    ours = float(metric.compute())
    reference = float(roc_auc_score(targets.numpy().astype(bool), scores.double().numpy()))
    if abs(ours - reference) > AUROC_AGREEMENT:
        msg = f"{what}: anomalib AUROC {ours:.6f} but scikit-learn {reference:.6f} on the same raw scores."
        raise MetricMismatchError(msg)
    return ours, reference


@torch.no_grad()
def complete_score_terms(model: LightningModule, datamodule: object, measured: Measurements) -> None:
    """Replace the test set's score terms by ones with every term computed, if the timed pass skipped
    one (Mdps skips D̄ where its fusion gives D̄ no weight): an untimed second pass of ``terms``, so
    that each Mdps row's decomposition is complete while its latency stays what a user gets.
    """
    terms_of = getattr(model.model, "terms", None)
    if terms_of is None or not measured.score_terms or torch.cat(measured.score_terms).isfinite().all():
        return
    transform = model.pre_processor.transform
    measured.score_terms = [
        model.model.score_terms(terms_of(transform(batch.image).to(model.device))).float().cpu()
        for batch in datamodule.test_dataloader()
    ]


def raw_metrics(measured: Measurements) -> dict[str, float]:
    """Image/pixel AUROC and AUPRO (FPR ≤ 0.3) from the raw scores of the test set."""
    scores, labels = torch.cat(measured.pred_scores), torch.cat(measured.labels)
    names = ("image_AUROC", "image_AUROC_sklearn", "pixel_AUROC", "pixel_AUROC_sklearn", "pixel_AUPRO")
    results = dict.fromkeys(names, float("nan"))
    if labels.unique().numel() == 2:
        results["image_AUROC"], results["image_AUROC_sklearn"] = auroc(scores, labels, "image")
        if len(measured.score_terms) == len(measured.pred_scores):
            terms = torch.cat(measured.score_terms)
            for column, name in enumerate(SCORE_TERM_NAMES):
                if terms[:, column].isfinite().all():
                    results[f"image_AUROC_{name}"] = auroc(terms[:, column], labels, f"image ({name} alone)")[0]
    if measured.maps:
        maps, masks = torch.cat(measured.maps), torch.cat(measured.masks)
        if masks.any() and not masks.all():
            results["pixel_AUROC"], results["pixel_AUROC_sklearn"] = auroc(
                maps.reshape(-1), masks.reshape(-1).int(), "pixel"
            )
            aupro = AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=AUPRO_FPR_LIMIT)
            aupro.update(SimpleNamespace(anomaly_map=maps, gt_mask=masks))
            results["pixel_AUPRO"] = float(aupro.compute())
    return results


def peak_rss_mb() -> float:
    """Peak resident memory of this process (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
