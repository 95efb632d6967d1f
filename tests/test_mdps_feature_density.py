"""The feature density that Mdps may add to its map: its Gaussian, its training and its place in the map."""

import pytest
import torch

from anomalib_mdps.components import FeatureDensity
from conftest import TINY_MDPS


def _normal_embeddings(count: int, generator: torch.Generator, spread: float = 0.05) -> torch.Tensor:
    """(count, 5, 3, 4): a different mean per location, correlated channels."""
    pattern = torch.arange(60.0).view(1, 5, 3, 4) / 10
    mixing = torch.randn(5, 5, generator=generator)
    noise = torch.einsum("dc,bchw->bdhw", mixing, torch.randn(count, 5, 3, 4, generator=generator))
    return pattern + spread * noise


def test_streamed_gaussian_matches_anomalibs_multivariate_gaussian() -> None:
    from anomalib.models.components.stats import MultiVariateGaussian

    embeddings = _normal_embeddings(40, torch.Generator().manual_seed(0), spread=0.3)
    density = FeatureDensity(channels=5, dims=5)
    for chunk in embeddings.split(7):
        density.accumulate(chunk)
    density.fit()
    mean, inv_covariance = MultiVariateGaussian().fit(embeddings)
    torch.testing.assert_close(density.mean, mean, rtol=1e-4, atol=1e-5)
    # anomalib adds a further 1e-5 to the diagonal; the inverses agree to about that.
    torch.testing.assert_close(density.inv_covariance, inv_covariance, rtol=1e-3, atol=1e-3)
    probe = _normal_embeddings(3, torch.Generator().manual_seed(1), spread=0.3)
    # The Mahalanobis distance at one location, written out, against the whole map.
    delta = probe[:, :, 2, 1] - mean[:, 2 * 4 + 1]
    expected = torch.einsum("bc,cd,bd->b", delta, inv_covariance[2 * 4 + 1], delta).sqrt()
    torch.testing.assert_close(density.distance(probe)[:, 0, 2, 1], expected, rtol=1e-3, atol=1e-4)


def test_distance_is_highest_where_features_leave_their_normal_range() -> None:
    generator = torch.Generator().manual_seed(2)
    density = FeatureDensity(channels=5, dims=5)
    density.accumulate(_normal_embeddings(50, generator))
    density.fit()
    probe = _normal_embeddings(1, generator)
    # Location (1, 2) gets location (0, 0)'s typical features: ordinary values, at the wrong place.
    probe[0, :, 1, 2] = torch.arange(60.0).view(5, 3, 4)[:, 0, 0] / 10
    distance = density.distance(probe)[0, 0]
    assert divmod(int(distance.argmax()), 4) == (1, 2)


def test_distance_refuses_features_of_another_grid() -> None:
    density = FeatureDensity(channels=5, dims=5)
    density.accumulate(_normal_embeddings(4, torch.Generator().manual_seed(3)))
    density.fit()
    with pytest.raises(ValueError, match="feature grid"):
        density.distance(torch.rand(1, 5, 6, 4))


def test_density_is_added_to_the_map_and_to_the_image_score_each_with_its_own_weight(tiny_mdps_model) -> None:
    from anomalib_mdps.components import top_k_mean_score

    with_density = tiny_mdps_model(density_weight=2.0, score_density_weight=5.0, score_fusion="fixed")
    without = tiny_mdps_model(density_weight=0.0, score_density_weight=0.0, score_fusion="fixed")
    without.load_state_dict(with_density.state_dict())
    # The fusion weights are part of the state (an auto model's are chosen while it trains): keep its own.
    without.fusion.copy_(without.fixed_fusion())
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    combined, alone = with_density.reconstruct(images), without.reconstruct(images)
    density_map = with_density.density_map(images, (32, 32))
    assert density_map.abs().max() > 0.1
    torch.testing.assert_close(combined.anomaly_map, alone.anomaly_map + 2.0 * density_map, rtol=1e-4, atol=1e-4)
    score_map = alone.anomaly_map + 5.0 * density_map
    torch.testing.assert_close(combined.pred_score, top_k_mean_score(score_map, with_density.top_k), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(combined.pred_score, top_k_mean_score(combined.anomaly_map, with_density.top_k), rtol=1e-3)
    # Standardised location by location on the normal images it was calibrated on, before the blur:
    # mean 0 at every location, spread 1 wherever it is above the floor and below 1 where floored.
    normal = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))  # the fixture's calibration images
    distance = with_density._density_distance(normal, (32, 32))
    assert with_density.density_scale.shape == (2, 32, 32)
    standardised = (distance - with_density.density_scale[0]) / with_density.density_scale[1]
    spread = standardised.std(dim=0)
    assert standardised.mean(dim=0).abs().max() < 1e-4
    assert spread.max() < 1 + 1e-4 and (spread - 1).abs().min() < 1e-4


