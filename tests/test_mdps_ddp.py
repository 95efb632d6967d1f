"""Multi-process training: the smoke preset under Lightning DDP (gloo, 2 CPU processes) from the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from anomalib.cli import AnomalibCLI

from anomalib_mdps.presets import preset_path
from conftest import cli_metrics

SMOKE = str(preset_path("mdps_smoke"))
METRICS = ("image_AUROC", "pixel_AUROC")


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_ddp_training_agrees_across_ranks_and_with_a_single_process_test(mvtec_root: Path, tmp_path: Path) -> None:
    ranks = tmp_path / "ranks"
    command = [
        sys.executable, "-m", "anomalib.cli.cli", "train", "--config", SMOKE,
        "--data.root", str(mvtec_root), "--default_root_dir", str(tmp_path / "ddp"),
        "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2",
        "--trainer.callbacks+=ddp_probe.RankStateDump", "--trainer.callbacks.directory", str(ranks),
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    first, second = (torch.load(ranks / f"rank{rank}.pt", weights_only=True) for rank in (0, 1))
    assert first["world_size"] == second["world_size"] == 2
    assert first["ema"].keys() == second["ema"].keys()
    for name in first["ema"]:
        torch.testing.assert_close(first["ema"][name], second["ema"][name], rtol=0, atol=0, msg=name)
    # The feature terms and the fusion chosen on the selection split: the same on both ranks.
    assert first["patch_memory"].numel() > 0
    for name in ("noise", "term_scale", "normal_mask_threshold", "density_mean", "density_scale", "patch_memory",
                 "fusion"):
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0, msg=name)

    checkpoints = sorted((tmp_path / "ddp").rglob("*.ckpt"))
    assert checkpoints, "DDP training saved no checkpoint"
    single = cli_metrics(AnomalibCLI([
        "test", "--config", SMOKE, "--data.root", str(mvtec_root), "--default_root_dir", str(tmp_path / "single"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--ckpt_path", str(checkpoints[-1]),
    ]))
    for name in METRICS:
        # DistributedSampler pads bottle's 83 test images to 84 by repeating one; a repeated image
        # moves an AUROC by at most 1/(20 + 1) (bottle has 20 good and 63 defective test images).
        assert first["metrics"][name] == pytest.approx(single[name], abs=1 / 21), name

