"""Run each benchmark job in its own process, one after the other, and report failures.

Like anomalib's ``SerialRunner``, with three differences:
- each job runs in a fresh (forked) process, so peak memory is the job's own, glibc's heap
  settings (``malloc_mmap_threshold``, see ``job.py``) and a crash or out-of-memory kill stay
  with that job;
- a job's output (progress bars, warnings) goes to its ``job.log``; the console gets one
  line per job and, for a failed job, the error with its traceback;
- failures are raised to the caller together with the rows of the jobs that succeeded.
"""

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import pandas as pd
from anomalib.pipelines.components.runners import SerialRunner
from anomalib.pipelines.types import PREV_STAGE_RESULT

_PR_SET_PDEATHSIG = 1  # Linux prctl option


@dataclass
class JobFailure:
    title: str
    error: str
    log_file: str


class JobsFailedError(RuntimeError):
    """Some jobs failed; ``results`` holds the rows of those that did not."""

    def __init__(self, failures: list[JobFailure], results: pd.DataFrame) -> None:
        self.failures = failures
        self.results = results
        super().__init__(f"{len(failures)} benchmark job(s) failed: {', '.join(f.title for f in failures)}")


def _die_with_parent(parent_pid: int) -> None:
    # A job must not outlive its command: a test's timeout, say, kills only the command's
    # process, and the job would go on computing for nobody.
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _run_job_here(job: Any, parent_pid: int) -> tuple[bool, Any]:
    """Body of the job process: output to the job's log, errors returned as text."""
    _die_with_parent(parent_pid)
    job.log_file.parent.mkdir(parents=True, exist_ok=True)
    log = job.log_file.open("w", encoding="utf-8")
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)  # also catches output of C extensions and Lightning's progress bars
    os.dup2(log.fileno(), 2)
    try:
        return True, job.run()
    except BaseException:  # noqa: BLE001  anything, so the parent can show it
        error = traceback.format_exc()
        print(error, file=sys.stderr, flush=True)
        return False, error


def _process_context() -> multiprocessing.context.BaseContext:
    # fork: a job starts in milliseconds with everything already imported (spawn would re-import
    # torch and anomalib for every job). The parent never runs torch ops or touches CUDA, so
    # forking it is safe.
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def run_in_own_process(job: Any) -> tuple[bool, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=_process_context()) as pool:
        try:
            return pool.submit(_run_job_here, job, os.getpid()).result()
        except Exception as error:  # noqa: BLE001  the process died (killed, out of memory, crash)
            return False, f"The job's process ended abnormally: {error!r}"


class IsolatedSerialRunner(SerialRunner):
    """``SerialRunner`` with one process per job (see module docstring)."""

    def run(self, args: dict, prev_stage_results: PREV_STAGE_RESULT = None) -> pd.DataFrame:
        jobs = list(self.generator(args, prev_stage_results))
        results: list[dict[str, Any]] = []
        failures: list[JobFailure] = []
        for number, job in enumerate(jobs, start=1):
            print(f"[{number}/{len(jobs)}] {job.title}: running (log: {job.log_file})", flush=True)
            started = time.perf_counter()
            succeeded, outcome = run_in_own_process(job)
            seconds = time.perf_counter() - started
            if succeeded:
                results.append(outcome)
                print(
                    f"[{number}/{len(jobs)}] {job.title}: done in {seconds:.0f} s, "
                    f"image AUROC {outcome['image_AUROC']:.3f}, {outcome['inference_ms_per_image']:.1f} ms/image",
                    flush=True,
                )
            else:
                failures.append(JobFailure(job.title, outcome, str(job.log_file)))
                print(
                    f"[{number}/{len(jobs)}] {job.title}: FAILED after {seconds:.0f} s\n{outcome}",
                    file=sys.stderr,
                    flush=True,
                )
        gathered = self.generator.job_class.collect(results)
        self.generator.job_class.save(gathered)
        if failures:
            raise JobsFailedError(failures, gathered)
        return gathered
