"""GLAD: the anomaly-aware target, the adaptive sampler against plain DDIM, per-image locking, SAFF,
the nearest-neighbour distance, and the model end to end.
"""

import pytest
import torch
from diffusers import DDIMScheduler

from anomalib_mdps.components import NoiseSchedule, forward_diffusion, predicted_clean_image
from anomalib_mdps.models.glad.sampler import (
    adaptive_reconstruction,
    anomaly_aware_pair,
    nearest_neighbour_distance,
    spatially_adaptive_fusion,
)


def _toy_denoiser(x: torch.Tensor, timestep: int) -> torch.Tensor:
    """A smooth, per-sample stand-in for ε_θ."""
    return torch.tanh(0.7 * x + 0.001 * timestep)


@pytest.fixture
def schedule() -> NoiseSchedule:
    return NoiseSchedule()


def _images(batch: int = 3) -> torch.Tensor:
    return torch.rand(batch, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _constant_map(value: float):  # noqa: ANN202
    return lambda a, b: torch.full_like(a[:, :1], value)


def _plain_ddim(y: torch.Tensor, noise: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Deterministic DDIM from y noised to level 200, 5 steps, by diffusers' scheduler."""
    reference = DDIMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, set_alpha_to_one=True, clip_sample=False,
    )
    reference.set_timesteps(25)  # 1000 // 25 = 40 levels per step, as 200 / 5
    x = forward_diffusion(y, noise, schedule.alpha_bar[200])
    for timestep in range(199, 0, -40):
        x = reference.step(_toy_denoiser(x, timestep), timestep, x, eta=0.0).prev_sample
    return x


def test_the_training_target_leads_back_to_the_normal_image(schedule: NoiseSchedule) -> None:
    normal, anomalous = _images(), _images().flip(-1)
    noise = torch.randn(normal.shape, generator=torch.Generator().manual_seed(1))
    levels = torch.tensor([10, 500, 990])
    x_t, target = anomaly_aware_pair(normal, anomalous, noise, levels, schedule.alpha_bar, 1000)
    x0 = predicted_clean_image(x_t, target, schedule.alpha_bar[levels].view(-1, 1, 1, 1))
    torch.testing.assert_close(x0, normal, atol=1e-4, rtol=1e-4)
    # The input is the anomalous image's in proportion t/T: barely at level 10, mostly at 990.
    share = levels / 1000
    mixed = share.view(-1, 1, 1, 1) * anomalous + (1 - share.view(-1, 1, 1, 1)) * normal
    torch.testing.assert_close(x_t, forward_diffusion(mixed, noise, schedule.alpha_bar[levels].view(-1, 1, 1, 1)))
    # With no anomaly the target is the noise itself: plain ε-prediction.
    _, plain = anomaly_aware_pair(normal, normal, noise, levels, schedule.alpha_bar, 1000)
    torch.testing.assert_close(plain, noise, atol=1e-4, rtol=1e-4)


def test_never_locking_is_plain_ddim(schedule: NoiseSchedule) -> None:
    """τ = ∞ and t_min = 0: no image ever locks, every step is plain DDIM of the noised input."""
    y = _images()
    noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    result = adaptive_reconstruction(
        _toy_denoiser, schedule.alpha_bar, y, noise, _constant_map(0.3),
        start_level=200, num_steps=5, lock_distance=float("inf"), min_level=0, top_k=4,
    )
    torch.testing.assert_close(result.sample, _plain_ddim(y, noise, schedule), atol=1e-5, rtol=1e-5)
    assert result.lock_level.tolist() == [0, 0, 0]
    torch.testing.assert_close(result.distances, torch.full((3, 5), 0.3))


@pytest.mark.parametrize(
    ("lock_distance", "weight_map"),
    [
        pytest.param(float("inf"), 0.3, id="tau=inf: the input's view, W unused"),
        pytest.param(-1.0, float("-inf"), id="tau exceeded with W=0"),
        pytest.param(-1.0, float("inf"), id="tau exceeded with W=1"),
    ],
)
def test_locking_at_the_first_step_is_plain_ddim(schedule: NoiseSchedule, lock_distance: float, weight_map: float) -> None:
    """At T_max the trajectory is y noised with the same noise: both views of x̂0, and so any fusion of
    them, coincide, and the sampler is plain DDIM from the noised input.
    """
    y = _images()
    noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    distance_map = _constant_map(weight_map)
    result = adaptive_reconstruction(
        _toy_denoiser, schedule.alpha_bar, y, noise, distance_map,
        start_level=200, num_steps=5, lock_distance=lock_distance, min_level=201, top_k=4,
    )
    torch.testing.assert_close(result.sample, _plain_ddim(y, noise, schedule), atol=1e-5, rtol=1e-5)
    assert result.lock_level.tolist() == [200, 200, 200]


def test_a_late_lock_on_the_input_view_keeps_more_of_the_input(schedule: NoiseSchedule) -> None:
    y = _images()
    noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    common = {"start_level": 200, "num_steps": 5, "lock_distance": float("inf"), "top_k": 4}
    plain = adaptive_reconstruction(_toy_denoiser, schedule.alpha_bar, y, noise, _constant_map(0.3), min_level=0, **common)
    locked = adaptive_reconstruction(_toy_denoiser, schedule.alpha_bar, y, noise, _constant_map(0.3), min_level=100, **common)
    assert locked.lock_level.tolist() == [80, 80, 80]
    assert (locked.sample - y).abs().mean() < 0.5 * (plain.sample - y).abs().mean()


def test_each_image_locks_on_its_own_distance_whatever_its_batch(schedule: NoiseSchedule) -> None:
    y = _images(4) * torch.tensor([0.1, 0.4, 0.7, 1.0]).view(-1, 1, 1, 1)
    noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))

    def distance(x0_input: torch.Tensor, x0_prior: torch.Tensor) -> torch.Tensor:
        return (x0_input - x0_prior).abs().mean(dim=1, keepdim=True)

    common = {"start_level": 600, "num_steps": 6, "min_level": 100, "top_k": 4}
    together = adaptive_reconstruction(_toy_denoiser, schedule.alpha_bar, y, noise, distance, lock_distance=3.0, **common)
    assert len(set(together.lock_level.tolist())) > 1, "the test needs images that lock at different steps"
    for index in range(4):
        alone = adaptive_reconstruction(
            _toy_denoiser, schedule.alpha_bar, y[index : index + 1], noise[index : index + 1], distance,
            lock_distance=3.0, **common,
        )
        assert alone.lock_level.item() == together.lock_level[index].item()
        torch.testing.assert_close(alone.sample[0], together.sample[index], atol=1e-5, rtol=1e-5)
        # Distances are recorded until the lock, NaN after it.
        steps_run = int((~alone.distances[0].isnan()).sum())
        assert steps_run == [600, 500, 400, 300, 200, 100].index(alone.lock_level.item()) + 1


def test_saff_reduces_to_its_two_inputs() -> None:
    prior, observed = _images(), _images().flip(-1)
    torch.testing.assert_close(spatially_adaptive_fusion(prior, observed, torch.ones_like(prior[:, :1])), prior)
    torch.testing.assert_close(spatially_adaptive_fusion(prior, observed, torch.zeros_like(prior[:, :1])), observed)
    half = spatially_adaptive_fusion(prior, observed, torch.full_like(prior[:, :1], 0.5))
    torch.testing.assert_close(half, (prior + observed) / 2)


def test_nearest_neighbour_distance_forgives_shifts_but_not_new_content() -> None:
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(1, 16, 6, 6, generator=generator)
    shifted = torch.roll(features, shifts=(2, 1), dims=(2, 3))
    assert nearest_neighbour_distance([features], [shifted], (12, 12)).abs().max() < 1e-5
    anomalous = features.clone()
    anomalous[:, :, 3, 3] = torch.randn(16, generator=generator)
    distance = nearest_neighbour_distance([anomalous], [features], (6, 6))
    assert distance[0, 0, 3, 3] > 0.2
    assert distance[0, 0].flatten().argmax().item() == 3 * 6 + 3
