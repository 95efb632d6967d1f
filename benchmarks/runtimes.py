"""Export a trained plugin model and score a test set in each runtime: accuracy, speed, export time.

``python -m benchmarks.runtimes --model Mdps --ckpt PATH [--dataset bottle] [--output DIR]``, or
``--weights benchmarks/results/cpu/runs/Mdps-tire/model.pt --dataset tire`` for the weights a cpu-profile
run kept (its preset's settings, the tensors it trained, chose and calibrated).

Runs the dataset's whole test set (from the cpu profile's dataset list) at batch 1 through eager
torch (the exportable variant; for Mdps, guidance without autograd) as it is, with channels-last
weights, under bf16 autocast and with the denoiser compiled by ``torch.compile``; then through
ONNX Runtime, OpenVINO at f32 and at its default precision (bf16 on CPUs that support it), and
OpenVINO INT8 from NNCF post-training quantisation on training images; and eager torch from the
image file (reading and decoding included, as a user's loop pays it). The other rows get images
already resized by the pre-processor's training transform (antialiased); the from-file row resizes
inside the model as exported models do (anomalib's export transform: no antialiasing), so its
AUROC can differ a little. Per row: image and pixel
AUROC on raw scores (anomalib's metric, cross-checked by scikit-learn), median wall-clock and
process-CPU ms/image at batch 1 after warm-up, ms/image at batch 8, and the seconds its export
(or compilation) took. Writes ``<output>/<model>_runtimes.{csv,md}`` and prints the table.
"""

import argparse
import csv
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.deployment import F32, export_openvino, openvino_runner  # noqa: E402
from benchmarks.profiles import cpu_profile_datamodule, model_from_kept_weights  # noqa: E402
from benchmarks.timing import PerImageTimes  # noqa: E402

WARMUP_IMAGES = 2
QUANTISATION_IMAGES = 16
BATCH_8_RUNS = 3


def _batch_ms(run: Callable, images: list) -> float:
    """Median ms/image of ``run`` on batches of 8 images, after one warm-up batch."""
    import torch

    batches = [torch.cat(images[i : i + 8]) for i in range(0, len(images) - 7, 8)][: BATCH_8_RUNS + 1]
    times = PerImageTimes(warmup_images=8)
    for batch in batches:
        times.call(run, batch, images=len(batch))
    return times.median_ms


def _score(run: Callable, batches: list) -> tuple[dict[str, float], PerImageTimes]:
    """Image and pixel AUROC of ``run`` (input → score, map) over ``batches``, and its timings."""
    import torch
    from torch.nn import functional as F  # noqa: N812

    from benchmarks.measurements import auroc

    times = PerImageTimes(WARMUP_IMAGES)
    scores, labels, maps, masks = [], [], [], []
    for model_input, label, mask in batches:
        score, anomaly_map = times.call(run, model_input)
        scores.append(torch.as_tensor(score).reshape(-1).double())
        labels.append(label)
        # Pixel metrics at the mask's resolution, every second pixel (the ablation's convention).
        anomaly_map = torch.as_tensor(anomaly_map).reshape(1, 1, *anomaly_map.shape[-2:]).float()
        maps.append(F.interpolate(anomaly_map, size=mask.shape[-2:], mode="bilinear")[..., ::2, ::2].flatten())
        masks.append(mask[..., ::2, ::2].flatten())
    image_auroc, _ = auroc(torch.cat(scores), torch.cat(labels).int(), "image")
    pixel_auroc, _ = auroc(torch.cat(maps), torch.cat(masks).int(), "pixel")
    return {"image_AUROC": image_auroc, "pixel_AUROC": pixel_auroc}, times


