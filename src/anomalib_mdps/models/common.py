"""What the plugin's anomalib modules share: pre-processing, evaluation, visualisation, steps."""

import warnings
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Score
from anomalib.pre_processing import PreProcessor
from anomalib.pre_processing.utils.transform import get_exportable_transform
from lightning.pytorch import Callback, LightningModule, Trainer
from torchvision.transforms.v2 import Compose, Resize

from anomalib_mdps.data_checks import check_dataset_images, refuse_dataset_download
from anomalib_mdps.models.input_size import size_for_data
from anomalib_mdps.models.score_memo import SCORE_FIELDS, ScoreMemo
from anomalib_mdps.post_processing import RankPreservingPostProcessor
from anomalib_mdps.visualization import ReconstructionVisualizer

# Lightning's message, at the start of training, about modules left in eval mode.
FROZEN_BACKBONE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"


class HeldDuringFit(Callback):
    """A callback that changes process-wide state for part of fit and gives it back in ``_restore``,
    also when fit fails."""

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        del trainer, pl_module, exception
        self._restore()

    def _restore(self) -> None:
        raise NotImplementedError


class QuietFrozenBackbone(HeldDuringFit):
    """Silences ``FROZEN_BACKBONE_WARNING`` from the start of fit until training starts: the frozen
    ImageNet backbone stays in eval mode on purpose (ImageNet's batch-norm statistics). The warning
    filters are restored when training starts, or when fit fails before it does.
    """

    def __init__(self) -> None:
        self._quiet: warnings.catch_warnings | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self._restore()
        self._quiet = warnings.catch_warnings()
        self._quiet.__enter__()
        warnings.filterwarnings("ignore", message=FROZEN_BACKBONE_WARNING)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self._restore()

    def _restore(self) -> None:
        if self._quiet is not None:
            self._quiet.__exit__(None, None, None)
            self._quiet = None


class SeededFit(HeldDuringFit):
    """Seeds torch's generator from the model's seed for the length of fit, then gives the caller
    back the generator state it had before fit. Inside fit the global generator orders the training
    batches (the samplers of Lightning's data loaders draw from it) and draws the training levels and
    noise; anomalib 2.7's CLI accepts ``--seed_everything`` without applying it, so an unseeded run
    would train differently every time.
    """

    def __init__(self, seed: int) -> None:
        # Made in ``configure_callbacks``, before the datamodule's set-up, which may draw from the generator.
        self.seed = seed
        self._caller_state: torch.Tensor | None = torch.random.get_rng_state()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        torch.manual_seed(self.seed)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self._restore()

    def _restore(self) -> None:
        if self._caller_state is not None:
            torch.random.set_rng_state(self._caller_state)
            self._caller_state = None


