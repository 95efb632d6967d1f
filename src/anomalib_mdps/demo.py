"""``anomalib-mdps-demo``: train and test MDPS end to end with no download.

By default it makes a small synthetic dataset (MVTec layout) and runs the demo preset;
``--root``/``--category`` point it at any MVTec-style dataset instead.
"""

import argparse
import os
import sys
from pathlib import Path

from anomalib_mdps.console import hide_library_import_warnings
from anomalib_mdps.demo_data import make_demo_dataset
from anomalib_mdps.presets import preset_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anomalib-mdps-demo", description=__doc__)
    parser.add_argument("--root", type=Path, help="MVTec-style dataset root (default: make a synthetic one)")
    parser.add_argument("--category", default="demo")
    parser.add_argument("--config", default="mdps_demo",
                        help="model preset: a shipped one by name (python -m anomalib_mdps.presets lists them) or a path")
    parser.add_argument("--output", type=Path, default=Path("results"), help="where runs, heatmaps and weights go")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hide_library_import_warnings()
    try:
        config = preset_path(args.config)
    except FileNotFoundError as error:
        parser.error(str(error))
    root = args.root
    if root is None:
        root = make_demo_dataset(args.output / "demo_data")
        print(f"Synthetic demo dataset: {root / args.category}")
    elif not (root / args.category / "train" / "good").is_dir():
        parser.error(f"{root / args.category}/train/good not found: --root must be an MVTec-style dataset root.")

    from anomalib.cli import AnomalibCLI

    cli = AnomalibCLI([
        "train",
        "--config", str(config),
        "--data", "anomalib.data.MVTecAD",
        "--data.root", str(root),
        "--data.category", args.category,
        "--data.num_workers", "0",
        "--default_root_dir", str(args.output),
    ])
    metrics = {name: round(float(value), 4) for name, value in cli.engine.trainer.callback_metrics.items()}
    print("Test metrics:", metrics)
    images = args.output.resolve() / "Mdps" / "MVTecAD" / args.category / "latest" / "images"
    sampled = cli.model.model.needs_difference
    print(f"Heatmaps{' and reconstructions' if sampled else ''}: {images}")
    if not sampled:
        print("No reconstructions: the selection split gave D̄ (eq. 18) no weight in the map or the score, so the "
              "test images were scored without sampling (D̄'s own selection AUROCs are in the fusion line above).")
    panels = overview_panels(images)
    if panels is not None:
        fields = ["input", *(["reconstruction"] if sampled else []), "ground truth", "heatmap", "mask"]
        print(f"One panel per test folder ({' | '.join(fields)}): {panels}")
    return 0


def overview_panels(images: Path) -> Path | None:
    """The first saved result image of each test folder, stacked into ``images/overview.png``."""
    from PIL import Image

    firsts = [min(folder.glob("*.png")) for folder in sorted(images.iterdir()) if folder.is_dir() and any(
        folder.glob("*.png"))] if images.is_dir() else []
    if not firsts:
        return None
    rows = [Image.open(path).convert("RGB") for path in firsts]
    overview = Image.new("RGB", (max(row.width for row in rows), sum(row.height for row in rows)), "white")
    top = 0
    for row in rows:
        overview.paste(row, (0, top))
        top += row.height
    target = images / "overview.png"
    overview.save(target)
    return target


if __name__ == "__main__":
    sys.exit(main())
