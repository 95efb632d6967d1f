"""``python -m benchmarks --profile cpu``: models × datasets through anomalib's benchmark pipeline.

Writes ``benchmarks/results/<profile>/results.csv``, ``results.md`` and
``auroc_vs_latency.png``, merging with the rows already there. Exits non-zero when any
job failed (after writing the rows of the jobs that succeeded).
"""

import argparse
import os
import sys
import time
from pathlib import Path

# Nothing may download at run time: make libraries that would try fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from anomalib_mdps.console import hide_library_import_warnings

from .profiles import PROFILES_DIR, ProfileError, load_profile, notes_for, parse_assignment, pipeline_arguments

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    profiles = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
    parser.add_argument("--profile", required=True, help=f"one of {profiles}, or a path to a profile YAML")
    parser.add_argument("--models", type=_names, help="comma-separated subset of the profile's models")
    parser.add_argument("--datasets", type=_names, help="comma-separated subset of the datasets")
    parser.add_argument(
        "--data-root",
        action="append",
        default=[],
        metavar="DATASET=PATH",
        help="override a dataset's root directory (repeatable)",
    )
    parser.add_argument(
        "--folder",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="add a Folder dataset: PATH/good (normal), PATH/<defect>/ (anomalous), optional PATH/mask/<defect>/",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        help="where results go (default: benchmarks/results/<profile>); existing results there are merged",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads per job (overrides the profile); on a busy shared CPU 1 thread is "
        "far faster than 2 that keep waiting for each other",
    )
    parser.add_argument("--list", action="store_true", help="print the jobs that would run, and exit")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: rewrite results.md and the plot from results.csv (e.g. after editing notes)",
    )
    return parser.parse_args(argv)


def rewrite_report(profile: dict, output_dir: Path) -> int:
    import pandas as pd

    from .report import RESULTS_CSV, write_reports

    if not (output_dir / RESULTS_CSV).is_file():
        print(f"error: no {RESULTS_CSV} in {output_dir}", file=sys.stderr)
        return 2
    write_reports(output_dir, pd.DataFrame(), profile, lambda names: notes_for(profile, names))
    print(f"Rewrote {output_dir / 'results.md'} and the plot from {RESULTS_CSV}")
    return 0


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_arguments(argv)
    hide_library_import_warnings()
    try:
        profile = load_profile(args.profile)
        output_dir = (args.output_dir or RESULTS_DIR / profile["name"]).resolve()
        if args.report_only:
            return rewrite_report(profile, output_dir)
        data_roots = dict(parse_assignment(item, "--data-root") for item in args.data_root)
        pipeline_args = pipeline_arguments(
            profile, args.models, args.datasets, data_roots, args.folder, output_dir, args.threads
        )
    except ProfileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    benchmark_args = pipeline_args["benchmark"]
    models = [spec["name"] for spec in benchmark_args["model"]["grid"]]
    datasets = [spec["name"] for spec in benchmark_args["data"]["grid"]]
    print(f"Profile {profile['name']}: models {models} × datasets {datasets} → {output_dir}", flush=True)
    if args.list:
        return 0

    # Heavy imports (torch, anomalib) only once the arguments are known to be valid.
    from .pipeline import SideBySideBenchmark
    from .report import write_reports
    from .runner import JobsFailedError

    failures = []
    try:
        results = SideBySideBenchmark().run(pipeline_args)
    except JobsFailedError as error:
        results, failures = error.results, error.failures
    if not results.empty:
        write_reports(output_dir, results, profile, lambda names: notes_for(profile, names))
        print(f"Results merged into {output_dir}", flush=True)
    print(f"Wall time: {time.perf_counter() - started:.0f} s", flush=True)
    if failures:
        print(f"\n{len(failures)} job(s) failed:", file=sys.stderr)
        for failure in failures:
            last_line = failure.error.strip().splitlines()[-1]
            print(f"- {failure.title}: {last_line} (full log: {failure.log_file})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
