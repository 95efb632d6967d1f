"""Mdps ablation: one denoiser per dataset and input size, many inference settings scored on it.

    python -m benchmarks.mdps_ablation --datasets bottle kolektor tire mpdd --output /tmp/mdps_ablation

Training settings (image size) need their own denoiser; everything else in a row (ρ of each pass,
guidance norm, λ, standardisation, N_s, steps, the score fusion) changes only sampling and scoring,
so each row re-runs the normal-image calibration on the same weights.

Rows are scored on each dataset's selection split (held-out normal training images and synthetic
defects, ``anomalib_mdps.selection_split``), never on a test image. The row with the best mean
selection image AUROC over the datasets is chosen, and only then is the test set scored, for that
row alone. ``--split test`` scores every row's test set instead: a report, from which no default
may be chosen. Metrics are computed on raw scores with scikit-learn (image and pixel AUROC) and
anomalib's AUPRO (FPR ≤ 0.3), at each dataset's original resolution (the selection split's at the
model's input size). Nothing of the test set enters calibration.
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


def train(
    name: str, size: str, epochs: int, output: Path, model_args: dict[str, Any], weights_from: Path | None = None,
) -> Path:
    """Fit the denoiser (no validation) and save its weights and held-out calibration images; with
    ``weights_from`` (a cpu-profile run's ``runs`` folder), take the preset-trained model that run kept.
    """
    from lightning.pytorch import Callback, Trainer

    from anomalib_mdps.models import Mdps

    if weights_from is not None:
        return kept_by_profile(name, size, weights_from, output)
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
                "selection_images": len(model.calibration.selection_keys),
                "image_size": image_size, "train_seconds": seconds, "losses": losses}, target)
    return target


def kept_by_profile(name: str, size: str, runs: Path, output: Path) -> Path:
    """The weights a cpu-profile run kept for ``name`` (``keep_weights``), in this harness's format."""
    from .profiles import kept_weights, load_profile, model_spec

    if size != "aspect":
        msg = f"--weights-from holds the cpu preset's aspect-aware models only, not size {size!r}."
        raise ValueError(msg)
    target = output / f"{name}_profile.pt"
    if not target.exists():
        saved = torch.load(kept_weights("Mdps", name, runs), weights_only=False)
        preset = model_spec("Mdps", load_profile("cpu")["models"]["Mdps"])["init_args"]
        torch.save({**saved, "calibration_images": preset.get("calibration_images", 16),
                    "selection_images": preset.get("selection_images", 16)}, target)
    return target


def load_denoiser(
    saved: dict[str, Any], settings: dict[str, Any], module: Any = None, holdout: "CalibrationHoldout | None" = None,  # noqa: ANN401
) -> "MdpsModel":
    """An eval-mode ``MdpsModel`` with the saved weights and a row's settings; ``evaluate``
    re-measures the normal-image statistics saved with them.

    Loading is strict: weights of an older layout of the model must fail here, not leave an
    untrained denoiser to score the test set. Weights saved before the feature density existed
    (no ``feature_density.*`` tensors), and rows with other perceptual layers than the weights were
    trained with, load when the datamodule ``module`` and the ``holdout`` that training chose are
    given: the density is fit here on its training images, the held-out ones excluded, as training
    would have (it depends only on the frozen backbone).
    """
    from anomalib_mdps.models.mdps import MdpsModel
    from anomalib_mdps.models.mdps.torch_model import ScoreFusion

    model = MdpsModel(image_size=saved["image_size"], **settings).eval()
    state = dict(saved["state_dict"])
    if model.patch_memory is None:  # a row without the memory scores weights trained with one
        state = {key: value for key, value in state.items() if not key.startswith("patch_memory.")}
    fresh = model.state_dict()
    if model.score_fusion == ScoreFusion.FIXED:  # the row's weights, not those the weights' training chose
        state["fusion"] = fresh["fusion"]
    # The frozen backbone carries its ImageNet weights from construction; a row with other perceptual
    # layers (``feature_layers``) has another extractor, and a density of other shapes to fit anew.
    state = {key: value for key, value in state.items() if not key.startswith("feature_extractor.")}
    state.update({key: value for key, value in fresh.items() if key.startswith("feature_extractor.")})
    density = [key for key in fresh if key.startswith("feature_density.")]
    refit = module is not None and any(key not in state or state[key].shape != fresh[key].shape for key in density)
    if refit:
        state.update({key: fresh[key] for key in [*density, "density_scale"]})
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

    count = saved["calibration_images"] if "calibration_images" in saved else len(saved["calibration"])
    holdout = CalibrationHoldout(count, saved.get("selection_images", 0))
    holdout.choose(module)
    return holdout


def fit_density_on_training_images(model: "MdpsModel", module: Any, holdout: "CalibrationHoldout") -> None:  # noqa: ANN401
    from torchvision.transforms.v2.functional import resize

    for batch in module.train_dataloader():
        model.accumulate_feature_density(resize(holdout.split_off(batch), list(model.full_size), antialias=True))
    model.fit_feature_density()


def evaluate(name: str, weights: Path, settings: dict[str, Any], output: Path, split: str = "selection") -> dict:
    """A row's metrics on the dataset's selection split (the default) or its test set."""
    from anomalib.metrics.aupro import _AUPRO
    from sklearn.metrics import roc_auc_score
    from torchvision.transforms.v2.functional import resize

    from anomalib_mdps.models.mdps.torch_model import ScoreFusion

    from .selection import SelectionTerms, chosen_by_model, fixed

    saved = torch.load(weights, weights_only=False)
    module = datamodule(name, output)
    # The held-out images as training saw them (at full_size); weights saved before input_scale
    # existed hold them at the denoiser's size, so they are read again from the dataset.
    holdout = chosen_holdout(module, saved)
    model = load_denoiser(saved, settings, module, holdout)
    model.calibrate(holdout.stacked(lambda image: resize(image, list(model.full_size), antialias=True), "cpu"))
    auto = model.score_fusion == ScoreFusion.AUTO
    if (split == "selection" or auto) and not holdout.has_selection:
        msg = f"{weights} was trained without selection images: delete it to retrain."
        raise RuntimeError(msg)
    if split == "selection" or auto:
        start = time.perf_counter()
        selection = SelectionTerms(model, holdout)
        if split == "selection":
            rule = chosen_by_model(model.top_k, (True, True, model.uses_memory)) if auto else fixed(model.fusion)
            return {**selection.scored(rule, cross_fit=auto), "aupro": float("nan"),
                    "seconds_per_image": (time.perf_counter() - start) / len(selection.source)}
        # As the model chooses while it trains: on the whole selection split.
        model.fusion.copy_(chosen_by_model(model.top_k, (True, True, model.uses_memory))(
            selection.terms, selection.split.labels, selection.split.masks))
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


def write_table(
    records: list[dict[str, Any]], rows: list[dict[str, Any]], datasets: list[str], target: Path, chosen: str | None,
) -> None:
    """The ablation as markdown: every row on the selection splits, then the chosen row on the test sets."""
    def table(split: str, names: list[str], with_aupro: bool) -> list[str]:
        by_key = {(r["row"], r["dataset"]): r for r in records if r.get("split", "test") == split}
        header = ["setting"]
        for name in datasets:
            header += [f"{name} I-AUROC", f"{name} P-AUROC"] + ([f"{name} AUPRO"] if with_aupro and name != "demo" else [])
        header += ["mean I-AUROC", "s/image"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
        for row in names:
            cells, seconds, image = [row], [], []
            for name in datasets:
                record = by_key.get((row, name))
                keys = ["image_auroc", "pixel_auroc"] + (["aupro"] if with_aupro and name != "demo" else [])
                cells += [f"{record[k]:.3f}" if record else "–" for k in keys]
                if record:
                    seconds.append(record["seconds_per_image"])
                    image.append(record["image_auroc"])
            cells.append(f"{np.mean(image):.3f}" if len(image) == len(datasets) else "–")
            cells.append(f"{np.mean(seconds):.2f}" if seconds else "–")
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    names = [row["name"] for row in rows]
    lines = ["Selection splits (held-out normal training images and synthetic defects; cross-fitted for rows "
             "that choose their score fusion):", "", *table("selection", names, with_aupro=False)]
    chosen_tested = any(r["row"] == chosen and r.get("split", "test") == "test" for r in records)
    if chosen is not None and chosen_tested:
        lines += ["", f"Chosen by mean selection image AUROC: **{chosen}**. Its test sets, scored after the choice:",
                  "", *table("test", [chosen], with_aupro=True)]
    elif chosen is not None:
        lines += ["", f"Chosen by mean selection image AUROC: **{chosen}** (its test sets not scored: `--no-test`)."]
    test_only = [name for name in names if name != chosen and any(
        r["row"] == name and r.get("split", "test") == "test" for r in records)]
    if test_only:
        lines += ["", "Test sets of other rows (`--split test`: a report, not a choice):", "",
                  *table("test", test_only, with_aupro=True)]
    target.write_text("\n".join(lines) + "\n")


def best_row(records: list[dict[str, Any]], rows: list[dict[str, Any]], datasets: list[str]) -> str | None:
    """The row with the best mean selection image AUROC over ``datasets`` (then pixel AUROC); None if none is complete."""
    by_key = {(r["row"], r["dataset"]): r for r in records if r.get("split") == "selection"}
    complete = [row["name"] for row in rows if all((row["name"], name) in by_key for name in datasets)]
    if not complete:
        return None
    mean = lambda row, key: np.mean([by_key[(row, name)][key] for name in datasets])  # noqa: E731
    return max(complete, key=lambda row: (mean(row, "image_auroc"), mean(row, "pixel_auroc")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["bottle", "kolektor", "tire", "mpdd"])
    parser.add_argument("--rows", type=Path, default=Path(__file__).with_name("mdps_ablation_current.json"),
                        help="JSON {pinned: settings of every row, rows: [{name, size, settings, datasets?}]}")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--train-args", type=json.loads, default={})
    parser.add_argument("--pinned-args", type=json.loads, default={},
                        help="JSON settings that replace the rows file's pinned ones (e.g. a preset's input_scale)")
    parser.add_argument("--split", choices=("selection", "test"), default="selection",
                        help="selection (default): score every row on the selection splits, choose, then test the "
                        "chosen row; test: score every row's test set (a report: choose nothing from it)")
    parser.add_argument("--no-test", action="store_true",
                        help="choose on the selection splits and write the table without scoring the chosen row's test sets")
    parser.add_argument("--weights-from", type=Path, metavar="RUNS",
                        help="use the denoisers a cpu-profile run kept (its runs/ folder) instead of training")
    parser.add_argument("--output", type=Path, required=True, help="weights, rows.jsonl and table.md (resumable)")
    args = parser.parse_args()
    hide_library_import_warnings()
    torch.set_num_threads(2)
    args.output.mkdir(parents=True, exist_ok=True)
    results_file = args.output / "rows.jsonl"
    records = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    pinned, rows = read_rows(args.rows)
    pinned = {**pinned, **args.pinned_args}
    by_name = {row["name"]: row for row in rows}

    def run(row: dict[str, Any], name: str, split: str) -> None:
        if any((r["row"], r["dataset"], r.get("split", "test")) == (row["name"], name, split) for r in records):
            return
        weights = train(name, row.get("size", "64"), args.epochs, args.output, args.train_args, args.weights_from)
        torch.manual_seed(0)
        metrics = evaluate(name, weights, {**pinned, **row.get("settings", {})}, args.output, split)
        record = {"row": row["name"], "dataset": name, "split": split, "size": row.get("size", "64"), **metrics}
        print(json.dumps(record), flush=True)
        records.append(record)
        with results_file.open("a") as file:
            file.write(json.dumps(record) + "\n")

    for row in rows:
        for name in args.datasets:
            if name in row.get("datasets", args.datasets):
                run(row, name, args.split)
    chosen = best_row(records, rows, args.datasets) if args.split == "selection" else None
    if chosen is not None:
        print(f"chosen on the selection splits: {chosen}", flush=True)
        for name in [] if args.no_test else args.datasets:
            run(by_name[chosen], name, "test")
    write_table(records, rows, args.datasets, args.output / "table.md", chosen)


if __name__ == "__main__":
    main()
