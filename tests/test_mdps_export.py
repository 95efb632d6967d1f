"""Exported Mdps graphs (ONNX Runtime, OpenVINO, torch) agree with eager torch.

Parity is judged as ``conftest.assert_export_parity`` says (relative score tolerance, image ranking,
top pixels of each map), with OpenVINO forced to f32 (it runs bf16 by default on CPUs that support it).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from anomalib_mdps.models import Mdps
from conftest import assert_export_parity, numpy_outputs, onnx_runtime_outputs, openvino_f32_outputs

pytestmark = pytest.mark.slow  # graph capture and conversion: tens of seconds per model


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Mdps, Path, Path]:
    torch.manual_seed(0)
    model = Mdps(
        image_size=(32, 32), unet_channels=(32, 64), layers_per_block=1, noise_level=40, num_steps=3,
        num_samples=2, guidance="dps", input_scale=2, evaluator=False, visualizer=False,
    )
    model.model.update_ema()
    model.eval()
    # Images enter at input_scale x 32 px: the graph holds the box filter and the map's upsampling.
    model.model.fit_feature_density(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(4)))
    model.model.calibrate(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(5)))
    root = tmp_path_factory.mktemp("export")
    return model, model.to_onnx(root), model.to_torch(root)


def _eager(model: Mdps, images: torch.Tensor) -> dict[str, np.ndarray]:
    with model.model.exportable(), torch.no_grad():
        return numpy_outputs(model(images))


def _images(batch: int) -> torch.Tensor:
    return torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def test_onnx_runtime_matches_eager(exported) -> None:
    model, onnx_path, _ = exported
    for batch in (1, 3):
        images = _images(batch)
        assert_export_parity(onnx_runtime_outputs(onnx_path, images), _eager(model, images))


def test_onnx_graph_holds_the_denoiser_once_per_pass_not_once_per_step(exported) -> None:
    """The DDIM loop exports as an ONNX ``Scan`` (one per MDPS pass): the UNet's convolutions
    appear once in each loop body, not once per step (three steps here), so exporting the
    CPU preset takes seconds instead of minutes.
    """
    import onnx

    model, onnx_path, _ = exported
    graph = onnx.load(onnx_path, load_external_data=False).graph
    scans = [node for node in graph.node if node.op_type == "Scan"]
    assert len(scans) == 2

    def convolutions(graph: onnx.GraphProto, functions: dict[str, onnx.FunctionProto]) -> int:
        count = 0
        for node in graph.node:
            count += node.op_type == "Conv"
            count += sum(convolutions(attribute.g, functions) for attribute in node.attribute if attribute.type == 5)
            if node.op_type in functions:
                count += sum(n.op_type == "Conv" for n in functions[node.op_type].node)
        return count

    functions = {function.name: function for function in onnx.load(onnx_path, load_external_data=False).functions}
    unet_convolutions = sum(isinstance(m, torch.nn.Conv2d) for m in model.model.prior.sampling_denoiser.modules())
    in_loops = sum(convolutions(attribute.g, functions) for node in scans for attribute in node.attribute if attribute.type == 5)
    assert in_loops == 2 * unet_convolutions


def test_openvino_matches_eager(exported) -> None:
    model, onnx_path, _ = exported
    images = _images(2)
    assert_export_parity(openvino_f32_outputs(onnx_path, images), _eager(model, images))


def test_torch_export_matches_eager_and_runs_under_inference_mode(exported) -> None:
    model, _, torch_path = exported
    loaded = torch.load(torch_path, weights_only=False)["model"]
    images = _images(2)
    with torch.inference_mode():
        output = loaded(images)
    assert_export_parity(numpy_outputs(output), _eager(model, images))


def test_export_leaves_the_model_on_dps_guidance(exported) -> None:
    model, _, _ = exported
    assert model.model.guidance.value == "dps"


@pytest.mark.parametrize("runtime", ["openvino", "torch"])
def test_predict_folder_writes_heatmaps_and_skips_corrupt_files(
    exported, tmp_path: Path, runtime: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from PIL import Image

    from anomalib_mdps.predict import predict_folder

    _, onnx_path, torch_path = exported
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(2):
        Image.fromarray((np.random.default_rng(index).random((48, 40, 3)) * 255).astype(np.uint8)).save(
            folder / f"part_{index}.png",
        )
    (folder / "broken.png").write_bytes(b"not an image")
    weights = onnx_path if runtime == "openvino" else torch_path
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # anomalib's opt-in for loading pickled torch exports
    failures = predict_folder(weights, folder, tmp_path / "out")
    assert [path.name for path, _ in failures] == ["broken.png"]
    assert "cannot read image" in failures[0][1]
    assert sorted(p.name for p in (tmp_path / "out").glob("*_heatmap.png")) == ["part_0_heatmap.png", "part_1_heatmap.png"]
    rows = (tmp_path / "out" / "scores.csv").read_text().splitlines()
    assert len(rows) == 3


def test_a_fusion_without_eq19_exports_without_the_sampling_loops(exported, tmp_path: Path) -> None:
    import copy

    import onnx

    model = copy.deepcopy(exported[0])
    model.model.fusion.copy_(torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.7, 0.3]]))
    onnx_path = model.to_onnx(tmp_path)
    assert not any(node.op_type == "Scan" for node in onnx.load(onnx_path, load_external_data=False).graph.node)
    images = _images(2)
    assert_export_parity(onnx_runtime_outputs(onnx_path, images), _eager(model, images))
