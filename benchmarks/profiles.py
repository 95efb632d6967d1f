"""Benchmark profiles: which models run on which datasets, and with what budget.

A profile is a YAML file in ``benchmarks/profiles/`` (or any path)::

    accelerator: cpu          # passed to anomalib's Engine
    seed: 0
    warmup_images: 3          # first images left out of the latency median
    torch_threads: 2          # optional: torch.set_num_threads in every job
    data_defaults: {...}      # init args every dataset gets (batch size, workers)
    datasets:
      bottle:                 # the name used in the table and by --datasets
        class_path: MVTecAD   # any anomalib.data datamodule
        init_args: {root: ../shared/data/mvtec_ad, category: bottle}
        max_train_images: 8   # optional subsample (smoke runs)
        max_test_images: 8    # optional, stratified normal/anomalous
    models:
      PaDiM:                  # the name used in the table and by --models
        class_path: Padim     # a name in anomalib.models (plugin models included)
        init_args: {...}
        trainer: {max_epochs: 1}      # optional Lightning trainer arguments
        data: {train_batch_size: 8}   # optional per-model dataset init args
        image_size: [64, 64]          # optional: the model's default pre-processor at this size
        empty_dirs: [dtd_dir]         # optional: init args that get a fresh, empty directory
        malloc_mmap_threshold: 131072 # optional: glibc heap setting for this model's jobs (PatchCore)
        note: "..."                   # shown under the results table
      Mdps: {preset: configs/mdps_cpu.yaml}   # init args from a preset's model.init_args
    notes: ["..."]            # shown under the results table

Relative paths (dataset roots, presets) are relative to the repository root, so the
default ``../shared/data`` works from any working directory.
"""

from collections.abc import Iterable
from copy import deepcopy
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"

# Trainer settings the harness owns: a job runs on one device, in its own directory, with the
# harness's measuring callbacks. A preset's values for these are ignored.
HARNESS_TRAINER_KEYS = frozenset({"accelerator", "devices", "default_root_dir", "logger", "callbacks", "strategy"})
# A preset's data section names its own dataset; only the loader settings that belong to the
# model (its training batch size) carry over into the benchmark's datasets.
PRESET_DATA_KEYS = ("train_batch_size",)
# Folder-layout conventions for datasets given by path on the command line.
NORMAL_DIR_NAMES = ("good", "normal", "ok")
MASK_DIR_NAMES = ("mask", "masks", "ground_truth")


class ProfileError(ValueError):
    """A profile, preset or command-line selection that cannot be run."""


def profile_path(profile: str) -> Path:
    """``cpu`` → ``benchmarks/profiles/cpu.yaml``; a path to a YAML file is used as is."""
    candidate = Path(profile)
    if candidate.suffix in {".yaml", ".yml"}:
        return candidate.resolve()
    path = PROFILES_DIR / f"{profile}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        msg = f"No profile {profile!r}; available: {available} (or pass a path to a YAML file)."
        raise ProfileError(msg)
    return path


def load_profile(profile: str) -> dict[str, Any]:
    path = profile_path(profile)
    with path.open(encoding="utf-8") as file:
        content = yaml.safe_load(file) or {}
    for section in ("models", "datasets"):
        if not isinstance(content.get(section), dict) or not content[section]:
            msg = f"Profile {path} needs a non-empty '{section}' mapping."
            raise ProfileError(msg)
    content["name"] = path.stem
    return content


def repo_path(path: str | Path) -> Path:
    """Resolve ``path`` against the repository root (absolute paths stay as they are)."""
    return (REPO_ROOT / Path(path).expanduser()).resolve()


def select(available: dict[str, Any], wanted: Iterable[str] | None, kind: str) -> dict[str, Any]:
    """Keep the entries named in ``wanted`` (all when ``None``), in the profile's order."""
    if wanted is None:
        return dict(available)
    wanted = list(wanted)
    unknown = [name for name in wanted if name not in available]
    if unknown:
        msg = f"Unknown {kind} {unknown}; this profile has {list(available)}."
        raise ProfileError(msg)
    return {name: entry for name, entry in available.items() if name in wanted}


