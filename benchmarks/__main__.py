"""``python -m benchmarks --profile cpu``: models × datasets, each job in its own process.

A plain loop (``benchmarks/README.md`` says why not anomalib's ``Benchmark`` pipeline): profile →
jobs → each job trained and tested in a fresh process → rows → ``results/<profile>/results.csv``,
``results.md`` and two plots, merged with the rows already there as each job finishes. Exits
non-zero when any job failed; the rows of the jobs that succeeded are kept.
"""

import argparse
import os
import sys
import time
from pathlib import Path

# Nothing may download at run time: make libraries that would try fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from anomalib_mdps.console import hide_library_import_warnings

from .profiles import PROFILES_DIR, ProfileError, load_profile, notes_for, parse_assignment, plan_jobs

RESULTS_DIR = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parents[1] / "README.md"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    names = lambda text: [name.strip() for name in text.split(",") if name.strip()]  # noqa: E731
    profiles = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
    parser.add_argument("--profile", required=True, help=f"one of {profiles}, or a path to a profile YAML")
    parser.add_argument("--models", type=names, help="comma-separated subset of the profile's models")
    parser.add_argument("--datasets", type=names, help="comma-separated subset of the datasets")
    parser.add_argument("--data-root", action="append", default=[], metavar="DATASET=PATH",
                        help="override a dataset's root directory (repeatable)")
    parser.add_argument("--folder", action="append", default=[], metavar="[NAME=]PATH",
                        help="add a Folder dataset: PATH/good (normal), PATH/<defect>/ (anomalous), "
                        "optional PATH/mask/<defect>/")
    parser.add_argument("--output-dir", type=Path,
                        help="where results go (default: benchmarks/results/<profile>); existing results are merged")
    parser.add_argument("--threads", type=int, help="torch threads per job (overrides the profile); on a busy "
                        "shared CPU 1 thread is far faster than 2 that keep waiting for each other")
    parser.add_argument("--list", action="store_true", help="print the jobs that would run, and exit")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rewrite results.md and the plots from results.csv (after editing notes)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_arguments(argv)
    hide_library_import_warnings()
    try:
        profile = load_profile(args.profile)
        output_dir = (args.output_dir or RESULTS_DIR / profile["name"]).resolve()
        data_roots = dict(parse_assignment(item, "--data-root") for item in args.data_root)
        jobs = plan_jobs(profile, args.models, args.datasets, data_roots, args.folder, output_dir, args.threads)
    except ProfileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # Heavy imports (torch, anomalib) only once the arguments are known to be valid.
    import pandas as pd

    from .report import RESULTS_CSV, markdown_table, update_readme, write_reports

    notes = lambda names: notes_for(profile, names)  # noqa: E731
    if args.report_only:
        if not (output_dir / RESULTS_CSV).is_file():
            print(f"error: no {RESULTS_CSV} in {output_dir}", file=sys.stderr)
            return 2
        merged = write_reports(output_dir, pd.DataFrame(), profile, notes)
        print(f"Rewrote {output_dir / 'results.md'} and the plots from {RESULTS_CSV}")
        if output_dir == (RESULTS_DIR / profile["name"]).resolve() and update_readme(README, profile["name"], merged):
            print(f"Rewrote the {profile['name']} table in {README}")
        return 0
    models = list(dict.fromkeys(job.model["name"] for job in jobs))
    datasets = list(dict.fromkeys(job.dataset["name"] for job in jobs))
    print(f"Profile {profile['name']}: models {models} × datasets {datasets} → {output_dir}", flush=True)
    if args.list:
        return 0

    from .job import run_in_own_process

    rows, failures = [], []
    for number, job in enumerate(jobs, start=1):
        prefix = f"[{number}/{len(jobs)}] {job.title}"
        print(f"{prefix}: running (log: {job.directory / 'job.log'})", flush=True)
        job_started = time.perf_counter()
        succeeded, outcome = run_in_own_process(job)
        seconds = time.perf_counter() - job_started
        if succeeded:
            rows.append(outcome)
            # Merged at once, so that the rows of finished jobs survive a later crash or Ctrl-C.
            write_reports(output_dir, pd.DataFrame([outcome]), profile, notes)
            print(f"{prefix}: done in {seconds:.0f} s, image AUROC {outcome['image_AUROC']:.3f}, "
                  f"{outcome['inference_ms_per_image']:.1f} ms/image", flush=True)
        else:
            failures.append((job, outcome))
            print(f"{prefix}: FAILED after {seconds:.0f} s\n{outcome}", file=sys.stderr, flush=True)
    if rows:
        print(markdown_table(pd.DataFrame(rows)), flush=True)
        print(f"Results merged into {output_dir}", flush=True)
        # The README's table follows the committed results of its profile, not runs written elsewhere.
        if output_dir == (RESULTS_DIR / profile["name"]).resolve():
            update_readme(README, profile["name"], pd.read_csv(output_dir / RESULTS_CSV))
    print(f"Wall time: {time.perf_counter() - started:.0f} s", flush=True)
    for job, error in failures:
        last_line = error.strip().splitlines()[-1]
        print(f"FAILED {job.title}: {last_line} (log: {job.directory / 'job.log'})", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
