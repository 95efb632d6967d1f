"""One benchmark job: train and test one model on one dataset, and measure it.

It extends anomalib's ``BenchmarkJob`` where that job falls short:
- the model and datamodule are built inside ``run`` (the job runs in its own process, so its
  peak memory is its own) from plain settings, seeded before the model's random init;
- per-model trainer settings (epochs, steps) reach the ``Engine``;
- raw-score metrics, latency and peak memory are measured besides anomalib's test metrics;
- ``collect`` accepts rows with different columns (models have different init args).
"""

import contextlib
import ctypes
import importlib
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from anomalib.data import AnomalibDataModule, get_datamodule
from anomalib.engine import Engine
from anomalib.models import AnomalibModule, UnknownModelError, get_model
from anomalib.pipelines.benchmark.job import BenchmarkJob
from lightning import seed_everything
from lightning.pytorch.trainer.states import TrainerFn

from .measurements import RawOutputRecorder, ValidationTimer, median_ms_per_image, peak_rss_mb, raw_metrics
from .offline_weights import load_offline_backbone_weights

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number

# The columns of the results table, in order; everything else in the csv is detail.
HEADLINE_COLUMNS = (
    "model",
    "dataset",
    "image_AUROC",
    "pixel_AUROC",
    "pixel_AUPRO",
    "image_F1Score",
    "train_seconds",
    "inference_ms_per_image",
    "peak_rss_mb",
)


def build_model(spec: dict[str, Any], job_dir: Path) -> AnomalibModule:
    """The model of a job spec: anomalib (or plugin) name, init args, offline backbone weights."""
    init_args = dict(spec["init_args"])
    for argument in spec["empty_dirs"]:
        # e.g. DRAEM's dtd_dir: an existing empty directory means "no texture images, use noise"
        # instead of downloading the DTD data set.
        empty = job_dir / f"empty_{argument}"
        empty.mkdir(parents=True, exist_ok=True)
        init_args[argument] = str(empty)
    class_path: str = spec["class_path"]
    try:
        # Bare names resolve in anomalib.models, where the plugin's startup hook puts its models.
        model = get_model(class_path.rsplit(".", 1)[-1], **init_args)
    except UnknownModelError:
        if "." not in class_path:
            raise
        # A third-party class not registered in anomalib.models: import it by its path.
        module_name, class_name = class_path.rsplit(".", 1)
        model = getattr(importlib.import_module(module_name), class_name)(**init_args)
    if "visualizer" not in init_args:
        # Result images cost time and disk and are not looked at here (a profile may ask for them).
        model.visualizer = None
    if spec.get("image_size"):
        # anomalib's models take their input size from the pre-processor, not an init arg.
        model.pre_processor = model.configure_pre_processor(image_size=tuple(spec["image_size"]))
    load_offline_backbone_weights(model)
    return model