def model_spec(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """One model's job settings; a ``preset`` supplies class, init args and trainer settings."""
    entry = deepcopy(entry or {})
    class_path = entry.get("class_path")
    init_args: dict[str, Any] = {}
    trainer: dict[str, Any] = {}
    data: dict[str, Any] = {}
    if "preset" in entry:
        preset_file = repo_path(entry["preset"])
        if not preset_file.is_file():
            msg = f"Model {name}: preset {entry['preset']} not found (looked for {preset_file})."
            raise ProfileError(msg)
        with preset_file.open(encoding="utf-8") as file:
            preset = yaml.safe_load(file) or {}
        preset_model = preset.get("model") or {}
        class_path = class_path or preset_model.get("class_path")
        init_args.update(preset_model.get("init_args") or {})
        trainer.update({k: v for k, v in (preset.get("trainer") or {}).items() if k not in HARNESS_TRAINER_KEYS})
        preset_data = (preset.get("data") or {}).get("init_args") or {}
        data.update({k: preset_data[k] for k in PRESET_DATA_KEYS if k in preset_data})
    if not class_path:
        msg = f"Model {name}: give a class_path or a preset."
        raise ProfileError(msg)
    # The profile's own values refine the preset's (e.g. fewer epochs for a smoke run).
    init_args.update(entry.get("init_args") or {})
    trainer.update(entry.get("trainer") or {})
    data.update(entry.get("data") or {})
    owned = HARNESS_TRAINER_KEYS.intersection(trainer)
    if owned:
        msg = f"Model {name}: trainer settings {sorted(owned)} are set by the benchmark itself."
        raise ProfileError(msg)
    return {
        "name": name,
        "class_path": class_path,
        "init_args": init_args,
        "trainer": trainer,
        "data": data,
        "image_size": entry.get("image_size"),
        "empty_dirs": list(entry.get("empty_dirs") or []),
        "malloc_mmap_threshold": entry.get("malloc_mmap_threshold"),
        "preset": entry.get("preset"),
    }


def dataset_spec(name: str, entry: dict[str, Any], defaults: dict[str, Any], root: str | None = None) -> dict[str, Any]:
    """One dataset's job settings, with its ``root`` resolved against the repository."""
    entry = deepcopy(entry)
    if "class_path" not in entry:
        msg = f"Dataset {name}: missing class_path."
        raise ProfileError(msg)
    init_args = {**deepcopy(defaults or {}), **(entry.get("init_args") or {})}
    if root is not None:
        init_args["root"] = root
    if init_args.get("root") is not None:
        init_args["root"] = str(repo_path(init_args["root"]))
    return {
        "name": name,
        "class_path": entry["class_path"],
        "init_args": init_args,
        "max_train_images": entry.get("max_train_images"),
        "max_test_images": entry.get("max_test_images"),
    }


def folder_dataset_entry(path: Path) -> dict[str, Any]:
    """A ``Folder`` dataset from a directory laid out as ``good/``, defect dirs, optional ``mask/``.

    The normal images are in ``good`` (or ``normal``/``ok``); every other sub-directory holds
    anomalous images; masks, if any, are in ``mask`` (or ``masks``/``ground_truth``), either
    flat or with one sub-directory per defect directory, with the image file names.
    """
    path = path.expanduser().resolve()
    if not path.is_dir():
        msg = f"Folder dataset {path} is not a directory."
        raise ProfileError(msg)
    subdirs = sorted(p.name for p in path.iterdir() if p.is_dir())
    normal = next((d for d in NORMAL_DIR_NAMES if d in subdirs), None)
    if normal is None:
        msg = f"Folder dataset {path}: no normal-image directory named one of {NORMAL_DIR_NAMES}."
        raise ProfileError(msg)
    mask_root = next((d for d in MASK_DIR_NAMES if d in subdirs), None)
    abnormal = [d for d in subdirs if d not in {normal, mask_root}]
    if not abnormal:
        msg = f"Folder dataset {path}: no anomalous-image directory beside {normal!r}."
        raise ProfileError(msg)
    mask_dir: list[str] | None = None
    if mask_root is not None:
        per_defect = [f"{mask_root}/{d}" for d in abnormal]
        mask_dir = per_defect if all((path / m).is_dir() for m in per_defect) else [mask_root]
    return {
        "class_path": "Folder",
        "init_args": {
            "name": path.name,
            "root": str(path),
            "normal_dir": normal,
            "abnormal_dir": abnormal,
            "mask_dir": mask_dir,
            # Like MVTecAD and Kolektor here: thresholds come from the test images.
            "val_split_mode": "same_as_test",
        },
    }


def parse_assignment(text: str, option: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        msg = f"{option} expects NAME=VALUE, got {text!r}."
        raise ProfileError(msg)
    return name, value


def pipeline_arguments(
    profile: dict[str, Any],
    models: Iterable[str] | None = None,
    datasets: Iterable[str] | None = None,
    data_roots: dict[str, str] | None = None,
    folders: Iterable[str] = (),
    output_dir: Path | None = None,
    torch_threads: int | None = None,
) -> dict[str, Any]:
    """The configuration anomalib's Benchmark pipeline expands into jobs (one per model × dataset)."""
    all_datasets = dict(profile["datasets"])
    for folder in folders:
        name, path = folder.split("=", 1) if "=" in folder else (Path(folder).name, folder)
        if name in all_datasets:
            msg = f"--folder {folder}: the profile already has a dataset named {name!r}."
            raise ProfileError(msg)
        all_datasets[name] = folder_dataset_entry(Path(path))
    data_roots = data_roots or {}
    unknown_roots = [name for name in data_roots if name not in all_datasets]
    if unknown_roots:
        msg = f"--data-root for unknown datasets {unknown_roots}; this run has {list(all_datasets)}."
        raise ProfileError(msg)
    chosen_datasets = select(all_datasets, datasets, "datasets")
    chosen_models = select(profile["models"], models, "models")
    defaults = profile.get("data_defaults") or {}
    return {
        "accelerator": profile.get("accelerator", "cpu"),
        "benchmark": {
            "seed": profile.get("seed", 0),
            "settings": {
                "profile": profile["name"],
                "warmup_images": profile.get("warmup_images", 3),
                "torch_threads": torch_threads or profile.get("torch_threads"),
                "runs_dir": str((output_dir or Path()) / "runs"),
            },
            # anomalib's grid syntax: one job per (model, dataset) pair.
            "model": {"grid": [model_spec(name, entry) for name, entry in chosen_models.items()]},
            "data": {
                "grid": [
                    dataset_spec(name, entry, defaults, data_roots.get(name)) for name, entry in chosen_datasets.items()
                ],
            },
        },
    }


def notes_for(profile: dict[str, Any], model_names: Iterable[str]) -> list[str]:
    """The profile's general notes, then the notes of the models in the table."""
    notes = list(profile.get("notes") or [])
    for name in model_names:
        note = (profile["models"].get(name) or {}).get("note")
        if note:
            notes.append(f"{name}: {note.strip()}")
    return notes
