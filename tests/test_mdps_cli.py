"""The anomalib CLI trains, tests and reloads Mdps on real MVTec bottle images."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.cli import AnomalibCLI
from PIL import Image

from anomalib_mdps.presets import preset_path
from conftest import assert_export_parity, cli_metrics, numpy_outputs

SMOKE = str(preset_path("mdps_smoke"))
# The smoke preset (6 epochs at 32 px) scored image / pixel AUROC 0.929 / 0.802 on bottle here; the
# floors leave a margin for other CPUs' rounding and sit far above an inverted map or a constant score.
SMOKE_FLOORS = {"image_AUROC": 0.8, "pixel_AUROC": 0.7}


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_cli_train_then_test_from_checkpoint(mdps_smoke_trained: tuple[AnomalibCLI, Path], mvtec_root: Path,
                                            tmp_path: Path) -> None:
    trained, root = mdps_smoke_trained
    common = ["--config", SMOKE, "--data.root", str(mvtec_root), "--default_root_dir", str(root)]
    metrics = cli_metrics(trained)
    for name, floor in SMOKE_FLOORS.items():
        assert metrics[name] >= floor, (name, metrics[name])
    predictions = trained.engine.predict(model=trained.model, dataloaders=trained.datamodule.test_dataloader())
    scores = torch.cat([batch.pred_score for batch in predictions])
    labels = torch.cat([batch.gt_label for batch in predictions]).bool()
    assert scores[labels].mean() > scores[~labels].mean()

    checkpoints = sorted(root.rglob("*.ckpt"))
    assert checkpoints, "training saved no checkpoint"
    tested = AnomalibCLI(["test", *common, "--ckpt_path", str(checkpoints[-1])])
    retested = cli_metrics(tested)
    for name in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO"):
        assert retested[name] == pytest.approx(metrics[name], abs=1e-6), name

    panels = sorted(root.rglob("images/**/*.png"))
    assert panels, "no result images were written"
    width, height = Image.open(panels[0]).size
    # image | reconstruction | ground truth | heatmap overlay | predicted-mask overlay; no reconstruction
    # where the chosen fusion gives D̄ no weight and the model does not sample.
    fields = 5 if trained.model.model.needs_difference else 4
    assert width == fields * height, (width, height, trained.model.model.fusion)

    _check_cli_openvino_export(checkpoints[-1], tested, tmp_path / "exported")


def _check_cli_openvino_export(checkpoint: Path, tested: AnomalibCLI, export_root: Path) -> None:
    """``anomalib export --model Mdps --export_type openvino --ckpt_path …`` (no input size: the
    model's own) gives a model that anomalib's ``OpenVINOInferencer`` runs like eager torch.
    """
    from anomalib.deploy import OpenVINOInferencer

    AnomalibCLI([
        "export", "--model", "Mdps", "--export_type", "openvino", "--ckpt_path", str(checkpoint),
        "--export_root", str(export_root),
    ])
    (model_xml,) = export_root.rglob("model.xml")
    inferencer = OpenVINOInferencer(model_xml, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})
    model = tested.model.eval()
    batch = next(iter(tested.datamodule.test_dataloader()))
    images = model.pre_processor.transform(batch.image[:4])
    predictions = [inferencer.predict(image.permute(1, 2, 0).numpy()) for image in images]
    exported = {
        "pred_score": np.concatenate([p.pred_score.reshape(-1) for p in predictions]),
        "anomaly_map": np.concatenate([p.anomaly_map.reshape(1, *p.anomaly_map.shape[-2:]) for p in predictions]),
    }
    with torch.no_grad(), model.model.exportable():
        reference = numpy_outputs(model(images))
    assert_export_parity(exported, {name: reference[name] for name in exported})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["Mdps", "InvAD", "Glad"])
def test_bare_model_name_resolves_from_the_command_line(name: str, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "anomalib.cli.cli", "train", "--model", name,
        "--model.image_size", "[32, 32]", "--default_root_dir", str(tmp_path), "--print_config",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    model_section = result.stdout.split("\nmodel:\n", 1)[1]
    assert model_section.split("\n", 1)[0].strip().startswith("class_path: anomalib_mdps")
    assert "image_size:" in model_section


def test_python_start_does_not_import_anomalib() -> None:
    code = "import sys; assert not {'anomalib', 'torch', 'anomalib_mdps.models'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    code = "import anomalib.models as models; print(models.Mdps.__module__, models.InvAD.__module__, models.Glad.__module__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert result.stdout.split() == [f"anomalib_mdps.models.{name}.lightning_model" for name in ("mdps", "invad", "glad")]
