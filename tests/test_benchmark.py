"""The side-by-side benchmark command: smoke profile end to end, failures, merging, layouts."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT, TINY_MDPS

sys.path.insert(0, str(REPO_ROOT))  # `benchmarks` lives beside src/, at the repository root

from benchmarks.profiles import PROFILES_DIR, ProfileError, folder_dataset_entry, load_profile, plan_jobs
from benchmarks.report import PIXEL_PLOT_PNG, PLOT_PNG, RESULTS_CSV, RESULTS_MD, merge_results, write_reports

TABLE_METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "image_F1Score")


def _benchmark(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *arguments],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
        check=False,
    )


def test_smoke_profile_end_to_end(mvtec_root: Path, tmp_path: Path) -> None:
    done = _benchmark("--profile", "smoke", "--output-dir", str(tmp_path), "--data-root", f"bottle={mvtec_root}")
    assert done.returncode == 0, done.stdout + done.stderr

    results = pd.read_csv(tmp_path / RESULTS_CSV)
    models = list(load_profile("smoke")["models"])
    assert sorted(results["model"]) == sorted(models)
    assert set(results["dataset"]) == {"bottle"}
    for metric in TABLE_METRICS:
        assert results[metric].between(0, 1).all(), metric
    # The cross-check held (a mismatch fails the job) and the measurements are there.
    assert (results["image_AUROC"] - results["image_AUROC_sklearn"]).abs().max() < 1e-4
    assert (results["train_seconds"] > 0).all()
    assert (results["inference_ms_per_image"] > 0).all()
    assert (results["peak_rss_mb"] > 100).all()
    assert (results["timed_images"] > 0).all()
    # The profile's deployed models were exported and run in OpenVINO, the others not; Mdps scores there
    # as in eager torch (anomalib's baselines carry its clamping post-processor in their graphs).
    deployed = results.set_index("model")
    assert "deployed_error" not in results or results["deployed_error"].isna().all(), results.get("deployed_error")
    wanted = load_profile("smoke")["deployed_latency"]
    assert set(deployed.index[deployed["deployed_ms_per_image"] > 0]) == set(wanted)
    assert (deployed.loc[wanted, "export_seconds"] > 0).all()
    assert abs(deployed.loc["Mdps", "deployed_image_AUROC"] - deployed.loc["Mdps", "image_AUROC"]) < 0.005
    assert abs(deployed.loc["Mdps", "deployed_pixel_AUROC"] - deployed.loc["Mdps", "pixel_AUROC"]) < 0.01

    # Mdps's row carries its score's decomposition and the fusion it chose on its selection split.
    mdps = results[results["model"] == "Mdps"].iloc[0]
    terms = ("eq18", "density", "memory")
    for use in ("map", "score"):
        assert sum(mdps[f"fusion_{use}_{term}"] for term in terms) == pytest.approx(1.0)
    # Each term scored on its own: three different rankings, and the fused score is the term it kept alone.
    assert len({round(mdps[f"image_AUROC_{term}"], 6) for term in terms}) > 1
    kept_alone = [term for term in terms if mdps[f"fusion_score_{term}"] == pytest.approx(1.0)]
    for term in kept_alone:
        assert mdps["image_AUROC"] == pytest.approx(mdps[f"image_AUROC_{term}"], abs=1e-4), term
        assert mdps["selection_image_AUROC_fused"] == pytest.approx(mdps[f"selection_image_AUROC_{term}"], abs=1e-4)
    assert results[results["model"] != "Mdps"]["image_AUROC_eq18"].isna().all()

    table = (tmp_path / RESULTS_MD).read_text(encoding="utf-8")
    for model in models:
        assert f"| {model} | bottle |" in table
    for plot in (PLOT_PNG, PIXEL_PLOT_PNG):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_failed_job_fails_the_command_and_shows_the_error(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dataset"
    done = _benchmark(
        "--profile", "smoke", "--models", "PaDiM", "--output-dir", str(tmp_path / "out"),
        "--data-root", f"bottle={missing}",
    )  # fmt: skip
    assert done.returncode != 0
    assert "PaDiM × bottle: FAILED" in done.stderr
    assert "Traceback" in done.stderr
    assert str(missing) in done.stderr
    assert not (tmp_path / "out" / RESULTS_CSV).exists()


def test_unknown_model_is_refused_before_running_anything(tmp_path: Path) -> None:
    done = _benchmark("--profile", "smoke", "--models", "NoSuchModel", "--output-dir", str(tmp_path))
    assert done.returncode != 0
    assert "NoSuchModel" in done.stderr


def _rows(*rows: tuple[str, str, float]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "model": m,
                "dataset": d,
                "image_AUROC": a,
                "inference_ms_per_image": 10.0,
                "device": "cpu",
                "job_seconds": 1,
            }
            for m, d, a in rows
        ],
    )


def test_runs_merge_into_one_table_in_profile_order(tmp_path: Path) -> None:
    profile = {"name": "test", "models": {"Mdps": {}, "PaDiM": {}, "DRAEM": {}}, "datasets": {"bottle": {}, "kolektor": {}}}
    first = _rows(("PaDiM", "kolektor", 0.8), ("PaDiM", "bottle", 0.9), ("DRAEM", "bottle", 0.5))
    write_reports(tmp_path, first, profile, lambda _: [])
    later = _rows(("PaDiM", "bottle", 0.95), ("Mdps", "bottle", 0.99)).assign(pixel_AUPRO=0.8)
    merged = write_reports(tmp_path, later, profile, lambda names: [f"models: {', '.join(names)}"])

    assert list(zip(merged["model"], merged["dataset"], merged["image_AUROC"], strict=True)) == [
        ("Mdps", "bottle", 0.99),  # new: placed by the profile's model order
        ("PaDiM", "bottle", 0.95),  # re-measured: replaced
        ("PaDiM", "kolektor", 0.8),  # datasets in the profile's order
        ("DRAEM", "bottle", 0.5),  # not re-measured: kept
    ]
    assert pd.read_csv(tmp_path / RESULTS_CSV).shape[0] == 4
    assert merged["pixel_AUPRO"].isna().sum() == 2  # columns are the union over runs
    table = (tmp_path / RESULTS_MD).read_text(encoding="utf-8")
    assert "| DRAEM | bottle | 0.500 |" in table
    assert "models: Mdps, PaDiM, DRAEM" in table
    assert (tmp_path / PLOT_PNG).is_file()
    assert merge_results(tmp_path / "absent.csv", later).equals(later)


def test_rows_of_finished_jobs_are_saved_before_a_later_job_is_interrupted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    from benchmarks import __main__ as command
    from benchmarks import job as job_module

    def run(job: object) -> tuple[bool, dict]:
        if job.model["name"] == "PaDiM":
            return True, _rows(("PaDiM", "bottle", 0.9)).iloc[0].to_dict()
        raise KeyboardInterrupt  # Ctrl-C, or the machine's time limit, during the second job

    monkeypatch.setattr(job_module, "run_in_own_process", run)
    with pytest.raises(KeyboardInterrupt):
        command.main(["--profile", "smoke", "--models", "PaDiM,Mdps", "--output-dir", str(tmp_path)])

    saved = pd.read_csv(tmp_path / RESULTS_CSV)
    assert list(zip(saved["model"], saved["image_AUROC"], strict=True)) == [("PaDiM", 0.9)]
    assert "| PaDiM | bottle | 0.900 |" in (tmp_path / RESULTS_MD).read_text(encoding="utf-8")


def test_folder_dataset_layout_is_detected(tmp_path: Path) -> None:
    for directory in ("good", "crack", "scratch", "mask/crack", "mask/scratch"):
        (tmp_path / directory).mkdir(parents=True)
    entry = folder_dataset_entry(tmp_path)
    assert entry["class_path"] == "Folder"
    assert entry["init_args"]["normal_dir"] == "good"
    assert entry["init_args"]["abnormal_dir"] == ["crack", "scratch"]
    assert entry["init_args"]["mask_dir"] == ["mask/crack", "mask/scratch"]

    with pytest.raises(ProfileError, match="normal"):
        folder_dataset_entry(tmp_path / "crack")


def test_model_settings_come_from_the_preset_and_the_profile(tmp_path: Path) -> None:
    preset = tmp_path / "preset.yaml"
    preset.write_text(
        "model:\n  class_path: anomalib_mdps.models.Mdps\n  init_args: {image_size: [32, 32], max_epochs: 5}\n"
        "trainer: {max_epochs: 5, accelerator: auto}\n"
        "data:\n  class_path: MVTecAD\n  init_args: {root: elsewhere, train_batch_size: 4}\n",
        encoding="utf-8",
    )
    profile = {
        "name": "test",
        "datasets": {"bottle": {"class_path": "MVTecAD", "init_args": {"root": "../shared/data/mvtec_ad"}}},
        "models": {"Mdps": {"preset": str(preset), "init_args": {"max_epochs": 1}}},
    }
    (job,) = plan_jobs(profile, output_dir=tmp_path)
    model, dataset = job.model, job.dataset
    assert model["init_args"] == {"image_size": [32, 32], "max_epochs": 1}  # the profile refines the preset
    assert model["trainer"] == {"max_epochs": 5}  # the harness owns the accelerator
    assert model["data"] == {"train_batch_size": 4}  # the preset's dataset itself is not used
    assert Path(dataset["init_args"]["root"]) == (REPO_ROOT / "../shared/data/mvtec_ad").resolve()


def test_baselines_get_the_same_offline_imagenet_weights_as_the_plugins_backbone() -> None:
    import torch
    from anomalib.models.components import TimmFeatureExtractor

    from anomalib_mdps.components import FeatureExtractor
    from benchmarks.offline_weights import OfflineWeightsError, load_offline_backbone_weights

    baseline = TimmFeatureExtractor("tf_efficientnet_lite0", layers=["blocks.1", "blocks.2"], pre_trained=False)
    assert load_offline_backbone_weights(baseline) == ["tf_efficientnet_lite0"]
    ours = FeatureExtractor("tf_efficientnet_lite0", ("blocks.1", "blocks.2")).network.state_dict()
    theirs = baseline.feature_extractor.state_dict()
    assert set(theirs) <= set(ours)
    assert all(torch.equal(theirs[name], ours[name]) for name in theirs)
    with pytest.raises(OfflineWeightsError, match="resnet18"):
        load_offline_backbone_weights(TimmFeatureExtractor("resnet18", layers=["layer1"], pre_trained=False))


@pytest.mark.parametrize("profile_name", sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
def test_every_committed_profile_names_real_models_arguments_and_datasets(profile_name: str, tmp_path: Path) -> None:
    """A typo in a profile or a preset (a renamed argument, a model or dataset anomalib lacks) fails
    here, not an hour into a benchmark run.
    """
    import anomalib.data
    import anomalib.models
    from jsonargparse import ArgumentParser

    jobs = plan_jobs(load_profile(profile_name), output_dir=tmp_path)
    for model in {job.model["name"]: job.model for job in jobs}.values():
        model_class = getattr(anomalib.models, model["class_path"].rsplit(".", 1)[-1])
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(model_class, "model")  # what the CLI accepts, forwarded settings included
        unknown = sorted(set(model["init_args"]) - set(vars(parser.get_defaults().model)))
        assert not unknown, f"{profile_name}/{model['name']}: {model_class.__name__} takes no {unknown}"
    for dataset in (job.dataset for job in jobs):
        assert hasattr(anomalib.data, dataset["class_path"]), dataset["class_path"]


def test_per_image_times_leave_out_warm_up_images_and_divide_by_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import timing

    clock = iter(range(0, 100, 2))  # every reading 2 s after the last: each call takes 2 s
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    times = timing.PerImageTimes(warmup_images=2)
    outputs = [times.call(lambda x: x * 10, value, images=images) for value, images in ((1, 1), (2, 1), (3, 4))]
    assert outputs == [10, 20, 30]
    assert times.wall_ms == [500.0]  # the 4-image batch after the two warm-up images: 2 s / 4
    assert times.images == 6
    assert times.seconds == 6
    assert times.median_ms == 500.0


def test_ablation_refuses_weights_saved_by_another_layout_of_the_model() -> None:
    from anomalib_mdps.models.mdps import MdpsModel
    from benchmarks.mdps_ablation import load_denoiser

    settings = {key: value for key, value in TINY_MDPS.items() if key != "image_size"}
    trained = MdpsModel(**TINY_MDPS)
    saved = {"image_size": TINY_MDPS["image_size"], "state_dict": trained.state_dict()}
    loaded = load_denoiser(saved, settings)
    assert all(torch.equal(a, b) for a, b in zip(loaded.prior.parameters(), trained.prior.parameters(), strict=True))
    # The layout before the shared DiffusionPrior: the same tensors without the "prior." prefix.
    old_layout = {key.removeprefix("prior."): value for key, value in saved["state_dict"].items()}
    with pytest.raises(RuntimeError, match="does not fit MdpsModel"):
        load_denoiser({**saved, "state_dict": old_layout}, settings)


def test_an_ablation_row_with_fixed_weights_scores_with_them_on_weights_that_chose_others() -> None:
    from anomalib_mdps.models.mdps import MdpsModel
    from benchmarks.mdps_ablation import load_denoiser

    settings = {key: value for key, value in TINY_MDPS.items() if key != "image_size"}
    trained = MdpsModel(**TINY_MDPS)
    trained.fusion.copy_(torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))  # what training chose: no D̄
    saved = {"image_size": TINY_MDPS["image_size"], "state_dict": trained.state_dict()}
    alone = load_denoiser(saved, {**settings, "score_fusion": "fixed", "density_weight": 0, "score_density_weight": 0})
    assert torch.equal(alone.fusion, torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.equal(load_denoiser(saved, settings).fusion, trained.fusion)


def test_the_readme_block_is_rewritten_from_the_results_and_nothing_else(tmp_path: Path) -> None:
    from benchmarks.report import update_readme

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- benchmark table: cpu -->\nold table\n<!-- end of benchmark table -->\nrest\n")
    results = pd.DataFrame([
        {"model": "PaDiM", "dataset": "bottle", "image_AUROC": 0.9, "pixel_AUROC": 0.8, "inference_ms_per_image": 70.0},
        {"model": "Mdps", "dataset": "tire", "image_AUROC": 0.7, "pixel_AUROC": 0.6, "inference_ms_per_image": 1500.0},
    ])
    assert update_readme(readme, "cpu", results)
    text = readme.read_text()
    assert text.startswith("intro\n<!-- benchmark table: cpu -->\n| model | bottle | tire |") and text.endswith(
        "<!-- end of benchmark table -->\nrest\n")
    assert "| Mdps | – | 0.700 / 0.600 (1500 ms) |" in text and "old table" not in text
    assert not update_readme(readme, "gpu", results)  # no block for that profile: the file stays as it is
    assert readme.read_text() == text


def test_the_summary_gives_deployed_latency_and_mdps_over_padim_per_dataset() -> None:
    from benchmarks.report import summary_table

    row = {"image_AUROC": 0.9, "pixel_AUROC": 0.8}
    results = pd.DataFrame([
        {**row, "model": "PaDiM", "dataset": "bottle", "inference_ms_per_image": 50.0, "deployed_ms_per_image": 20.0},
        {**row, "model": "Mdps", "dataset": "bottle", "inference_ms_per_image": 150.0, "deployed_ms_per_image": 30.0},
        {**row, "model": "PaDiM", "dataset": "tire", "inference_ms_per_image": 40.0, "deployed_ms_per_image": None},
        {**row, "model": "Mdps", "dataset": "tire", "inference_ms_per_image": 100.0, "deployed_ms_per_image": None},
    ])
    table = summary_table(results)
    assert "| Mdps | 0.900 / 0.800 (150 ms; 30 ms deployed) | 0.900 / 0.800 (100 ms) |" in table
    assert table.splitlines()[-1] == "| Mdps ÷ PaDiM ms | 3.0× (1.5× deployed) | 2.5× |"


def test_score_terms_the_timed_pass_skipped_are_computed_in_a_second_pass(tiny_mdps_model) -> None:
    from types import SimpleNamespace

    from benchmarks.measurements import Measurements, complete_score_terms

    model = tiny_mdps_model()
    model.fusion.copy_(torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.5, 0.5]]))  # D̄ weighs nowhere: not sampled
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    batches = [SimpleNamespace(image=images[i : i + 1]) for i in range(3)]
    measured = Measurements(warmup_images=0)
    measured.score_terms = [model.reconstruct(batch.image).score_terms for batch in batches]
    assert torch.cat(measured.score_terms)[:, 0].isnan().all()
    module = SimpleNamespace(model=model, device=torch.device("cpu"), pre_processor=SimpleNamespace(transform=lambda x: x))
    complete_score_terms(module, SimpleNamespace(test_dataloader=lambda: batches), measured)
    torch.testing.assert_close(torch.cat(measured.score_terms), model.score_terms(model.terms(images)), rtol=1e-4, atol=1e-5)
