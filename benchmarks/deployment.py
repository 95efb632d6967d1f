"""A trained model exported and run where a production line runs it: ONNX, then OpenVINO.

``runtimes`` compares every runtime on one model; a profile job (``deployed_latency: true``) times
the one that ``anomalib-mdps-predict`` runs by default, OpenVINO at f32, on the job's test images,
so that the side-by-side table answers "how fast once deployed" for every model of the run.
"""

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .measurements import auroc
from .timing import PerImageTimes

# What ``anomalib-mdps-predict`` runs by default (bf16, OpenVINO's default on CPUs that have it,
# moved Mdps's bottle AUROC by 0.2 in the runtime tables).
DEPLOYED_RUNTIME = "OpenVINO f32"
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def input_size(model: Any) -> tuple[int, int] | None:  # noqa: ANN401
    """The size images enter the graph at: Mdps's ``full_size``, another plugin model's ``input_size``,
    else ``None`` (anomalib's models: the size the pre-processor gives)."""
    size = getattr(model.model, "full_size", None) or getattr(model.model, "input_size", None)
    return tuple(int(v) for v in size) if size is not None else None


def export_openvino(model: Any, root: Path, **onnx_arguments: Any) -> tuple[Path, float, Path, float]:  # noqa: ANN401
    """The ONNX file and its export seconds, the OpenVINO model and the seconds of both steps."""
    import openvino

    start = time.perf_counter()
    onnx_arguments.setdefault("input_size", input_size(model))
    onnx_path = model.to_onnx(root, **onnx_arguments)
    onnx_seconds = time.perf_counter() - start
    openvino.save_model(openvino.convert_model(onnx_path), root / "model.xml")
    return onnx_path, onnx_seconds, root / "model.xml", time.perf_counter() - start


def openvino_runner(compiled: Any) -> Callable[[torch.Tensor], tuple[Any, Any]]:  # noqa: ANN401
    """A compiled OpenVINO model as image batch → (pred_score, anomaly_map)."""
    import numpy as np

    def run(images: torch.Tensor) -> tuple[Any, Any]:
        outputs = {port.get_any_name(): value for port, value in compiled(np.asarray(images)).items()}
        return outputs["pred_score"], outputs["anomaly_map"]

    return run


@torch.no_grad()
def deployed_measurements(model: Any, datamodule: Any, warmup_images: int, root: Path) -> dict[str, Any]:  # noqa: ANN401
    """Export ``model`` to OpenVINO f32 and score the datamodule's test images with it one at a time:
    median ms per image after warm-up (the graph's pre-processing included, as in the eager column),
    image and pixel AUROC on raw outputs (for parity with eager), and the export seconds.
    """
    import openvino
    from torch.nn import functional as F  # noqa: N812

    model.eval()
    _, _, xml_path, export_seconds = export_openvino(model, root)
    compiled = openvino.Core().compile_model(xml_path, "CPU", F32)
    runtime = DEPLOYED_RUNTIME
    if not compiled.input(0).get_partial_shape()[0].compatible(openvino.Dimension(1)):
        # anomalib's PatchCore graph keeps the batch of its export example (2): export it at batch 1.
        size = tuple(next(iter(datamodule.test_dataloader())).image.shape[-2:])
        _, _, xml_path, export_seconds = export_openvino(model, root / "batch_1", input_size=size, dynamic_shapes=None)
        compiled, runtime = openvino.Core().compile_model(xml_path, "CPU", F32), f"{DEPLOYED_RUNTIME}, batch 1 only"
    run = openvino_runner(compiled)
    times = PerImageTimes(warmup_images)
    scores, labels, maps, masks = [], [], [], []
    for batch in datamodule.test_dataloader():
        for image, label, mask in zip(batch.image, batch.gt_label, batch.gt_mask, strict=True):
            times.start()
            # As the datamodule gives it: the exported graph holds the pre-processor (anomalib's models
            # normalise there, and a second pass through the transform would normalise twice).
            score, anomaly_map = run(image.unsqueeze(0))
            times.stop()
            scores.append(torch.as_tensor(score).reshape(-1).double())
            labels.append(label.reshape(-1))
            anomaly_map = torch.as_tensor(anomaly_map).reshape(1, 1, *anomaly_map.shape[-2:]).float()
            maps.append(F.interpolate(anomaly_map, size=mask.shape[-2:], mode="bilinear").flatten())
            masks.append(mask.flatten())
    image_auroc, _ = auroc(torch.cat(scores), torch.cat(labels).int(), "deployed image")
    pixel_auroc, _ = auroc(torch.cat(maps), torch.cat(masks).int(), "deployed pixel")
    return {
        "deployed_runtime": runtime,
        "deployed_ms_per_image": times.median_ms,
        "deployed_image_AUROC": image_auroc,
        "deployed_pixel_AUROC": pixel_auroc,
        "export_seconds": export_seconds,
    }
