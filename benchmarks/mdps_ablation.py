"""Mdps ablation: one denoiser per dataset and input size, many inference settings scored on it.

    python -m benchmarks.mdps_ablation --datasets bottle kolektor tire demo --output /tmp/mdps_ablation

Training settings (image size) need their own denoiser; everything else in a row (ρ of each pass,
guidance norm, λ, standardisation, N_s, steps) changes only sampling and scoring, so each row
re-runs the normal-image calibration and the test set on the same weights. Metrics are computed
on raw scores with scikit-learn (image and pixel AUROC) and anomalib's AUPRO (FPR ≤ 0.3), at
each dataset's original resolution. Nothing of the test set enters calibration.
"""

import argparse
import inspect
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_mdps.console import hide_library_import_warnings
from benchmarks.profiles import cpu_profile_datamodule
from benchmarks.timing import PerImageTimes

if TYPE_CHECKING:
    from anomalib_mdps.models.calibration import CalibrationHoldout
    from anomalib_mdps.models.mdps import MdpsModel

# Short side per input-size setting: "64" and "96" are square; the "aspect" ones keep each dataset's
# aspect ratio, as ``Mdps(image_size=<short side>)`` does.
SHORT_SIDES = {"64": 64, "96": 96, "aspect": 64, "aspect96": 96, "aspect128": 128}


def input_size(size: str, module: object, model_args: dict[str, Any]) -> tuple[int, int]:
    """(height, width) of an input-size setting for a datamodule's images."""
    from anomalib_mdps.components.denoiser import unet_downsampling_factor
    from anomalib_mdps.models.input_size import size_for_data
    from anomalib_mdps.models.mdps import MdpsModel

    short_side = SHORT_SIDES[size]
    if not size.startswith("aspect"):
        return (short_side, short_side)
    default_channels = inspect.signature(MdpsModel).parameters["unet_channels"].default
    factor = unet_downsampling_factor(model_args.get("unet_channels", default_channels))
    return size_for_data(module, short_side, factor)


def datamodule(name: str, output: Path):
    """A cpu-profile dataset (or the generated demo data), batch 8, seeded split."""
    loader = {"train_batch_size": 8, "eval_batch_size": 8, "seed": 0}
    if name != "demo":
        return cpu_profile_datamodule(name, **loader)
    from anomalib.data import MVTecAD

    from anomalib_mdps.demo_data import make_demo_dataset

    module = MVTecAD(root=make_demo_dataset(output / "demo_data"), category="demo", num_workers=0, **loader)
    module.setup()
    return module