def set_malloc_mmap_threshold(threshold_bytes: int) -> None:
    """Serve heap allocations above ``threshold_bytes`` by mmap in this process, as
    ``MALLOC_MMAP_THRESHOLD_`` would (glibc only; the environment variable, if set, wins).

    PatchCore's k-center-greedy loop fragments glibc's heap (an out-of-memory kill at 24 GB
    instead of a 1 GB peak, NOTES §6). Only the jobs that ask for it get it: it makes
    convolution-heavy training about 2.4x slower (every large activation is a fresh mapping).
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or platform.system() != "Linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold_bytes)


def _stratified_indices(labels: pd.Series, limit: int, seed: int) -> list[int]:
    """Up to ``limit`` positions, split evenly between normal and anomalous samples."""
    groups = [labels.index[labels == value] for value in sorted(labels.unique())]
    share = max(1, limit // len(groups))
    chosen: list[int] = []
    for group in groups:
        chosen.extend(pd.Series(group).sample(n=min(share, len(group)), random_state=seed).tolist())
    return sorted(chosen)


def build_datamodule(spec: dict[str, Any], model_data: dict[str, Any], seed: int) -> AnomalibDataModule:
    """The datamodule of a job spec, optionally subsampled (smoke runs)."""
    init_args = {**spec["init_args"], **model_data}
    # Latency is measured per test batch: evaluate one image at a time.
    init_args["eval_batch_size"] = 1
    datamodule = get_datamodule({"class_path": spec["class_path"], "init_args": init_args})
    max_train, max_test = spec.get("max_train_images"), spec.get("max_test_images")
    if max_train or max_test:
        # Set up now, as the trainer would (it then keeps these subsets), and subsample.
        datamodule.setup(TrainerFn.FITTING)
        if max_train:
            count = min(max_train, len(datamodule.train_data))
            datamodule.train_data.subsample(list(range(count)), inplace=True)
        if max_test:
            for subset in ("test_data", "val_data"):
                data = getattr(datamodule, subset, None)
                if data is not None:
                    data.subsample(_stratified_indices(data.samples.label_index, max_test, seed), inplace=True)
    return datamodule


class SideBySideJob(BenchmarkJob):
    """anomalib's benchmark job, built from settings and measuring more (see module docstring)."""

    def __init__(
        self,
        accelerator: str,
        seed: int,
        model_spec: dict[str, Any],
        data_spec: dict[str, Any],
        settings: dict[str, Any],
        flat_cfg: dict[str, Any],
    ) -> None:
        # No model/datamodule objects yet: they are built in run(), in the job's own process.
        super().__init__(accelerator=accelerator, model=None, datamodule=None, seed=seed, flat_cfg=flat_cfg)
        self.model_spec = model_spec
        self.data_spec = data_spec
        self.settings = settings

    @property
    def title(self) -> str:
        return f"{self.model_spec['name']} × {self.data_spec['name']}"

    @property
    def job_dir(self) -> Path:
        return Path(self.settings["runs_dir"]) / f"{self.model_spec['name']}-{self.data_spec['name']}"

    @property
    def log_file(self) -> Path:
        return self.job_dir / "job.log"

    def run(self, task_id: int | None = None) -> dict[str, Any]:
        del task_id  # jobs run one at a time, each on the profile's accelerator
        job_start = time.perf_counter()
        self.job_dir.mkdir(parents=True, exist_ok=True)
        if self.model_spec.get("malloc_mmap_threshold"):
            set_malloc_mmap_threshold(self.model_spec["malloc_mmap_threshold"])
        if self.settings.get("torch_threads"):
            torch.set_num_threads(self.settings["torch_threads"])
        seed_everything(self.seed)
        self.model = build_model(self.model_spec, self.job_dir)
        self.datamodule = build_datamodule(self.data_spec, self.model_spec["data"], self.seed)
        validation = ValidationTimer(warmup_images=self.settings["warmup_images"])
        recorder = RawOutputRecorder(warmup_images=self.settings["warmup_images"])
        with tempfile.TemporaryDirectory(dir=self.job_dir) as engine_dir:
            engine = Engine(
                accelerator=self.accelerator,
                devices=1,
                default_root_dir=engine_dir,
                callbacks=[validation, recorder],
                **self.model_spec["trainer"],
            )
            fit_start = time.perf_counter()
            engine.fit(self.model, self.datamodule)
            test_start = time.perf_counter()
            test_results = engine.test(self.model, self.datamodule)
            test_end = time.perf_counter()
        fit_seconds = test_start - fit_start
        labels = torch.cat(recorder.labels)
        latency_ms, timed_images = median_ms_per_image(validation, recorder)
        return {
            "model": self.model_spec["name"],
            "dataset": self.data_spec["name"],
            **raw_metrics(recorder),
            "image_F1Score": test_results[0].get("image_F1Score", float("nan")),
            "train_seconds": fit_seconds - validation.seconds,
            "inference_ms_per_image": latency_ms,
            "peak_rss_mb": peak_rss_mb(),
            "fit_seconds": fit_seconds,
            "validation_seconds": validation.seconds,
            "test_seconds": test_end - test_start,
            "job_seconds": time.perf_counter() - job_start,
            "train_images": len(self.datamodule.train_data),
            "test_images": len(labels),
            "anomalous_test_images": int(labels.sum()),
            "timed_images": timed_images,
            "profile": self.settings["profile"],
            "accelerator": self.accelerator,
            "device": torch.cuda.get_device_name() if self.model.device.type == "cuda" else _cpu_name(),
            "torch_threads": torch.get_num_threads(),
            # Timings on a shared machine depend on what else runs: record how busy it was.
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
            "finished_at": pd.Timestamp.now().isoformat(timespec="seconds"),
            # anomalib's own test metrics (after its post-processor), for comparison.
            **{f"anomalib_{name}": value for name, value in test_results[0].items()},
            **{f"config.{key}": _cell(value) for key, value in self.flat_cfg.items()},
        }

    @staticmethod
    def collect(results: list[dict[str, Any]]) -> pd.DataFrame:
        """One row per job; columns are the union over jobs (upstream raises KeyError instead)."""
        return pd.DataFrame(results)

    @staticmethod
    def save(result: pd.DataFrame) -> None:
        """Print this run's table; the files are written by the command (they merge runs)."""
        if not result.empty:
            BenchmarkJob._print_tabular_results(result[[c for c in HEADLINE_COLUMNS if c in result]].round(3))


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cell(value: Any) -> Any:
    # Lists (layers, channel widths) would otherwise become ragged csv cells.
    return str(value) if isinstance(value, list | tuple | dict) else value
