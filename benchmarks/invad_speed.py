"""Milliseconds per image of a trained InvAD at batch 1, after warm-up.

``python benchmarks/invad_speed.py --ckpt PATH --images DIR`` times two paths over the same images:
``forward``, the exportable path on a decoded tensor (pre-processor, model, post-processor),
and ``file``, which also reads and decodes the image file. The machine's load average and the
process's own CPU time are printed with the wall-clock numbers, because other processes on a
shared CPU slow the wall clock down (with one thread, CPU time per image approximates the wall
time on an idle core).
"""

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _timed(function, inputs, warmup: int, runs: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU milliseconds of each run after ``warmup`` untimed runs."""
    for index in range(warmup):
        function(inputs[index % len(inputs)])
    wall, cpu = [], []
    for index in range(runs):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        function(inputs[index % len(inputs)])
        wall.append((time.perf_counter() - wall_start) * 1000)
        cpu.append((time.process_time() - cpu_start) * 1000)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint written by `anomalib train --model InvAD`")
    parser.add_argument("--images", required=True, type=Path, help="folder searched recursively for images")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    arguments = parser.parse_args()

    import torch
    from anomalib.data.utils import read_image

    from anomalib_mdps.models import InvAD
    from anomalib_mdps.predict import list_images

    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    model = InvAD.load_from_checkpoint(arguments.ckpt, map_location="cpu").eval()
    paths = list_images(arguments.images, recursive=True)
    if not paths:
        parser.error(f"no images under {arguments.images}")
    paths = paths[: max(arguments.runs, 1)]
    tensors = [read_image(path, as_tensor=True).unsqueeze(0) for path in paths]

    with torch.inference_mode():
        load_before = os.getloadavg()[0]
        forward = _timed(model, tensors, arguments.warmup, arguments.runs)
        from_file = _timed(lambda path: model(read_image(path, as_tensor=True).unsqueeze(0)), paths, 2, arguments.runs)
        load_after = os.getloadavg()[0]

    print(f"threads={torch.get_num_threads()} images={len(paths)} image_size={tuple(tensors[0].shape[-2:])}")
    print(f"1-min load average: {load_before:.2f} before, {load_after:.2f} after (machine has {os.cpu_count()} cores)")
    for name, (wall, cpu) in (("forward", forward), ("file", from_file)):
        median = statistics.median(wall)
        print(
            f"{name:>8}: median {median:.1f} ms/image ({1000 / median:.1f} images/s), "
            f"mean {statistics.fmean(wall):.1f}, min {min(wall):.1f}, max {max(wall):.1f}; "
            f"process CPU median {statistics.median(cpu):.1f} ms/image",
        )


if __name__ == "__main__":
    main()
