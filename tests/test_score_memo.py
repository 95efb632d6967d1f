"""A test pass over the validation images reuses their scores, and only while nothing changed."""

from pathlib import Path

import pytest
import torch
from anomalib.data import Folder
from anomalib.engine import Engine

from anomalib_mdps.models.mdps import Mdps, MdpsModel
from anomalib_mdps.models.score_memo import ScoreMemo
from conftest import TINY_MDPS
from test_bad_input import _folder_dataset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def _remembered(model: MdpsModel, images: torch.Tensor) -> ScoreMemo:
    memo = ScoreMemo()
    output = model.reconstruct(images)
    memo.remember(model, images, {"pred_score": output.pred_score, "anomaly_map": output.anomaly_map})
    return memo


def test_scores_are_recalled_for_the_same_images_and_model(tiny_mdps_model) -> None:
    model = tiny_mdps_model()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    memo = _remembered(model, images)
    recalled = memo.recall(model, images[[2, 0]])
    assert recalled is not None
    expected = model.reconstruct(images[[2, 0]]).pred_score
    torch.testing.assert_close(recalled["pred_score"], expected, rtol=1e-4, atol=1e-6)


def _optimiser_like_step(module: torch.nn.Module) -> None:
    with torch.no_grad():
        next(module.parameters()).add_(0.0)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda model: _optimiser_like_step(model.prior.ema_denoiser), id="a weight changed in place"),
        pytest.param(lambda model: model.calibrate(torch.rand(2, 3, 32, 32)), id="recalibrated"),
        pytest.param(lambda model: setattr(model, "num_samples", 3), id="a setting changed"),
        pytest.param(lambda model: model.load_state_dict(model.state_dict()), id="weights loaded"),
    ],
)
def test_any_change_to_the_model_forgets_the_scores(tiny_mdps_model, change) -> None:  # noqa: ANN001
    model = tiny_mdps_model()
    images = torch.rand(2, 3, 32, 32)
    memo = _remembered(model, images)
    change(model)
    assert memo.recall(model, images) is None


def test_an_image_not_scored_before_is_not_recalled(tiny_mdps_model) -> None:
    model = tiny_mdps_model()
    images = torch.rand(2, 3, 32, 32)
    memo = _remembered(model, images)
    other = images.clone()
    other[1, 0, 0, 0] += 1e-3
    assert memo.recall(model, other) is None


@pytest.mark.slow
@pytest.mark.parametrize(
    ("raw_size", "image_size"),
    [((40, 40), (32, 32)), ((56, 40), 32)],
    ids=["square", "aspect-aware"],  # aspect-aware: the datasets' resize must follow the model's size
)
def test_engine_test_after_fit_reuses_the_validation_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raw_size: tuple[int, int], image_size: object,
) -> None:
    root = _folder_dataset(tmp_path / "parts", raw_size, normal=8, defective=3)
    datamodule = Folder(
        name="parts", root=root, normal_dir="good", abnormal_dir="defect", train_batch_size=4, eval_batch_size=4,
        num_workers=0, val_split_mode="same_as_test",
    )
    model = Mdps(**{**TINY_MDPS, "image_size": image_size}, max_epochs=1, calibration_images=2, visualizer=False)
    calls: list[int] = []
    reconstruct = MdpsModel.reconstruct

    def counted(self: MdpsModel, images: torch.Tensor):  # noqa: ANN202
        calls.append(images.shape[0])
        return reconstruct(self, images)

    monkeypatch.setattr(MdpsModel, "reconstruct", counted)
    engine = Engine(default_root_dir=tmp_path / "results", logger=False, enable_progress_bar=False)
    engine.fit(model, datamodule=datamodule)
    validated = sum(calls)
    assert validated > 0
    reused = engine.test(model, datamodule=datamodule, verbose=False)[0]
    assert sum(calls) == validated, "the test pass sampled images the validation pass had scored"

    model.score_memo.clear()
    recomputed = engine.test(model, datamodule=datamodule, verbose=False)[0]
    assert sum(calls) == 2 * validated
    for name in ("image_AUROC", "image_F1Score"):  # this folder data set has no masks
        assert reused[name] == pytest.approx(recomputed[name], abs=1e-6), name
