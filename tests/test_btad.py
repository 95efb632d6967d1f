"""anomalib's ``BTech`` datamodule trains and tests Mdps on generated data in BTAD's layout, offline."""

from pathlib import Path

import pytest
from anomalib.cli import AnomalibCLI

from anomalib_mdps.demo_data import DEFECTS, make_demo_dataset
from anomalib_mdps.presets import preset_path
from conftest import cli_metrics

# The smoke preset scored image / pixel AUROC 1.000 / 0.986 on this generated set here; the floors sit far
# above a constant score or an inverted map and leave room for other CPUs' rounding.
FLOORS = {"image_AUROC": 0.8, "pixel_AUROC": 0.8}


def test_btad_layout_is_what_btech_reads(tmp_path: Path) -> None:
    from anomalib.data.datasets.image.btech import make_btech_dataset

    root = make_demo_dataset(tmp_path, category="01", size=32, num_train=6, layout="btad")
    samples = make_btech_dataset(root / "01")
    assert sorted(samples.split.unique()) == ["test", "train"]
    assert set(samples.label) == {"ok", "ko"}
    defective = samples[samples.label == "ko"]
    assert len(defective) == 6 * len(DEFECTS)
    assert all(Path(path).suffix == ".bmp" for path in samples.image_path)
    assert all(Path(path).is_file() for path in defective.mask_path), "a defect's mask is not where BTech looks"


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_smoke_preset_trains_and_tests_through_btech(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from anomalib.data.datamodules.image import btech

    def refuse_download(*args: object, **kwargs: object) -> None:
        pytest.fail("BTech tried to download its dataset")

    monkeypatch.setattr(btech, "download_and_extract", refuse_download)
    root = make_demo_dataset(tmp_path / "BTech", category="01", size=64, num_train=24, layout="btad")
    cli = AnomalibCLI([
        "train", "--config", str(preset_path("mdps_smoke")),
        "--data", "anomalib.data.BTech", "--data.root", str(root), "--data.category", "01",
        "--data.num_workers", "0", "--default_root_dir", str(tmp_path / "results"),
    ])
    assert len(cli.datamodule.test_data) == 16 + 6 * len(DEFECTS)
    metrics = cli_metrics(cli)
    for name, floor in FLOORS.items():
        assert metrics[name] >= floor, (name, metrics[name])
