"""Benchmark profiles: which models run on which datasets, and with what budget.

A profile is a YAML file in ``benchmarks/profiles/`` (or any path)::

    accelerator: cpu          # passed to anomalib's Engine
    seed: 0
    warmup_images: 3          # first images left out of the latency median
    torch_threads: 2          # optional: torch.set_num_threads in every job
    deployed_latency: true    # optional: also export each model (or those listed) and time it in OpenVINO (f32)
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
        keep_weights: true            # optional: save the torch model's tensors as <job dir>/model.pt
        note: "..."                   # shown under the results table
      Mdps: {preset: configs/mdps_cpu.yaml}   # init args from a preset's model.init_args
    notes: ["..."]            # shown under the results table

Relative paths (dataset roots, presets) are relative to the repository root, so the
default ``../shared/data`` works from any working directory.
"""

from collections.abc import Iterable
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

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


def _fail(message: str) -> NoReturn:
    raise ProfileError(message)


def _read_yaml(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as file:
        return yaml.safe_load(file) or {}


def load_profile(profile: str) -> dict[str, Any]:
    """``cpu`` → ``benchmarks/profiles/cpu.yaml``; a path to a YAML file is used as is."""
    path = Path(profile).resolve() if Path(profile).suffix in {".yaml", ".yml"} else PROFILES_DIR / f"{profile}.yaml"
    if not path.is_file():
        _fail(f"No profile {profile!r}; available: {sorted(p.stem for p in PROFILES_DIR.glob('*.yaml'))} "
              "(or pass a path to a YAML file).")
    content = _read_yaml(path)
    for section in ("models", "datasets"):
        if not isinstance(content.get(section), dict) or not content[section]:
            _fail(f"Profile {path} needs a non-empty '{section}' mapping.")
    return {**content, "name": path.stem}


def repo_path(path: str | Path) -> Path:
    """Resolve ``path`` against the repository root (absolute paths stay as they are)."""
    return (REPO_ROOT / Path(path).expanduser()).resolve()


def select(available: dict[str, Any], wanted: Iterable[str] | None, kind: str) -> dict[str, Any]:
    """Keep the entries named in ``wanted`` (all when ``None``), in the profile's order."""
    wanted = list(available if wanted is None else wanted)
    unknown = [name for name in wanted if name not in available]
    if unknown:
        _fail(f"Unknown {kind} {unknown}; this profile has {list(available)}.")
    return {name: entry for name, entry in available.items() if name in wanted}


def model_spec(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """One model's job settings; a ``preset`` supplies class, init args and trainer settings."""
    entry = deepcopy(entry or {})
    class_path, init_args, trainer, data = entry.get("class_path"), {}, {}, {}
    if "preset" in entry:
        preset_file = repo_path(entry["preset"])
        if not preset_file.is_file():
            _fail(f"Model {name}: preset {entry['preset']} not found (looked for {preset_file}).")
        preset = _read_yaml(preset_file)
        class_path = class_path or (preset.get("model") or {}).get("class_path")
        init_args.update((preset.get("model") or {}).get("init_args") or {})
        trainer.update({k: v for k, v in (preset.get("trainer") or {}).items() if k not in HARNESS_TRAINER_KEYS})
        preset_data = (preset.get("data") or {}).get("init_args") or {}
        data.update({k: preset_data[k] for k in PRESET_DATA_KEYS if k in preset_data})
    if not class_path:
        _fail(f"Model {name}: give a class_path or a preset.")
    # The profile's own values refine the preset's (e.g. fewer epochs for a smoke run).
    init_args.update(entry.get("init_args") or {})
    trainer.update(entry.get("trainer") or {})
    data.update(entry.get("data") or {})
    if owned := HARNESS_TRAINER_KEYS.intersection(trainer):
        _fail(f"Model {name}: trainer settings {sorted(owned)} are set by the benchmark itself.")
    return {
        "name": name, "class_path": class_path, "init_args": init_args, "trainer": trainer, "data": data,
        "image_size": entry.get("image_size"), "empty_dirs": list(entry.get("empty_dirs") or []),
        "malloc_mmap_threshold": entry.get("malloc_mmap_threshold"), "preset": entry.get("preset"),
        "keep_weights": bool(entry.get("keep_weights")),
    }


def dataset_spec(name: str, entry: dict[str, Any], defaults: dict[str, Any], root: str | None = None) -> dict[str, Any]:
    """One dataset's job settings, with its ``root`` resolved against the repository."""
    if "class_path" not in entry:
        _fail(f"Dataset {name}: missing class_path.")
    init_args = {**deepcopy(defaults or {}), **deepcopy(entry.get("init_args") or {})}
    if root is not None:
        init_args["root"] = root
    if init_args.get("root") is not None:
        init_args["root"] = str(repo_path(init_args["root"]))
    limits = {key: entry.get(key) for key in ("max_train_images", "max_test_images")}
    return {"name": name, "class_path": entry["class_path"], "init_args": init_args, **limits}


def cpu_profile_datamodule(name: str, profile_name: str = "cpu", **loader_args: Any):  # noqa: ANN201
    """A profile's (default: cpu) dataset ``name`` as a set-up anomalib datamodule (for the scripts beside the harness)."""
    from anomalib import data

    profile = load_profile(profile_name)
    if name not in profile["datasets"]:
        _fail(f"No dataset {name!r} in the {profile_name} profile; it has {list(profile['datasets'])}.")
    spec = dataset_spec(name, profile["datasets"][name], profile.get("data_defaults", {}))
    module = getattr(data, spec["class_path"])(**{**spec["init_args"], "num_workers": 0, **loader_args})
    module.setup()
    return module


def kept_weights(model: str, dataset: str, runs: Path) -> Path:
    """``<runs>/<model>-<dataset>/model.pt``: the tensors a profile job kept (``keep_weights``)."""
    path = runs / f"{model}-{dataset}" / "model.pt"
    if not path.is_file():
        _fail(f"No {path}: run `python -m benchmarks --profile cpu --models {model}` first (it keeps the weights).")
    return path


def model_from_kept_weights(name: str, path: Path, profile_name: str = "cpu"):  # noqa: ANN201
    """The profile's ``name`` model (its preset's init args) holding the tensors a job kept in ``path``."""
    import torch

    from anomalib_mdps import models

    saved = torch.load(path, map_location="cpu", weights_only=False)
    init_args = model_spec(name, load_profile(profile_name)["models"][name])["init_args"]
    model = getattr(models, name)(**{**init_args, "image_size": list(saved["image_size"]), "visualizer": False})
    model.model.load_state_dict(saved["state_dict"])
    return model


def folder_dataset_entry(path: Path) -> dict[str, Any]:
    """A ``Folder`` dataset from a directory laid out as ``good/``, defect dirs, optional ``mask/``.

    The normal images are in ``good`` (or ``normal``/``ok``); every other sub-directory holds
    anomalous images; masks, if any, are in ``mask`` (or ``masks``/``ground_truth``), either
    flat or with one sub-directory per defect directory, with the image file names.
    """
    path = path.expanduser().resolve()
    if not path.is_dir():
        _fail(f"Folder dataset {path} is not a directory.")
    subdirs = sorted(p.name for p in path.iterdir() if p.is_dir())
    normal = next((d for d in NORMAL_DIR_NAMES if d in subdirs), None)
    if normal is None:
        _fail(f"Folder dataset {path}: no normal-image directory named one of {NORMAL_DIR_NAMES}.")
    mask_root = next((d for d in MASK_DIR_NAMES if d in subdirs), None)
    abnormal = [d for d in subdirs if d not in {normal, mask_root}]
    if not abnormal:
        _fail(f"Folder dataset {path}: no anomalous-image directory beside {normal!r}.")
    mask_dir = None
    if mask_root is not None:
        per_defect = [f"{mask_root}/{d}" for d in abnormal]
        mask_dir = per_defect if all((path / m).is_dir() for m in per_defect) else [mask_root]
    # Like MVTecAD and Kolektor here: thresholds come from the test images.
    init_args = {"name": path.name, "root": str(path), "normal_dir": normal, "abnormal_dir": abnormal,
                 "mask_dir": mask_dir, "val_split_mode": "same_as_test"}
    return {"class_path": "Folder", "init_args": init_args}


def parse_assignment(text: str, option: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        _fail(f"{option} expects NAME=VALUE, got {text!r}.")
    return name, value


@dataclass(frozen=True)
class Job:
    """One model trained and tested on one dataset, with the run's settings."""

    model: dict[str, Any]
    dataset: dict[str, Any]
    settings: dict[str, Any]

    @property
    def title(self) -> str:
        return f"{self.model['name']} × {self.dataset['name']}"

    @property
    def directory(self) -> Path:
        return Path(self.settings["runs_dir"]) / f"{self.model['name']}-{self.dataset['name']}"


def plan_jobs(
    profile: dict[str, Any],
    models: Iterable[str] | None = None,
    datasets: Iterable[str] | None = None,
    data_roots: dict[str, str] | None = None,
    folders: Iterable[str] = (),
    output_dir: Path | None = None,
    torch_threads: int | None = None,
) -> list[Job]:
    """One job per model × dataset of the selection, models in the profile's order."""
    all_datasets = dict(profile["datasets"])
    for folder in folders:
        name, path = folder.split("=", 1) if "=" in folder else (Path(folder).name, folder)
        if name in all_datasets:
            _fail(f"--folder {folder}: the profile already has a dataset named {name!r}.")
        all_datasets[name] = folder_dataset_entry(Path(path))
    data_roots = data_roots or {}
    if unknown := [name for name in data_roots if name not in all_datasets]:
        _fail(f"--data-root for unknown datasets {unknown}; this run has {list(all_datasets)}.")
    defaults = profile.get("data_defaults") or {}
    dataset_specs = [dataset_spec(name, entry, defaults, data_roots.get(name))
                     for name, entry in select(all_datasets, datasets, "datasets").items()]
    settings = {
        "profile": profile["name"],
        "accelerator": profile.get("accelerator", "cpu"),
        "seed": profile.get("seed", 0),
        "warmup_images": profile.get("warmup_images", 3),
        "torch_threads": torch_threads or profile.get("torch_threads"),
        "deployed_latency": deployed_models(profile),
        "runs_dir": str((output_dir or Path()) / "runs"),
    }
    return [Job(model_spec(name, entry), dataset, settings)
            for name, entry in select(profile["models"], models, "models").items() for dataset in dataset_specs]


def deployed_models(profile: dict[str, Any]) -> list[str]:
    """The models whose jobs also time their exported graph: ``deployed_latency`` true (all), a list, or none."""
    wanted = profile.get("deployed_latency", False)
    if wanted is True:
        return list(profile["models"])
    if not wanted:
        return []
    if unknown := [name for name in wanted if name not in profile["models"]]:
        _fail(f"deployed_latency names models the profile does not have: {unknown}.")
    return list(wanted)


def notes_for(profile: dict[str, Any], model_names: Iterable[str]) -> list[str]:
    """The profile's general notes, then the notes of the models in the table."""
    notes = list(profile.get("notes") or [])
    for name in model_names:
        if note := (profile["models"].get(name) or {}).get("note"):
            notes.append(f"{name}: {note.strip()}")
    return notes
