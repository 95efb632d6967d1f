"""Leave-one-dataset-out check of Mdps's scoring rule, on the weights a cpu-profile run kept.

    python -m benchmarks --profile cpu --models PatchCore,PaDiM,Mdps   # trains, tests, keeps Mdps weights
    python -m benchmarks.leave_one_out                                  # writes results/cpu/leave_one_out.md

Candidates are ways of turning Mdps's three terms (D̄ of eq. 18-19, the per-location density, the
patch memory) into its map and image score: the default (weights chosen per dataset on its
selection split, the simplest mix within one standard error of the best), the same choice taking
the best mix whatever its complexity, the choice with fewer terms, fixed weights, and each term
alone. Every candidate is scored on each dataset's selection split (held-out normal training
images and synthetic defects; ``anomalib_mdps.selection_split``). A candidate that chooses its
weights is scored by two-fold cross-fitting over the selection images (choose on one half,
score the other), so that it is not judged on the images it chose on. For each left-out dataset
the candidate with the best mean selection image AUROC over the *other* datasets is chosen, and
only then is the left-out dataset's test set scored with it. Its test row stands next to PaDiM's
and PatchCore's from the same profile run (``results.csv``).

Only scoring rules are candidates: they change no sample, so each dataset's terms are computed
once. Sampler settings (N_s, steps, the mask) would need the sampler rerun per candidate.
"""

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_mdps.console import hide_library_import_warnings

from .profiles import cpu_profile_datamodule, kept_weights, load_profile, model_from_kept_weights, model_spec

RESULTS = Path(__file__).resolve().parent / "results" / "cpu"
TERMS = ("eq18", "density", "memory")
# name -> (how the weights come: "auto" over the terms marked True, "best" the same without the
# simplest-within-noise rule, or fixed (map, score) rows)
CANDIDATES: dict[str, Any] = {
    "auto: D̄ + density + memory, simplest within one SE (default)": ("auto", (True, True, True)),
    "auto: D̄ + density + memory, best on the split": ("best", (True, True, True)),
    "auto: D̄ + density": ("auto", (True, True, False)),
    "auto: D̄ + memory": ("auto", (True, False, True)),
    "auto: density + memory (no diffusion)": ("auto", (False, True, True)),
    "fixed: map D̄ + 0.5 density, score D̄ + 4 density": ("fixed", ((1, 0.5, 0), (1, 4, 0))),
    "D̄ alone (the paper's eq. 18-19)": ("fixed", ((1, 0, 0), (1, 0, 0))),
    "density alone": ("fixed", ((0, 1, 0), (0, 1, 0))),
    "memory alone": ("fixed", ((0, 0, 1), (0, 0, 1))),
}
DEFAULT = next(iter(CANDIDATES))


def trained_model(dataset: str, runs: Path, profile: str = "cpu"):  # noqa: ANN201
    """The profile run's Mdps for ``dataset`` with its saved tensors, and its datamodule and held-out images."""
    from anomalib_mdps.models.calibration import CalibrationHoldout

    model = model_from_kept_weights("Mdps", kept_weights("Mdps", dataset, runs), profile).model.eval()
    init_args = model_spec("Mdps", load_profile(profile)["models"]["Mdps"])["init_args"]
    module = cpu_profile_datamodule(dataset, profile, train_batch_size=8, eval_batch_size=8)
    holdout = CalibrationHoldout(init_args.get("calibration_images", 16), init_args.get("selection_images", 16))
    holdout.choose(module)
    return model, module, holdout


def rule_of(candidate: str, top_k: int):  # noqa: ANN201
    """The candidate as a weight rule (``benchmarks.selection``) and whether it chooses on what it sees."""
    from .selection import chosen_by_model, fixed

    kind, spec = CANDIDATES[candidate]
    if kind == "fixed":
        return fixed(spec), False
    return chosen_by_model(top_k, spec, simplest_within_noise=kind == "auto"), True


def selection_scores(model, holdout, cache: Path) -> tuple[dict[str, dict], object]:  # noqa: ANN001
    """Every candidate on the dataset's selection split; auto candidates by two-fold cross-fitting."""
    from .selection import SelectionTerms

    selection = SelectionTerms(model, holdout, cache=cache)
    return {candidate: selection.scored(*rule_of(candidate, model.top_k)) for candidate in CANDIDATES}, selection