def _write_profile(model, images: list, target: Path) -> None:  # noqa: ANN001
    """torch.profiler's summary of one image end to end (eager, batch 1, after a warm-up image),
    with the denoiser's and the backbone's calls labelled, so that their share shows.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    parts = {"denoiser (UNet)": model.model.prior.sampling_denoiser}
    if hasattr(model.model, "feature_extractor"):
        parts["backbone (features)"] = model.model.feature_extractor
    hooks = []
    for label, module in parts.items():
        ranges: list = []
        hooks.append(module.register_forward_pre_hook(lambda *_, r=ranges, n=label: r.append(record_function(n).__enter__())))
        hooks.append(module.register_forward_hook(lambda *_, r=ranges: r.pop().__exit__(None, None, None)))
    model(images[0])
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        model(images[1])
    for hook in hooks:
        hook.remove()
    table = profiler.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=40)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        f"# Profile of one image: eager torch, batch 1, {torch.get_num_threads()} threads\n\n"
        f"`python -m benchmarks.runtimes` (first step). Sorted by total CPU time (children included).\n\n"
        f"```\n{table}\n```\n",
    )
    print(table, flush=True)


@contextmanager
def _eager_variant(model, variant: str) -> Iterator[float]:  # noqa: ANN001
    """``model`` set up as ``variant`` for the duration; yields the seconds the set-up took."""
    import torch

    denoiser_owner = model.model.prior.ema_denoiser
    original = denoiser_owner.module
    networks = [original, *([model.model.feature_extractor] if hasattr(model.model, "feature_extractor") else [])]
    start = time.perf_counter()
    if variant == "channels-last":
        for network in networks:
            network.to(memory_format=torch.channels_last)
    elif variant == "torch.compile":
        denoiser_owner.module = torch.compile(original)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16 autocast"):
        yield time.perf_counter() - start
    denoiser_owner.module = original
    for network in networks:
        network.to(memory_format=torch.contiguous_format)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=["Mdps", "InvAD", "Glad"])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", type=Path, help="a Lightning checkpoint")
    source.add_argument("--weights", type=Path, help="model.pt of a cpu-profile job (keep_weights)")
    parser.add_argument("--dataset", default="bottle", help="a dataset of the cpu profile")
    parser.add_argument("--skip", nargs="*", default=[], help="leave out rows whose name contains one of these")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, help="default: benchmarks/results/runtimes/<dataset>")
    arguments = parser.parse_args()
    arguments.output = arguments.output or Path("benchmarks/results/runtimes") / arguments.dataset

    import onnxruntime
    import openvino
    import torch

    from anomalib.data.utils import read_image

    from anomalib_mdps import models

    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    if arguments.ckpt:
        model = getattr(models, arguments.model).load_from_checkpoint(arguments.ckpt, map_location="cpu").eval()
    else:
        model = model_from_kept_weights(arguments.model, arguments.weights).eval()
    resize = model.pre_processor.transform
    module = cpu_profile_datamodule(arguments.dataset, train_batch_size=1, eval_batch_size=1)
    test_batches = list(module.test_dataloader())
    batches = [(resize(b.image), b.gt_label, b.gt_mask.bool()) for b in test_batches]
    files = [(b.image_path[0], b.gt_label, b.gt_mask.bool()) for b in test_batches]
    images = [image for image, _, _ in batches]
    export_root = Path(tempfile.mkdtemp(prefix=f"{arguments.model}_export_"))  # model files stay out of the repo
    rows: list[tuple[str, float | None, dict[str, float], PerImageTimes, float | None]] = []
    failures: list[str] = []

    def add(name: str, setup_seconds: float | None, run: Callable, inputs: list | None = None) -> None:
        if any(word in name for word in arguments.skip):
            return
        try:
            # The first call of a compiled model compiles it: its set-up, not its latency.
            if name.endswith("torch.compile"):
                start = time.perf_counter()
                run(images[0])
                setup_seconds += time.perf_counter() - start
            metrics, times = _score(run, inputs or batches)
            rows.append((name, setup_seconds, metrics, times, None if inputs else _batch_ms(run, images)))
        except Exception as error:  # noqa: BLE001  # a runtime that cannot run this model is a result too
            failures.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
            print(failures[-1], flush=True)
            return
        batch_8 = "" if rows[-1][-1] is None else f", {rows[-1][-1]:.0f} at batch 8"
        print(f"{name}: {metrics} {times.median_ms:.0f} ms/image at batch 1{batch_8}", flush=True)

    def eager(image: torch.Tensor) -> tuple:
        output = model(image)
        return output.pred_score.float(), output.anomaly_map.float()

    with torch.no_grad(), getattr(model.model, "exportable", nullcontext)():
        _write_profile(model, images, arguments.output / f"{arguments.model}_profile.md")
        for variant in ("f32", "channels-last", "bf16 autocast", "torch.compile"):
            with _eager_variant(model, variant) as setup_seconds:
                add(f"eager torch, {variant}", setup_seconds if variant == "torch.compile" else None, eager)
        # What a user's loop pays per image: reading and decoding the file, pre-processing, the model.
        add("eager torch, f32, from the image file", None,
            lambda path: eager(read_image(path, as_tensor=True).unsqueeze(0)), files)

    onnx_path, onnx_seconds, xml_path, openvino_seconds = export_openvino(model, export_root)
    runtime = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [output.name for output in runtime.get_outputs()]

    def onnx_runtime(image: torch.Tensor) -> tuple:
        outputs = dict(zip(names, runtime.run(None, {"input": image.numpy()}), strict=True))
        return outputs["pred_score"], outputs["anomaly_map"]

    add("ONNX Runtime", onnx_seconds, onnx_runtime)
    core = openvino.Core()
    for precision, config in (("f32", F32), ("default", {})):
        compiled = core.compile_model(xml_path, "CPU", config)
        add(f"OpenVINO, {precision} precision", openvino_seconds, openvino_runner(compiled))
    if not any(word in "OpenVINO INT8" for word in arguments.skip):
        import nncf

        start = time.perf_counter()
        calibration = [resize(b.image).numpy() for b, _ in zip(module.train_dataloader(), range(QUANTISATION_IMAGES))]
        quantised = nncf.quantize(core.read_model(xml_path), nncf.Dataset(calibration),
                                  subset_size=len(calibration))
        int8_seconds = openvino_seconds + time.perf_counter() - start
        add("OpenVINO INT8 (NNCF post-training)", int8_seconds, openvino_runner(core.compile_model(quantised, "CPU")))

    arguments.output.mkdir(parents=True, exist_ok=True)
    header = (
        f"{arguments.model} from {(arguments.ckpt or arguments.weights).name} on the {arguments.dataset} test set ({len(batches)} images; "
        f"batch 1: median over images after {WARMUP_IMAGES} warm-up; batch 8: median of {BATCH_8_RUNS} batches "
        f"after one), torch threads {torch.get_num_threads()}, 1-min load {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores. Export s: ONNX export (+ conversion, + quantisation) or compilation. "
        "CPU ms: the process's CPU time per image at batch 1 (all threads; unlike the wall clock, "
        "not slowed down by other processes)."
    )
    columns = ["runtime", "export_seconds", "image_AUROC", "pixel_AUROC", "ms_per_image_batch_1",
               "cpu_ms_per_image_batch_1", "ms_per_image_batch_8"]
    cells = [
        [name, f"{s:.1f}" if s else "–", f"{m['image_AUROC']:.4f}", f"{m['pixel_AUROC']:.4f}",
         f"{times.median_ms:.0f}", f"{times.median_cpu_ms:.0f}", "–" if ms8 is None else f"{ms8:.0f}"]
        for name, s, m, times, ms8 in rows
    ]
    with (arguments.output / f"{arguments.model}_runtimes.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([columns, *cells])
    command = "python -m benchmarks.runtimes " + " ".join(sys.argv[1:])
    lines = [f"# Runtimes: {header}", "", f"Command: `{command}`", "",
             "| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    lines += ["", *(f"Failed: {failure}" for failure in failures)] if failures else []
    (arguments.output / f"{arguments.model}_runtimes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
