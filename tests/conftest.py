"""Shared fixtures: tiny models and the real data beside the repository."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ANOMALIB_MDPS_DATA", REPO_ROOT.parent / "shared" / "data"))

TINY_MDPS = {
    "image_size": (32, 32),
    "unet_channels": (32, 64),
    "layers_per_block": 1,
    "noise_level": 60,
    "num_steps": 3,
    "num_samples": 2,
    "input_scale": 1,  # images enter at the denoiser's size (tests of input_scale set their own)
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that reads the real data is part of the slow suite."""
    for item in items:
        if "mvtec_root" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def mvtec_root() -> Path:
    """MVTec AD's root in the real data beside the repository: skipped where it is absent, an error under CI."""
    root = SHARED_DATA / "mvtec_ad"
    if not (root / "bottle" / "train").is_dir():
        reason = (f"real data not found: no MVTec AD bottle under {root} (put the shared data folder beside the "
                  "repository, or point ANOMALIB_MDPS_DATA at it)")
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(reason + "; CI must have it")
        pytest.skip(reason)
    return root


@pytest.fixture(scope="session")
def mdps_smoke_trained(mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """``anomalib train`` of the Mdps smoke preset on bottle, run once for the tests that read a trained
    Mdps (the CLI's round trip, the diffusion path alone), and the folder it wrote to.
    """
    import warnings

    from anomalib.cli import AnomalibCLI

    from anomalib_mdps.presets import preset_path

    root = tmp_path_factory.mktemp("mdps_smoke")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        cli = AnomalibCLI([
            "train", "--config", str(preset_path("mdps_smoke")), "--data.root", str(mvtec_root),
            "--default_root_dir", str(root),
        ])
    return cli, root


@pytest.fixture
def tiny_mdps_model():
    from anomalib_mdps.models.mdps import MdpsModel

    def build(**overrides) -> MdpsModel:
        torch.manual_seed(0)
        model = MdpsModel(**{**TINY_MDPS, **overrides})
        model.update_ema()
        model.eval()
        model.fit_feature_density(torch.rand(4, 3, *model.full_size, generator=torch.Generator().manual_seed(6)))
        normal = torch.rand(4, 3, *model.full_size, generator=torch.Generator().manual_seed(7))
        model.calibrate(normal)
        return model

    return build


def cli_metrics(cli) -> dict[str, float]:  # noqa: ANN001
    """The metrics an ``AnomalibCLI`` run logged, as floats."""
    return {name: float(value) for name, value in cli.engine.trainer.callback_metrics.items()}


# Exported graphs against eager torch, judged on what a user sees and sized to float32 (eps 1.2e-7)
# times the ~1e3 operations of an unrolled sampler: scores to a relative 1e-4, maps by their most
# anomalous pixels and by the overall deviation relative to each map's range.
EXPORT_SCORE_RTOL = 1e-4
EXPORT_MAP_RANGE_FRACTION = 1e-3
EXPORT_TOP_PIXEL_FRACTION = 0.01
EXPORT_TOP_PIXEL_OVERLAP = 0.9


def onnx_runtime_outputs(onnx_path: Path, images: torch.Tensor) -> dict[str, np.ndarray]:
    """The named outputs of an ONNX export run by ONNX Runtime on CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input": images.numpy()}), strict=True))


def openvino_f32_outputs(model_path: Path, images: torch.Tensor) -> dict[str, np.ndarray]:
    """The named outputs of an export run by OpenVINO on CPU at f32 (its default here is bf16)."""
    import openvino

    core = openvino.Core()
    compiled = core.compile_model(core.read_model(model_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return {port.get_any_name(): value for port, value in compiled(images.numpy()).items()}


def assert_export_parity(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    """``outputs`` match ``reference`` (eager torch) where a user looks.

    Image scores agree to ``EXPORT_SCORE_RTOL`` and rank the images alike; each anomaly map shares
    at least 90 % of its top 1 % pixels with the reference and deviates by at most 1e-3 of its range.
    """
    scores = np.asarray(outputs["pred_score"], dtype=np.float64).reshape(-1)
    reference_scores = np.asarray(reference["pred_score"], dtype=np.float64).reshape(-1)
    np.testing.assert_allclose(scores, reference_scores, rtol=EXPORT_SCORE_RTOL, atol=1e-7)
    np.testing.assert_array_equal(np.argsort(scores, kind="stable"), np.argsort(reference_scores, kind="stable"))
    reference_maps = np.asarray(reference["anomaly_map"], dtype=np.float64)
    maps = np.asarray(outputs["anomaly_map"], dtype=np.float64).reshape(reference_maps.shape)
    for index, (exported, eager) in enumerate(zip(maps.reshape(len(maps), -1), reference_maps.reshape(len(maps), -1),
                                                  strict=True)):
        span = max(float(np.ptp(eager)), 1e-12)
        assert np.abs(exported - eager).max() <= EXPORT_MAP_RANGE_FRACTION * span, f"map {index} deviates"
        k = max(10, round(EXPORT_TOP_PIXEL_FRACTION * eager.size))
        shared = np.intersect1d(np.argpartition(-exported, k)[:k], np.argpartition(-eager, k)[:k]).size
        assert shared >= EXPORT_TOP_PIXEL_OVERLAP * k, f"map {index}: {shared} of its top {k} pixels agree"


def numpy_outputs(output) -> dict[str, np.ndarray]:  # noqa: ANN001
    """``pred_score`` and ``anomaly_map`` of a model output (InferenceBatch) as numpy arrays."""
    return {"pred_score": output.pred_score.numpy(), "anomaly_map": output.anomaly_map.numpy()}
