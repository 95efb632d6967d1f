"""Bad input through the real entry points: each case ends in a message that says what is wrong."""

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.cli import AnomalibCLI
from PIL import Image

from anomalib_mdps.data_checks import DatasetNotFoundError, UnreadableImageError
from anomalib_mdps.presets import preset_path

SMOKE = str(preset_path("mdps_smoke"))
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def _folder_dataset(root: Path, size: tuple[int, int], normal: int = 6, defective: int = 2) -> Path:
    """good/ and defect/ folders of seeded random images (the defect ones carry a bright square)."""
    rng = np.random.default_rng(0)
    for folder, count in (("good", normal), ("defect", defective)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image = (rng.random((*size, 3)) * 80 + 60).astype(np.uint8)
            if folder == "defect":
                image[size[0] // 4 : size[0] // 2, size[1] // 4 : size[1] // 2] = 255
            Image.fromarray(image).save(root / folder / f"{index:03d}.png")
    return root


def _folder_arguments(root: Path, tmp_path: Path) -> list[str]:
    return [
        "--config", SMOKE, "--data", "anomalib.data.Folder", "--data.name", "parts", "--data.root", str(root),
        "--data.normal_dir", "good", "--data.abnormal_dir", "defect", "--data.train_batch_size", "4",
        "--data.eval_batch_size", "4", "--data.num_workers", "0", "--default_root_dir", str(tmp_path / "results"),
    ]


def test_a_missing_dataset_is_refused_not_downloaded(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError, match=r"MVTecAD data not found at .*nowhere/bottle.*never downloads"):
        AnomalibCLI(["train", "--config", SMOKE, "--data.root", str(missing), "--default_root_dir", str(tmp_path)])
    assert not missing.exists()
    # the refusal belonged to that run's datamodule: anomalib's own module is as it was
    from anomalib.data.datamodules.image import mvtecad
    from anomalib.data.utils import download_and_extract

    assert mvtecad.download_and_extract is download_and_extract


def test_an_empty_folder_of_normal_images_is_named(tmp_path: Path) -> None:
    root = _folder_dataset(tmp_path / "parts", (40, 40))
    for image in (root / "good").iterdir():
        image.unlink()
    with pytest.raises(Exception, match="good") as error:
        AnomalibCLI(["train", *_folder_arguments(root, tmp_path)])
    assert "good" in str(error.value)


def test_a_corrupt_image_in_the_dataset_is_named(tmp_path: Path) -> None:
    root = _folder_dataset(tmp_path / "parts", (40, 40))
    (root / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(UnreadableImageError, match=r"Cannot read 1 image file\(s\): .*good/broken.png"):
        AnomalibCLI(["train", *_folder_arguments(root, tmp_path)])


def test_16_pixel_images_are_upsampled_to_the_model_input(tmp_path: Path) -> None:
    root = _folder_dataset(tmp_path / "parts", (16, 16))
    cli = AnomalibCLI(["train", *_folder_arguments(root, tmp_path)])
    predictions = cli.engine.predict(cli.model, data_path=root / "defect", return_predictions=True)
    size = tuple(cli.model.model.full_size)
    for prediction in predictions:
        assert tuple(prediction.image.shape[-2:]) == tuple(prediction.anomaly_map.shape[-2:]) == size
        # The bright square (rows and columns 4–7 of 16) holds the peak of each defective raw map.
        with torch.no_grad():
            raw_map = cli.model.model.eval()(prediction.image).anomaly_map
        row, column = divmod(int(raw_map.flatten(1).argmax(dim=1)[0]), size[1])
        assert 4 / 16 <= row / size[0] < 8 / 16 and 4 / 16 <= column / size[1] < 8 / 16, (row, column, size)


def test_predict_on_an_empty_folder_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from anomalib_mdps.predict import main

    weights = tmp_path / "model.xml"
    weights.write_text("<net/>")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(weights), str(tmp_path / "empty"), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"No images (.png, .jpg, .bmp, .tif, ...) in {tmp_path / 'empty'}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_another_model_is_refused_by_name(mvtec_root: Path, tmp_path: Path) -> None:
    import lightning

    from anomalib_mdps.models import InvAD

    checkpoint = tmp_path / "invad.ckpt"
    torch.save({"state_dict": InvAD().state_dict(), "pytorch-lightning_version": lightning.__version__,
                "hyper_parameters": {}}, checkpoint)
    with pytest.raises(ValueError, match="does not hold a Mdps model.*another model class"):
        AnomalibCLI(["test", "--config", SMOKE, "--data.root", str(mvtec_root), "--default_root_dir", str(tmp_path),
                     "--ckpt_path", str(checkpoint)])


def test_predict_refuses_an_output_folder_that_holds_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from anomalib_mdps.predict import main

    weights = tmp_path / "model.xml"
    weights.write_text("<net/>")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "part.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "scores.csv").write_text("earlier results")
    with pytest.raises(SystemExit) as exit_info:
        main([str(weights), str(tmp_path / "images"), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "already holds files" in capsys.readouterr().err
    assert (tmp_path / "out" / "scores.csv").read_text() == "earlier results"