def test_per_location_statistics_weigh_a_deviation_by_its_locations_normal_spread() -> None:
    from anomalib_mdps.models.mdps.torch_model import (
        DENSITY_SPREAD_FLOOR,
        DensityStatistics,
        normal_density_statistics,
    )

    generator = torch.Generator().manual_seed(9)
    # Held-out normal distances: 3 around a mean of 5 at the left border column, 1 around 2 inside,
    # and one location that never varies.
    spread = torch.ones(1, 1, 4, 6)
    spread[..., 0] = 3.0
    distances = 2 + 3 * (spread > 1) + spread * torch.randn(64, 1, 4, 6, generator=generator)
    distances[:, :, 3, 5] = 2.0
    mean, local = normal_density_statistics(distances, DensityStatistics.PER_LOCATION)
    torch.testing.assert_close(mean, distances.mean(dim=0)[0])
    assert local[:, 0].min() > 2.2 and local[:, 1:5].max() < 1.35  # each location's own spread
    assert local[3, 5] == pytest.approx(DENSITY_SPREAD_FLOOR * float(distances.std()))
    # A border value 3 above its normal mean ranks with an inside value 1 above its mean.
    probe = mean.clone()
    probe[1, 0] += 3.0
    probe[1, 3] += 1.0
    standardised = (probe - mean) / local
    assert standardised[1, 0] == pytest.approx(float(standardised[1, 3]), rel=0.35)
    # Global statistics: one mean and spread for the whole map.
    mean_all, spread_all = normal_density_statistics(distances, DensityStatistics.GLOBAL)
    assert mean_all.shape == () and spread_all == pytest.approx(float(distances.std()))
    # One image gives no spread per location: the global statistics stand in.
    assert normal_density_statistics(distances[:1], DensityStatistics.PER_LOCATION).shape == (2,)


def test_weights_calibrated_with_one_global_density_statistic_still_load(tiny_mdps_model) -> None:
    per_location = tiny_mdps_model()
    state = per_location.state_dict()
    state["density_scale"] = torch.tensor([1.5, 2.0])  # saved before the statistics were per location
    older = tiny_mdps_model()
    older.load_state_dict(state)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    distance = older._density_distance(images, (32, 32))
    torch.testing.assert_close(older.density_map(images, (32, 32)), older.blur((distance - 1.5) / 2.0))


def test_training_fits_the_density_on_the_training_images_without_the_held_out_ones(tmp_path) -> None:  # noqa: ANN001
    from anomalib.data import Folder
    from anomalib.engine import Engine

    from anomalib_mdps.models import Mdps
    from anomalib_mdps.models.calibration import image_key
    from test_bad_input import _folder_dataset

    root = _folder_dataset(tmp_path / "parts", (32, 32), normal=6, defective=2)
    datamodule = Folder(name="parts", root=root, normal_dir="good", abnormal_dir="defect", train_batch_size=4,
                        eval_batch_size=4, num_workers=0)
    model = Mdps(**{**TINY_MDPS, "image_size": (32, 32)}, max_epochs=2, calibration_images=2, visualizer=False)
    Engine(default_root_dir=tmp_path / "results", logger=False, enable_progress_bar=False).fit(model, datamodule=datamodule)
    density = model.model.feature_density
    assert density.fitted and not density.accumulating
    transform = model.pre_processor.transform
    trained_on = [
        transform(item.image) for item in datamodule.train_data if image_key(item.image_path) not in model.calibration.keys
    ]
    # Two calibration images first; selection images only as far as half of the training images allow.
    held_out = len(model.calibration.keys)
    assert len(model.calibration.calibration_keys) == 2 and held_out <= len(datamodule.train_data) // 2
    assert len(trained_on) == len(datamodule.train_data) - held_out
    with torch.no_grad():
        embeddings = density.embedding(model.model.features(torch.stack(trained_on)))
    torch.testing.assert_close(density.mean, embeddings.flatten(2).mean(0), rtol=1e-4, atol=1e-5)
    # Calibrated after the fit, on the two held-out images: a mean and spread per location.
    assert model.model.density_scale.shape == (2, 32, 32) and not torch.all(model.model.density_scale[1] == 1.0)


@pytest.mark.slow
def test_density_sees_the_input_at_full_size_while_the_denoiser_sees_it_box_filtered(tiny_mdps_model) -> None:
    model = tiny_mdps_model(input_scale=2, image_size=(32, 32))
    assert model.full_size == (64, 64)
    generator = torch.Generator().manual_seed(8)
    images = torch.rand(1, 3, 64, 64, generator=generator) * 0.5 + 0.25
    # A fine checkerboard in one corner: the 2 x 2 box filter averages it away, the density does not.
    checker = (torch.arange(64).view(-1, 1) + torch.arange(64)) % 2 * 0.4 - 0.2
    textured = images.clone()
    textured[..., :24, :24] += checker[:24, :24]
    torch.testing.assert_close(model._checked(textured)[0], model._checked(images)[0])
    plain, marked = model.reconstruct(images), model.reconstruct(textured)
    assert plain.anomaly_map.shape[-2:] == (64, 64)
    change = (marked.anomaly_map - plain.anomaly_map)[0, 0]
    assert change[:24, :24].mean() > 5 * change[40:, 40:].abs().mean()
    without_density = tiny_mdps_model(input_scale=2, image_size=(32, 32), density_weight=0.0)
    torch.testing.assert_close(without_density.reconstruct(textured).anomaly_map,
                               without_density.reconstruct(images).anomaly_map)
    with pytest.raises(ValueError, match="input_scale"):
        model.reconstruct(torch.rand(1, 3, 63, 64))