def test_scores(candidate: str, model, module, selection, cache: Path) -> dict:  # noqa: ANN001
    """The left-out dataset's test set scored with ``candidate`` (weights chosen on the whole selection split)."""
    from torchvision.transforms.v2.functional import resize

    from .selection import metrics, terms_of

    rule, _ = rule_of(candidate, model.top_k)
    weights = rule(selection.terms, selection.split.labels, selection.split.masks)
    images, labels, masks = [], [], []
    for batch in module.test_dataloader():
        images.append(resize(batch.image, list(model.full_size), antialias=True))
        labels.append(batch.gt_label)
        masks.append(F.interpolate(batch.gt_mask.float().unsqueeze(1), size=model.full_size, mode="nearest"))
    test_terms = terms_of(model, torch.cat(images), cache=cache)
    return metrics(test_terms, weights, torch.cat(labels), torch.cat(masks), model.top_k) | {"weights": weights}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["bottle", "kolektor", "tire", "mpdd"])
    parser.add_argument("--profile", default="cpu", help="the profile whose run kept the weights")
    parser.add_argument("--results", type=Path, default=RESULTS, help="that run's results (csv, runs/)")
    args = parser.parse_args(argv)
    hide_library_import_warnings()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    selection, terms, trained = {}, {}, {}
    caches = {dataset: args.results / "runs" / f"Mdps-{dataset}" for dataset in args.datasets}
    for dataset in args.datasets:
        trained[dataset] = trained_model(dataset, args.results / "runs", args.profile)
        selection[dataset], terms[dataset] = selection_scores(trained[dataset][0], trained[dataset][2], caches[dataset])
        print(dataset, json.dumps(selection[dataset]), flush=True)
    profile = pd.read_csv(args.results / "results.csv")
    rows = []
    for left_out in args.datasets:
        others = [d for d in args.datasets if d != left_out]
        ranking = {c: (sum(selection[d][c]["image_auroc"] for d in others) / len(others),
                       sum(selection[d][c]["pixel_auroc"] for d in others) / len(others)) for c in CANDIDATES}
        chosen = max(CANDIDATES, key=lambda c: ranking[c])
        model, module, _ = trained[left_out]
        test = {c: test_scores(c, model, module, terms[left_out], caches[left_out])
                for c in dict.fromkeys((chosen, DEFAULT))}
        baselines = {m: profile[(profile.model == m) & (profile.dataset == left_out)].iloc[0]
                     for m in ("PaDiM", "PatchCore")}
        rows.append((left_out, chosen, ranking[chosen], test, baselines))
        print(left_out, chosen, json.dumps({c: {k: v for k, v in t.items() if k != "weights"} for c, t in test.items()}),
              flush=True)
    write_report(args.results / "leave_one_out.md", args.datasets, selection, rows)


def write_report(target: Path, datasets: list[str], selection: dict, rows: list) -> None:
    lines = [
        "# Leave one dataset out: Mdps's scoring rule chosen without the dataset it is tested on\n",
        "Generated by `python -m benchmarks.leave_one_out` from the weights and `results.csv` of one run of",
        "`python -m benchmarks --profile cpu --models PatchCore,PaDiM,Mdps` (see `results.md` for that run).\n",
        "## Selection split: every candidate on every dataset (image AUROC / pixel AUROC)\n",
        "Held-out normal training images and two synthetic defects on each; no test image. Candidates that "
        "choose weights are scored by two-fold cross-fitting (chosen on half of the source images, scored on "
        "the other half).\n",
        "| candidate | " + " | ".join(datasets) + " | mean |",
        "|---|" + "---:|" * (len(datasets) + 1),
    ]
    for candidate in CANDIDATES:
        cells = [f"{selection[d][candidate]['image_auroc']:.3f} / {selection[d][candidate]['pixel_auroc']:.3f}"
                 for d in datasets]
        mean_image = sum(selection[d][candidate]["image_auroc"] for d in datasets) / len(datasets)
        mean_pixel = sum(selection[d][candidate]["pixel_auroc"] for d in datasets) / len(datasets)
        lines.append(f"| {candidate} | " + " | ".join(cells) + f" | {mean_image:.3f} / {mean_pixel:.3f} |")
    lines += [
        "\n## Each dataset left out: the candidate chosen on the others' selection splits, then its test set\n",
        "| left out | chosen (mean selection image / pixel AUROC on the others) | Mdps, chosen: test image / pixel "
        "AUROC | Mdps, default | the default's weights of D̄, density, memory: score; map | PaDiM | PatchCore |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for left_out, chosen, (image, pixel), test, baselines in rows:
        base = {m: f"{b.image_AUROC:.3f} / {b.pixel_AUROC:.3f}" for m, b in baselines.items()}
        scored = {c: f"{t['image_auroc']:.3f} / {t['pixel_auroc']:.3f}" for c, t in test.items()}
        weights = "; ".join(", ".join(f"{w:.1f}" for w in row) for row in test[DEFAULT]["weights"].flip(0).tolist())
        lines.append(f"| {left_out} | {chosen} ({image:.3f} / {pixel:.3f}) | {scored[chosen]} | {scored[DEFAULT]} | "
                     f"{weights} | {base['PaDiM']} | {base['PatchCore']} |")
    lines.append("\nTest AUROCs are on raw scores (scikit-learn). Mdps's are scored here on the profile run's weights, "
                 "its pixel AUROC at the size its terms are computed at; PaDiM's and PatchCore's are that run's rows.")
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