class DiffusionModuleMixin:
    """Defaults of the plugin's anomalib modules.

    Models implement ``score_batch(batch) -> batch``; validation, test and predict all use it.
    A test pass over images the last validation pass scored, with the model unchanged since,
    reuses those scores (see ``score_memo``). Their torch models keep an EMA denoiser.
    """

    @property
    def learning_type(self) -> LearningType:
        """All of the plugin's models learn from normal images only."""
        return LearningType.ONE_CLASS

    @property
    def score_memo(self) -> ScoreMemo:
        if "_score_memo" not in vars(self):
            self._score_memo = ScoreMemo()
        return self._score_memo

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:  # noqa: ANN401
        del outputs, batch, batch_idx
        self.model.update_ema()

    @property
    def attached_datamodule(self) -> object | None:
        """The trainer's datamodule, or ``None`` (no trainer, or dataloaders passed directly)."""
        return getattr(self._trainer, "datamodule", None) if self._trainer is not None else None

    def configure_callbacks(self) -> Any:  # noqa: ANN401
        """anomalib's component callbacks. This is also the last model hook Lightning calls before the
        datamodule's ``prepare_data``, so a missing dataset is refused here rather than downloaded.
        """
        if self.attached_datamodule is not None:
            refuse_dataset_download(self.attached_datamodule)
        return [*super().configure_callbacks(), QuietFrozenBackbone(), SeededFit(self.model.seed)]

    def setup(self, stage: str) -> None:
        """Unreadable image files of the stage's datasets are named before it starts; a model
        given a short side (``short_side``) follows the data's aspect ratio.
        """
        super().setup(stage)
        if self.attached_datamodule is not None:
            check_dataset_images(self.attached_datamodule, stage)
            self.follow_data_aspect()

    def follow_data_aspect(self) -> None:
        """Aspect-aware input: ``short_side`` on the short axis, the long one as the data's."""
        if getattr(self, "short_side", None) is None or self.pre_processor is None:
            return
        datamodule = self.attached_datamodule
        size = size_for_data(datamodule, self.short_side, self.model.size_factor)
        if size is not None and size != self.model.image_size:
            self.model.set_image_size(size)
            # Images enter at the model's ``full_size`` (Mdps: a multiple of its denoiser's size).
            self.pre_processor.transform = resize_transform(self.model.full_size)
            self.pre_processor.export_transform = get_exportable_transform(self.pre_processor.transform)
            # anomalib's datamodule set itself up first and copied the model's (square) resize into
            # its datasets; without this, training and validation images would be squashed to the
            # square and stretched back, while test images (set up later) would not.
            update_dataset_resize = getattr(datamodule, "_update_augmentations", None)
            if update_dataset_resize is not None:
                update_dataset_resize()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint whose weights are not this model's is refused in words, not a key dump."""
        own = {key for key in self.state_dict() if key.startswith("model.")}
        saved = {key for key in checkpoint.get("state_dict", {}) if key.startswith("model.")}
        # Tensors the torch model fills in itself when older weights lack them (``optional_state``).
        optional = getattr(self.model, "optional_state", dict)()
        missing = sorted(own - saved - {f"model.{name}" for name in optional})
        unknown = sorted(saved - own)
        if missing or unknown:
            msg = (
                f"This checkpoint does not hold a {type(self).__name__} model like this one: {len(missing)} of its "
                f"{len(own)} weights are missing (e.g. {missing[:2]}) and {len(unknown)} are unknown (e.g. "
                f"{unknown[:2]}). Was it saved by another model class or with other architecture arguments?"
            )
            raise ValueError(msg)
        super().on_load_checkpoint(checkpoint)

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize only: the models normalise internally (diffusion in [-1, 1], ImageNet for backbones)."""
        return PreProcessor(transform=resize_transform(image_size or (256, 256)))

    @staticmethod
    def configure_post_processor() -> RankPreservingPostProcessor:
        """anomalib's post-processor, normalising without ties (see ``post_processing``)."""
        return RankPreservingPostProcessor()

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """anomalib's default metrics plus AUPRO (FPR ≤ 0.3)."""
        return Evaluator(
            test_metrics=[
                AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
                F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
                AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
                F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
                AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False, fpr_limit=0.3),
            ],
        )

    @classmethod
    def configure_visualizer(cls) -> ReconstructionVisualizer:
        return ReconstructionVisualizer()

    def on_validation_epoch_start(self) -> None:
        self.score_memo.clear()

    def validation_step(self, batch: Batch, *args, **kwargs) -> Batch:
        del args, kwargs
        batch = self.score_batch(batch)
        outputs = {name: getattr(batch, name) for name in SCORE_FIELDS if getattr(batch, name, None) is not None}
        self.score_memo.remember(self.model, batch.image, outputs)
        return batch

    def test_step(self, batch: Batch, *args, **kwargs) -> Batch:
        del args, kwargs
        outputs = self.score_memo.recall(self.model, batch.image)
        if outputs is None:
            return self.score_batch(batch)
        extras = {name: outputs.pop(name) for name in ("reconstruction", "score_terms") if name in outputs}
        batch.update(**outputs)
        for name, value in extras.items():
            setattr(batch, name, value)
        return batch

    def on_test_end(self) -> None:
        self.score_memo.clear()

    def predict_step(self, batch: Batch, *args, **kwargs) -> Batch:
        del args, kwargs
        return self.score_batch(batch)

    @staticmethod
    def diffusion_trainer_arguments(max_epochs: int, gradient_clip_val: float | None = 1.0) -> dict[str, Any]:
        """Train ``max_epochs``; validate once, at the end (the validation set feeds thresholds
        and normalisation, and sampling it every epoch would cost as much as a test run);
        gradients stay available at evaluation for guidance through the denoiser.
        """
        return {
            "max_epochs": max_epochs,
            "check_val_every_n_epoch": max_epochs,
            "num_sanity_val_steps": 0,
            "inference_mode": False,
            "gradient_clip_val": gradient_clip_val,
        }


def resize_transform(image_size: tuple[int, int]) -> Compose:
    """The models' whole pre-processing: an antialiased resize to (height, width)."""
    return Compose([Resize(image_size, antialias=True)])


class ScanExportMixin:
    """Export of a model whose ``forward`` runs a DDIM loop (``components.ddim.run_steps``).

    The torch model's ``exportable()`` context fixes what graph capture needs (the sampling noise
    as a constant, autograd-free guidance). The loop becomes one ONNX ``Scan`` (opset 18); its
    body is traced with a symbolic batch on which diffusers' upsampler branches (``batch >= 64``),
    so the batch axis is exported as ``Dim.DYNAMIC`` instead of anomalib's strict
    ``Dim("batch_size")``. Without ``input_size`` the graph takes images at the model's ``full_size``.
    """

    def to_torch(self, *args, **kwargs) -> Path:  # noqa: ANN002, ANN003
        with self.model.exportable():
            return super().to_torch(*args, **kwargs)

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs,  # noqa: ANN003
    ) -> Path:
        input_size = tuple(input_size) if input_size is not None else self.model.full_size
        if "dynamic_shapes" not in kwargs and "dynamic_axes" not in kwargs:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim.DYNAMIC},)
        kwargs.setdefault("opset_version", 18)
        with self.model.exportable():
            return super().to_onnx(export_root, model_file_name, input_size, **kwargs)
