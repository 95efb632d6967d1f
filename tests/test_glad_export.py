"""Exported Glad graphs (ONNX Runtime, OpenVINO, torch) agree with eager torch, per-image locks included.

The lock test runs as masks inside one ONNX ``Scan``; τ is set between the test images' distances so
that images of one batch lock at different steps, which is what the graph must carry per image.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from anomalib_mdps.models import Glad
from conftest import assert_export_parity, numpy_outputs, onnx_runtime_outputs, openvino_f32_outputs

pytestmark = pytest.mark.slow  # graph capture and conversion: tens of seconds per model


def _images(batch: int) -> torch.Tensor:
    images = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    images[1::2, :, 8:20, 8:20] = 1.0  # a bright square on every other image
    return images


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Glad, Path, Path]:
    torch.manual_seed(0)
    model = Glad(
        image_size=(32, 32), unet_channels=(32, 64), layers_per_block=1, start_level=300, num_steps=4,
        min_level=100, backbone_input_size=(64, 64), lock_distance=float("inf"), evaluator=False, visualizer=False,
    )
    model.model.update_ema()
    model.eval()
    # At the first step both views of x̂0 are the same image (distance 0); the second one tells images apart.
    second_step = model.model._adaptive(_images(4), torch.tensor(float("inf"))).distances[:, 1].sort().values
    model.model.lock_threshold.fill_(float(second_step[1:3].mean()))  # half-way, far from any image's distance
    root = tmp_path_factory.mktemp("export")
    return model, model.to_onnx(root, input_size=(32, 32)), model.to_torch(root)


def _eager(model: Glad, images: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return numpy_outputs(model(images))


def test_the_test_images_lock_at_different_steps(exported) -> None:
    model, _, _ = exported
    with torch.no_grad():
        levels = model.model.reconstruct(_images(4)).lock_level
    assert len(set(levels.tolist())) > 1, levels


def test_onnx_runtime_matches_eager(exported) -> None:
    model, onnx_path, _ = exported
    for batch in (1, 4):
        images = _images(batch)
        assert_export_parity(onnx_runtime_outputs(onnx_path, images), _eager(model, images))


def test_openvino_matches_eager(exported) -> None:
    model, onnx_path, _ = exported
    images = _images(4)
    assert_export_parity(openvino_f32_outputs(onnx_path, images), _eager(model, images))


def test_torch_export_matches_eager(exported) -> None:
    model, _, torch_path = exported
    loaded = torch.load(torch_path, weights_only=False)["model"]
    images = _images(4)
    with torch.inference_mode():
        output = loaded(images)
    assert_export_parity(numpy_outputs(output), _eager(model, images))