def train(name: str, size: str, epochs: int, output: Path, model_args: dict[str, Any]) -> Path:
    """Fit the denoiser (no validation) and save its weights and held-out calibration images."""
    from lightning.pytorch import Callback, Trainer

    from anomalib_mdps.models import Mdps

    module = datamodule(name, output)
    image_size = input_size(size, module, model_args)
    if image_size == input_size("64", module, model_args):
        size = "64"  # the same training run
    target = output / f"{name}_{size}.pt"
    if target.exists():
        return target
    model = Mdps(image_size=image_size, max_epochs=epochs, visualizer=False, **model_args)
    losses: list[float] = []

    class LossCurve(Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001, ARG002
            losses.append(float(trainer.callback_metrics["train_loss"]))

    trainer = Trainer(
        max_epochs=epochs, limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        callbacks=[LossCurve()], accelerator="cpu", default_root_dir=output / "runs",
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=module)
    seconds = time.perf_counter() - start
    torch.save({"state_dict": model.model.state_dict(), "calibration": model.held_out_images().cpu(),
                "image_size": image_size, "train_seconds": seconds, "losses": losses}, target)
    return target


def load_denoiser(
    saved: dict[str, Any], settings: dict[str, Any], module: Any = None, holdout: "CalibrationHoldout | None" = None,  # noqa: ANN401
) -> "MdpsModel":
    """An eval-mode ``MdpsModel`` with the saved weights and a row's settings; ``evaluate``
    re-measures the normal-image statistics saved with them.

    Loading is strict: weights of an older layout of the model must fail here, not leave an
    untrained denoiser to score the test set. Weights saved before the feature density existed
    (no ``feature_density.*`` tensors) load when the datamodule ``module`` and the ``holdout`` that
    training chose are given: the density is fit here on its training images, the held-out ones
    excluded, as training would have (it depends only on the frozen backbone).
    """
    from anomalib_mdps.models.mdps import MdpsModel

    model = MdpsModel(image_size=saved["image_size"], **settings).eval()
    state = dict(saved["state_dict"])
    refit = module is not None and not any(key.startswith("feature_density.") for key in state)
    if refit:
        fresh = model.state_dict()
        state.update({key: fresh[key] for key in fresh if key.startswith("feature_density.") or key == "density_scale"})
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        msg = f"The saved denoiser does not fit MdpsModel; delete the weights file to retrain. {error}"
        raise RuntimeError(msg) from error
    if refit and model.uses_density:
        fit_density_on_training_images(model, module, holdout)
    return model


def chosen_holdout(module: Any, saved: dict[str, Any]) -> "CalibrationHoldout":  # noqa: ANN401
    """The held-out images training chose (the same file-name hash), read from the dataset."""
    from anomalib_mdps.models.calibration import CalibrationHoldout

    holdout = CalibrationHoldout(len(saved["calibration"]))
    holdout.choose(module)
    return holdout


def fit_density_on_training_images(model: "MdpsModel", module: Any, holdout: "CalibrationHoldout") -> None:  # noqa: ANN401
    from torchvision.transforms.v2.functional import resize

    for batch in module.train_dataloader():
        model.accumulate_feature_density(resize(holdout.split_off(batch), list(model.full_size), antialias=True))
    model.fit_feature_density()


def evaluate(name: str, weights: Path, settings: dict[str, Any], output: Path) -> dict[str, float]:
    from anomalib.metrics.aupro import _AUPRO
    from sklearn.metrics import roc_auc_score
    from torchvision.transforms.v2.functional import resize

    saved = torch.load(weights, weights_only=False)
    module = datamodule(name, output)
    # The held-out images as training saw them (at full_size); weights saved before input_scale
    # existed hold them at the denoiser's size, so they are read again from the dataset.
    holdout = chosen_holdout(module, saved)
    model = load_denoiser(saved, settings, module, holdout)
    model.calibrate(holdout.stacked(lambda image: resize(image, list(model.full_size), antialias=True), "cpu"))
    scores, labels, maps, masks = [], [], [], []
    aupro = _AUPRO(fpr_limit=0.3)
    timer, evaluation_size = PerImageTimes(), None
    for batch in module.test_dataloader():
        images = resize(batch.image, list(model.full_size), antialias=True)
        result = timer.call(model.reconstruct, images, images=len(images))
        # Pixel metrics at the first test image's resolution (KolektorSDD's sizes vary by a few pixels).
        evaluation_size = evaluation_size or tuple(batch.gt_mask.shape[-2:])
        anomaly_map = F.interpolate(result.anomaly_map, size=evaluation_size, mode="bilinear").squeeze(1)
        gt_mask = F.interpolate(batch.gt_mask.float().unsqueeze(1), size=evaluation_size, mode="nearest").squeeze(1)
        scores.append(result.pred_score)
        labels.append(batch.gt_label)
        maps.append(anomaly_map[:, ::2, ::2].flatten())
        masks.append(gt_mask[:, ::2, ::2].flatten())
        aupro.update(anomaly_map, gt_mask.int())
    return {
        "image_auroc": roc_auc_score(torch.cat(labels).numpy(), torch.cat(scores).numpy()),
        "pixel_auroc": roc_auc_score(torch.cat(masks).numpy().astype(int), torch.cat(maps).numpy()),
        "aupro": float(aupro.compute()),
        "seconds_per_image": timer.seconds / max(timer.images, 1),
    }


def read_rows(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The settings every row pins (so that a later change of ``MdpsModel``'s defaults cannot change a
    row), and the rows. A bare list (older files) pins nothing.
    """
    content = json.loads(path.read_text())
    return ({}, content) if isinstance(content, list) else (content["pinned"], content["rows"])


def write_table(records: list[dict[str, Any]], rows: list[dict[str, Any]], datasets: list[str], target: Path) -> None:
    """The ablation as a markdown table: a line per row, image / pixel AUROC and AUPRO per dataset."""
    by_key = {(r["row"], r["dataset"]): r for r in records}
    header = ["setting"]
    for name in datasets:
        header += [f"{name} I-AUROC", f"{name} P-AUROC"] + ([] if name == "demo" else [f"{name} AUPRO"])
    header += ["s/image"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        cells, seconds = [row["name"]], []
        for name in datasets:
            record = by_key.get((row["name"], name))
            keys = ["image_auroc", "pixel_auroc"] + ([] if name == "demo" else ["aupro"])
            cells += [f"{record[k]:.3f}" if record else "–" for k in keys]
            if record:
                seconds.append(record["seconds_per_image"])
        cells.append(f"{np.mean(seconds):.2f}" if seconds else "–")
        lines.append("| " + " | ".join(cells) + " |")
    target.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["bottle", "kolektor", "tire", "demo"])
    parser.add_argument("--rows", type=Path, default=Path(__file__).with_name("mdps_ablation_pinned.json"),
                        help="JSON {pinned: settings of every row, rows: [{name, size, settings, datasets?}]}")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--train-args", type=json.loads, default={})
    parser.add_argument("--pinned-args", type=json.loads, default={},
                        help="JSON settings that replace the rows file's pinned ones (e.g. a preset's input_scale)")
    parser.add_argument("--output", type=Path, required=True, help="weights, rows.jsonl and table.md (resumable)")
    args = parser.parse_args()
    hide_library_import_warnings()
    torch.set_num_threads(2)
    args.output.mkdir(parents=True, exist_ok=True)
    results_file = args.output / "rows.jsonl"
    done = set()
    if results_file.exists():
        done = {(r["row"], r["dataset"]) for r in map(json.loads, results_file.read_text().splitlines())}
    pinned, rows = read_rows(args.rows)
    pinned = {**pinned, **args.pinned_args}
    for row in rows:
        for name in args.datasets:
            if (row["name"], name) in done or name not in row.get("datasets", args.datasets):
                continue
            weights = train(name, row.get("size", "64"), args.epochs, args.output, args.train_args)
            torch.manual_seed(0)
            metrics = evaluate(name, weights, {**pinned, **row.get("settings", {})}, args.output)
            record = {"row": row["name"], "dataset": name, "size": row.get("size", "64"), **metrics}
            print(json.dumps(record), flush=True)
            with results_file.open("a") as file:
                file.write(json.dumps(record) + "\n")
    records = [json.loads(line) for line in results_file.read_text().splitlines()]
    write_table(records, rows, args.datasets, args.output / "table.md")


if __name__ == "__main__":
    main()
