"""``anomalib-mdps-predict``: score a folder of images with an exported model, write heatmaps.

Works with anomalib's exports of any model: ``.pt`` (torch export, ``TorchInferencer``; a
pickle, so anomalib loads it only with ``TRUST_REMOTE_CODE=1``) and ``.xml``/``.onnx``
(``OpenVINOInferencer``). A file that cannot be read is reported and
skipped; the other images are still processed, and the exit code is 1 if any file failed.

Kept beside ``anomalib predict`` because that command runs a Lightning checkpoint through the
Engine; for exported files anomalib 2.7 ships the inferencers used here but no command.
"""

import argparse
import csv
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from anomalib_mdps.console import hide_library_import_warnings

logger = logging.getLogger("anomalib_mdps.predict")


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """The image files in ``folder`` (sorted; by torchvision's image suffixes, any case)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(path for path in candidates if path.is_file() and path.suffix.lower() in IMG_EXTENSIONS)


def load_inferencer(weights: Path, device: str = "CPU", precision: str = "f32"):  # noqa: ANN201
    """anomalib's inferencer for an exported model file."""
    if weights.suffix == ".pt":
        from anomalib.deploy import TorchInferencer

        return TorchInferencer(path=weights, device="cpu" if device.upper() == "CPU" else device)
    if weights.suffix in {".xml", ".onnx"}:
        from anomalib.deploy import OpenVINOInferencer

        return OpenVINOInferencer(path=weights, device=device, config={"INFERENCE_PRECISION_HINT": precision})
    msg = f"Unsupported model file {weights}: expected .pt (torch), .xml (OpenVINO) or .onnx."
    raise ValueError(msg)


def read_rgb(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """An RGB float image in [0, 1], (H, W, 3), resized to ``size`` (H, W) when given."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        if size is not None:
            image = image.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(image, dtype=np.float32) / 255.0


def static_input_size(inferencer) -> tuple[int, int] | None:  # noqa: ANN001
    """The (H, W) an OpenVINO model was exported for, or ``None`` when it takes any size."""
    shape = getattr(getattr(inferencer, "input_blob", None), "partial_shape", None)
    if shape is None or shape[2].is_dynamic or shape[3].is_dynamic:
        return None
    return shape[2].get_length(), shape[3].get_length()


def heatmap_panel(image: np.ndarray, anomaly_map: np.ndarray) -> Image.Image:
    """Input | input overlaid with the anomaly map (anomalib's colormap)."""
    from anomalib.visualization.image.functional import overlay_image, visualize_anomaly_map

    base = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
    amap = torch.as_tensor(np.asarray(anomaly_map, dtype=np.float32)).squeeze()
    heat = visualize_anomaly_map(amap, colormap=True, normalize=True).resize(base.size)
    panel = Image.new("RGB", (2 * base.width, base.height))
    panel.paste(base, (0, 0))
    panel.paste(overlay_image(base, heat, alpha=0.5), (base.width, 0))
    return panel


def predict_folder(weights: Path, folder: Path, output: Path, device: str = "CPU") -> list[tuple[Path, str]]:
    """Score every image in ``folder``; returns the files that failed, with the reason."""
    files = list_images(folder)
    if not files:
        msg = f"No images (.png, .jpg, .bmp, .tif, ...) in {folder}."
        raise FileNotFoundError(msg)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        msg = f"The output folder {output} already holds files; choose a new --output (nothing is overwritten)."
        raise FileExistsError(msg)
    inferencer = load_inferencer(weights, device)
    size = static_input_size(inferencer)
    output.mkdir(parents=True, exist_ok=True)
    failures: list[tuple[Path, str]] = []
    with (output / "scores.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "pred_score", "pred_label", "heatmap"])
        for path in files:
            try:
                image = read_rgb(path, size)
            except (UnidentifiedImageError, OSError, ValueError) as error:
                failures.append((path, f"cannot read image: {error}"))
                logger.error("Skipped %s: cannot read image (%s)", path, error)
                continue
            prediction = inferencer.predict(torch.from_numpy(image).permute(2, 0, 1) if weights.suffix == ".pt" else image)
            score = float(np.asarray(prediction.pred_score).reshape(-1)[0])
            label = bool(np.asarray(prediction.pred_label).reshape(-1)[0]) if prediction.pred_label is not None else ""
            heatmap = output / f"{path.stem}_heatmap.png"
            heatmap_panel(image, np.asarray(prediction.anomaly_map)).save(heatmap)
            writer.writerow([path.name, f"{score:.6f}", label, heatmap.name])
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anomalib-mdps-predict", description=__doc__)
    parser.add_argument("weights", type=Path, help="exported model: model.pt, model.xml or model.onnx")
    parser.add_argument("images", type=Path, help="folder of images to score")
    parser.add_argument("--output", type=Path, default=Path("predictions"))
    parser.add_argument("--device", default="CPU")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    hide_library_import_warnings()
    if not args.weights.is_file():
        parser.error(f"model file {args.weights} not found")
    if not args.images.is_dir():
        parser.error(f"image folder {args.images} not found")
    try:
        failures = predict_folder(args.weights, args.images, args.output, args.device)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        parser.error(str(error))
    print(f"Scores and heatmaps: {args.output.resolve()}")
    for path, reason in failures:
        print(f"FAILED {path}: {reason}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
