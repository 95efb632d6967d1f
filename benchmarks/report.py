"""The result files of a profile: ``results.csv`` (all columns), ``results.md`` and two plots.

Runs merge: rows of a new run replace the rows with the same model and dataset, other rows
stay. So baselines and the plugin's models can be measured in separate runs and still form one table.
"""

import math
from pathlib import Path

import pandas as pd

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
PLOT_PNG = "auroc_vs_latency.png"
PIXEL_PLOT_PNG = "pixel_auroc_vs_latency.png"

# How far a deployed model may score from eager torch before the report says so (the runtime targets).
DEPLOYED_IMAGE_TOLERANCE = 0.005
DEPLOYED_PIXEL_TOLERANCE = 0.01

# (csv column, markdown header, format)
TABLE_COLUMNS = (
    ("model", "model", "{}"),
    ("dataset", "dataset", "{}"),
    ("image_AUROC", "image AUROC", "{:.3f}"),
    ("image_AUROC_eq18", "image AUROC, D̄ alone", "{:.3f}"),
    ("image_AUROC_density", "density alone", "{:.3f}"),
    ("image_AUROC_memory", "memory alone", "{:.3f}"),
    ("pixel_AUROC", "pixel AUROC", "{:.3f}"),
    ("pixel_AUPRO", "AUPRO (FPR ≤ 0.3)", "{:.3f}"),
    ("image_F1Score", "image F1", "{:.3f}"),
    ("train_seconds", "train s", "{:.0f}"),
    ("inference_ms_per_image", "inference ms/image", "{:.1f}"),
    ("deployed_ms_per_image", "deployed ms/image", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
)
EXPLANATIONS = """\
- AUROC and AUPRO are computed on raw model scores (before anomalib's post-processor normalises and clamps \
them); image and pixel AUROC agree with scikit-learn to 1e-4.
- Image F1 is anomalib's, at the post-processor's adaptive threshold (fitted on the validation set, which for \
these datasets is the test set: optimistic).
- Train s: Lightning fit time minus the time spent scoring validation images (fitting a memory bank counts as \
training). Inference: median over the test set of pre-processing + model time per image, batch 1, after warm-up \
images. Peak RSS: the job's own process (libraries included).
- Deployed: the trained model exported to ONNX and run by OpenVINO at f32 (what `anomalib-mdps-predict` runs by \
default), timed the same way on the same test images (`benchmarks/deployment.py`); `deployed_image_AUROC` and \
`deployed_pixel_AUROC` in results.csv check it scores as eager torch does, `export_seconds` is the export's time.
- Pixel metrics are at each model's input resolution (anomalib resizes masks with the images).
- Mdps's image score fuses D̄ (eq. 18-19, the diffusion part), the per-location feature density and the patch memory's distance; "D̄ alone", "density alone" and "memory alone" score the same trained model's test images with each term on its own. The fusion is chosen while the model trains, on its selection split (held-out normal training images and synthetic defects); results.csv has the chosen shares (`fusion_*`) and what they measured there (`selection_*`). Where the fusion gives D̄ no weight, the timed pass skips sampling and "D̄ alone" comes from a second, untimed pass."""


def merge_results(existing_csv: Path, new_rows: pd.DataFrame) -> pd.DataFrame:
    """Existing rows, those measured again replaced in place by ``new_rows``, new ones appended."""
    if not existing_csv.is_file():
        return new_rows.reset_index(drop=True)
    existing = pd.read_csv(existing_csv)
    fresh = {(row["model"], row["dataset"]): row for row in new_rows.to_dict("records")}
    records = [fresh.pop((row["model"], row["dataset"]), row) for row in existing.to_dict("records")]
    # Columns are the union over runs (models report different configuration columns).
    return pd.DataFrame(records + list(fresh.values()))


def markdown_table(results: pd.DataFrame) -> str:
    def cell(value: object, template: str) -> str:
        return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else template.format(value)

    lines = ["| " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |", "|---|---|" + "---:|" * (len(TABLE_COLUMNS) - 2)]
    for _, row in results.iterrows():
        lines.append("| " + " | ".join(cell(row.get(column), template) for column, _, template in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def markdown_report(results: pd.DataFrame, profile_name: str, notes: list[str]) -> str:
    devices = ", ".join(sorted(str(d) for d in results["device"].dropna().unique())) if "device" in results else "?"
    if "torch_threads" in results:
        threads = "/".join(str(int(t)) for t in sorted(results["torch_threads"].dropna().unique()))
        devices += f" (torch threads per job: {threads})"
    if "load_average" in results and results["load_average"].notna().any():
        load = results["load_average"]
        devices += f"; 1-minute load average at the end of the jobs: {load.min():.1f}–{load.max():.1f}"
    job_minutes = results["job_seconds"].sum() / 60 if "job_seconds" in results else float("nan")
    moved = results[(results["image_AUROC"] - results["anomalib_image_AUROC"]).abs() > 0.005] \
        if "anomalib_image_AUROC" in results else results.iloc[:0]
    if not moved.empty:
        cases = ", ".join(
            f"{r.model}/{r.dataset} {r.anomalib_image_AUROC:.3f} (raw {r.image_AUROC:.3f})" for r in moved.itertuples()
        )
        notes = [f"anomalib's own image AUROC, on post-processed (clamped) scores, differs for: {cases}.", *notes]
    if "deployed_image_AUROC" in results:
        apart = results[((results["deployed_image_AUROC"] - results["image_AUROC"]).abs() > DEPLOYED_IMAGE_TOLERANCE)
                        | ((results["deployed_pixel_AUROC"] - results["pixel_AUROC"]).abs() > DEPLOYED_PIXEL_TOLERANCE)]
        if not apart.empty:
            cases = ", ".join(f"{r.model}/{r.dataset} {r.deployed_image_AUROC:.3f} / {r.deployed_pixel_AUROC:.3f} "
                              f"(eager {r.image_AUROC:.3f} / {r.pixel_AUROC:.3f})" for r in apart.itertuples())
            notes = [f"Deployed image / pixel AUROC differs from eager torch's for: {cases}.", *notes]
    if "deployed_error" in results and results["deployed_error"].notna().any():
        failed = results[results["deployed_error"].notna()]
        notes = [*notes, *(f"{r.model}/{r.dataset} not deployed: {r.deployed_error}" for r in failed.itertuples())]
    return "\n".join([
        f"# Benchmark results: profile `{profile_name}`\n",
        f"Generated by `python -m benchmarks --profile {profile_name}` (runs merge into this table).\n",
        markdown_table(results) + "\n",
        f"Device: {devices}. Sum of job times (train + validation + test + set-up): {job_minutes:.1f} min.\n",
        EXPLANATIONS,
        *[f"- {note}" for note in notes],
        "",
    ])


README_BLOCK = "<!-- benchmark table: {profile} -->", "<!-- end of benchmark table -->"
# Models and what the README's table shows of them.
README_MODELS = ("Mdps", "PaDiM", "PatchCore", "InvAD", "Glad", "DRAEM")


def summary_table(results: pd.DataFrame) -> str:
    """Image / pixel AUROC and ms per image, a row per model and a column per dataset (the README's table)."""
    datasets = list(dict.fromkeys(results["dataset"]))
    lines = ["| model | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for model in [m for m in README_MODELS if m in set(results["model"])]:
        cells = []
        for dataset in datasets:
            row = results[(results["model"] == model) & (results["dataset"] == dataset)]
            if row.empty:
                cells.append("–")
                continue
            row = row.iloc[0]
            deployed = row.get("deployed_ms_per_image", float("nan"))
            deployed = "" if pd.isna(deployed) else f"; {deployed:.0f} ms deployed"
            cells.append(f"{row['image_AUROC']:.3f} / {row['pixel_AUROC']:.3f} "
                         f"({row['inference_ms_per_image']:.0f} ms{deployed})")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    if {"Mdps", "PaDiM"} <= set(results["model"]):
        lines.append("| Mdps ÷ PaDiM ms | " + " | ".join(latency_ratio(results, d) for d in datasets) + " |")
    return "\n".join(lines)


def latency_ratio(results: pd.DataFrame, dataset: str) -> str:
    """Mdps's ms per image over PaDiM's on ``dataset`` (the same run), eager and, where measured, deployed."""
    rows = {model: results[(results["model"] == model) & (results["dataset"] == dataset)] for model in ("Mdps", "PaDiM")}
    if any(row.empty for row in rows.values()):
        return "–"
    mdps, padim = (rows[model].iloc[0] for model in ("Mdps", "PaDiM"))
    text = f"{mdps['inference_ms_per_image'] / padim['inference_ms_per_image']:.1f}×"
    deployed = [row.get("deployed_ms_per_image", float("nan")) for row in (mdps, padim)]
    return text if any(pd.isna(v) for v in deployed) else f"{text} ({deployed[0] / deployed[1]:.1f}× deployed)"


def update_readme(readme: Path, profile_name: str, results: pd.DataFrame) -> bool:
    """Rewrite the README's marked block for ``profile_name`` with the summary table; False if it has none."""
    start, end = README_BLOCK[0].format(profile=profile_name), README_BLOCK[1]
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if start not in text or end not in text.split(start, 1)[1]:
        return False
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    readme.write_text(f"{before}{start}\n{summary_table(results)}\n{end}{after}", encoding="utf-8")
    return True


def plot_against_latency(results: pd.DataFrame, path: Path, title: str, metric: str = "image_AUROC") -> None:
    """``metric`` against ms/image on a log axis: a colour per model, a marker per dataset."""
    import matplotlib as mpl

    mpl.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    figure, axes = plt.subplots(figsize=(8.5, 4.8), dpi=120)
    markers = dict(zip(results["dataset"].unique(), "os^DvP*X", strict=False))
    colors = dict(zip(results["model"].unique(), plt.get_cmap("tab10").colors, strict=False))
    labelled: list[tuple[float, float]] = []
    for _, row in results.iterrows():
        x, y = row["inference_ms_per_image"], row.get(metric, float("nan"))
        if pd.isna(x) or pd.isna(y) or x <= 0:
            continue
        axes.scatter(x, y, marker=markers[row["dataset"]], color=colors[row["model"]], s=60, zorder=3)
        # Near-identical points (e.g. two models at AUROC 1.0): put the second label below.
        crowded = any(abs(math.log10(x) - lx) < 0.12 and abs(y - ly) < 0.03 for lx, ly in labelled)
        labelled.append((math.log10(x), y))
        axes.annotate(f"{row['model']} / {row['dataset']}", (x, y), xytext=(5, -11) if crowded else (5, 4),
                      textcoords="offset points", fontsize=8)
    axes.set_xscale("log")
    # Plain numbers at 1-2-3-5 steps: latencies often span less than a decade.
    axes.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.xaxis.set_minor_locator(NullLocator())
    axes.margins(x=0.15, y=0.08)
    axes.set(xlabel="inference ms per image (batch 1, log scale)", ylabel=f"{metric.replace('_', ' ')} (raw scores)",
             title=title)
    axes.grid(True, alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="", label=m) for m, c in colors.items()]
    handles += [plt.Line2D([], [], color="gray", marker=k, linestyle="", label=d) for d, k in markers.items()]
    axes.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_reports(output_dir: Path, new_rows: pd.DataFrame, profile: dict, notes_for_models) -> pd.DataFrame:
    """Merge ``new_rows`` (may be empty) into the profile's csv; rewrite the markdown table and plots.

    Rows follow the profile's model and dataset order (other names last); ``notes_for_models(names)``
    gives the notes to print under the table.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_file = output_dir / RESULTS_CSV
    merged = merge_results(csv_file, new_rows) if not new_rows.empty else pd.read_csv(csv_file)
    rank = {key: {name: i for i, name in enumerate(profile.get(key) or [])} for key in ("models", "datasets")}
    order = pd.DataFrame({column: merged[column].astype(str).map(rank[key]).fillna(len(rank[key]))
                          for column, key in (("model", "models"), ("dataset", "datasets"))})
    merged = merged.loc[order.sort_values(["model", "dataset"], kind="stable").index].reset_index(drop=True)
    merged.to_csv(csv_file, index=False)
    notes = notes_for_models(list(merged["model"].unique()))
    (output_dir / RESULTS_MD).write_text(markdown_report(merged, profile["name"], notes), encoding="utf-8")
    for metric, file, what in (("image_AUROC", PLOT_PNG, "Image"), ("pixel_AUROC", PIXEL_PLOT_PNG, "Pixel")):
        plot_against_latency(merged, output_dir / file, f"{what} AUROC vs latency ({profile['name']} profile)", metric)
    return merged
