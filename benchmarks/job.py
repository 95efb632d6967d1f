"""One benchmark job: train and test one model on one dataset, in its own process, and measure it.

The model and datamodule are built inside the job's process from the profile's plain settings
(seeded before the model's random init), so its peak memory, glibc heap settings and a crash or
out-of-memory kill stay with that job. Per-model trainer settings reach anomalib's ``Engine``;
raw-score metrics, latency and peak memory are measured besides anomalib's test metrics.
"""

import contextlib
import ctypes
import importlib
import multiprocessing
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from anomalib.data import AnomalibDataModule, get_datamodule
from anomalib.engine import Engine
from anomalib.models import AnomalibModule, UnknownModelError, get_model
from anomalib.utils.config import flatten_dict
from lightning import seed_everything
from lightning.pytorch.trainer.states import TrainerFn

from .deployment import deployed_measurements
from .measurements import Measurements, complete_score_terms, peak_rss_mb, raw_metrics
from .offline_weights import load_offline_backbone_weights
from .profiles import Job

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_PR_SET_PDEATHSIG = 1  # Linux prctl option


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
    share = max(1, limit // labels.nunique())
    groups = labels.groupby(labels).groups.values()
    return sorted(i for g in groups for i in pd.Series(g).sample(n=min(share, len(g)), random_state=seed))


def build_datamodule(spec: dict[str, Any], model_data: dict[str, Any], seed: int) -> AnomalibDataModule:
    """The datamodule of a job spec, optionally subsampled (smoke runs)."""
    # Latency is measured per batch: evaluate one image at a time.
    init_args = {**spec["init_args"], **model_data, "eval_batch_size": 1}
    datamodule = get_datamodule({"class_path": spec["class_path"], "init_args": init_args})
    max_train, max_test = spec.get("max_train_images"), spec.get("max_test_images")
    if max_train or max_test:
        # Set up now, as the trainer would (it then keeps these subsets), and subsample.
        datamodule.setup(TrainerFn.FITTING)
        if max_train:
            datamodule.train_data.subsample(list(range(min(max_train, len(datamodule.train_data)))), inplace=True)
        subsets = [getattr(datamodule, name, None) for name in ("test_data", "val_data")] if max_test else []
        for data in (subset for subset in subsets if subset is not None):
            data.subsample(_stratified_indices(data.samples.label_index, max_test, seed), inplace=True)
    return datamodule


def run_job(job: Job) -> dict[str, Any]:
    """Train and test ``job``'s model in this process; one row of the results table."""
    job_start = time.perf_counter()
    job.directory.mkdir(parents=True, exist_ok=True)
    if job.model.get("malloc_mmap_threshold"):
        set_malloc_mmap_threshold(job.model["malloc_mmap_threshold"])
    if job.settings.get("torch_threads"):
        torch.set_num_threads(job.settings["torch_threads"])
    seed_everything(job.settings["seed"])
    model = build_model(job.model, job.directory)
    datamodule = build_datamodule(job.dataset, job.model["data"], job.settings["seed"])
    measured = Measurements(warmup_images=job.settings["warmup_images"])
    with tempfile.TemporaryDirectory(dir=job.directory) as engine_dir:
        engine = Engine(
            accelerator=job.settings["accelerator"],
            devices=1,
            default_root_dir=engine_dir,
            callbacks=[measured],
            **job.model["trainer"],
        )
        fit_start = time.perf_counter()
        engine.fit(model, datamodule)
        test_start = time.perf_counter()
        test_results = engine.test(model, datamodule)[0]
        test_end = time.perf_counter()
    complete_score_terms(model, datamodule, measured)
    deployed = deployed_latency(job, model, datamodule) if job.model["name"] in job.settings["deployed_latency"] else {}
    if job.model.get("keep_weights"):
        # For scripts that score the trained model again (``benchmarks.leave_one_out``), not for the table.
        torch.save({"state_dict": model.model.state_dict(), "image_size": tuple(model.model.image_size)},
                   job.directory / "model.pt")
    fit_seconds = test_start - fit_start
    labels = torch.cat(measured.labels)
    config = flatten_dict({"seed": job.settings["seed"], "model": job.model, "data": job.dataset})
    return {
        "model": job.model["name"],
        "dataset": job.dataset["name"],
        **raw_metrics(measured),
        **fit_time_choices(model),
        "image_F1Score": test_results.get("image_F1Score", float("nan")),
        "train_seconds": fit_seconds - measured.validation.seconds,
        "inference_ms_per_image": measured.latency.median_ms,
        **deployed,
        "peak_rss_mb": peak_rss_mb(),
        "fit_seconds": fit_seconds,
        "validation_seconds": measured.validation.seconds,
        "test_seconds": test_end - test_start,
        "job_seconds": time.perf_counter() - job_start,
        "train_images": len(datamodule.train_data),
        "test_images": len(labels),
        "anomalous_test_images": int(labels.sum()),
        "timed_images": len(measured.latency),
        "profile": job.settings["profile"],
        "accelerator": job.settings["accelerator"],
        "device": torch.cuda.get_device_name() if model.device.type == "cuda" else _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        # Timings on a shared machine depend on what else runs: record how busy it was.
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
        "finished_at": pd.Timestamp.now().isoformat(timespec="seconds"),
        # anomalib's own test metrics (after its post-processor), for comparison.
        **{f"anomalib_{name}": value for name, value in test_results.items()},
        **{f"config.{key}": _cell(value) for key, value in config.items()},
    }


def deployed_latency(job: Job, model: AnomalibModule, datamodule: AnomalibDataModule) -> dict[str, Any]:
    """The model exported to OpenVINO and timed on the test images (``deployment``); a model that
    does not export gets its error in the row instead, and the job goes on.
    """
    if job.settings["accelerator"] != "cpu":
        return {}
    try:
        with tempfile.TemporaryDirectory(dir=job.directory) as export_root:
            return deployed_measurements(model, datamodule, job.settings["warmup_images"], Path(export_root))
    except Exception as error:  # noqa: BLE001  # a model that cannot be deployed is a result too
        traceback.print_exc()
        return {"deployed_error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}


def fit_time_choices(model: AnomalibModule) -> dict[str, float]:
    """What a model chose on its own selection split while it trained (Mdps: the score fusion)."""
    report = getattr(model.model, "fusion_report", None)
    return report() if callable(report) else {}


def _die_with_parent(parent_pid: int) -> None:
    # A job must not outlive its command: a test's timeout, say, kills only the command's
    # process, and the job would go on computing for nobody.
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _run_job_here(job: Job, parent_pid: int) -> tuple[bool, Any]:
    """Body of the job's process: its output to the job's log, errors returned as text."""
    _die_with_parent(parent_pid)
    job.directory.mkdir(parents=True, exist_ok=True)
    log = (job.directory / "job.log").open("w", encoding="utf-8")
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)  # also catches output of C extensions and Lightning's progress bars
    os.dup2(log.fileno(), 2)
    try:
        return True, run_job(job)
    except BaseException:  # noqa: BLE001  anything, so the parent can show it
        error = traceback.format_exc()
        print(error, file=sys.stderr, flush=True)
        return False, error


def run_in_own_process(job: Job) -> tuple[bool, Any]:
    """``(True, row)`` or ``(False, error text)``; the job runs in a fresh process."""
    # fork: a job starts in milliseconds with everything already imported (spawn would re-import
    # torch and anomalib for every job). The parent never runs torch ops or touches CUDA, so
    # forking it is safe.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            return pool.submit(_run_job_here, job, os.getpid()).result()
        except Exception as error:  # noqa: BLE001  the process died (killed, out of memory, crash)
            return False, f"The job's process ended abnormally: {error!r}"


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
