"""Algorithm 1 and its equations against their definitions and diffusers' DDIM."""

import pytest
import torch
from diffusers import DDIMScheduler

from anomalib_mdps.components import NoiseSchedule, ddim_step_pairs, forward_diffusion
from anomalib_mdps.models.mdps.sampler import (
    GUIDANCE_REFERENCE_ELEMENTS,
    Guidance,
    GuidanceNorm,
    ThresholdMode,
    anomalous_region_mask,
    ddim_step,
    guidance_objective,
    guided_epsilon,
    likelihood_gradient,
    masked_posterior_sampling,
)


def _toy_denoiser(x: torch.Tensor, timestep: int) -> torch.Tensor:
    """A smooth, input-dependent stand-in for ε_θ with a non-trivial Jacobian."""
    return torch.tanh(0.7 * x + 0.001 * timestep) + 0.1 * x.mean(dim=(1, 2, 3), keepdim=True)


@pytest.fixture
def schedule() -> NoiseSchedule:
    return NoiseSchedule()


def _inputs(batch: int = 2, steps: int = 5):
    generator = torch.Generator().manual_seed(0)
    y = torch.rand(batch, 3, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(steps + 1, batch, 3, 8, 8, generator=generator)
    return y, noise


def test_step_pairs_follow_algorithm_line_4() -> None:
    assert ddim_step_pairs(200, 10) == [(200 - 20 * i, 180 - 20 * i) for i in range(10)]
    with pytest.raises(ValueError, match="num_steps"):
        ddim_step_pairs(5, 10)


@pytest.mark.parametrize("guidance", list(Guidance))
def test_empty_mask_reproduces_the_observation(schedule: NoiseSchedule, guidance: Guidance) -> None:
    y, noise = _inputs()
    x0 = masked_posterior_sampling(
        _toy_denoiser, schedule.alpha_bar, y, torch.zeros_like(y[:, :1]), noise,
        noise_level=100, num_steps=5, guidance=guidance,
    )
    torch.testing.assert_close(x0, y, atol=1e-5, rtol=0)


def test_unguided_full_mask_is_plain_ddim_from_the_noised_input(schedule: NoiseSchedule) -> None:
    y, noise = _inputs()
    x0 = masked_posterior_sampling(
        _toy_denoiser, schedule.alpha_bar, y, torch.ones_like(y[:, :1]), noise,
        noise_level=100, num_steps=5, guidance_scale=0.0, eta=1.0,
    )
    reference = DDIMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, set_alpha_to_one=True, clip_sample=False,
    )
    reference.set_timesteps(50)  # 1000 // 50 = 20 levels per step, as T / N = 100 / 5
    x = forward_diffusion(y, noise[0], schedule.alpha_bar[100])
    for step, timestep in enumerate(range(99, 0, -20), start=1):
        epsilon = _toy_denoiser(x, timestep)
        x = reference.step(epsilon, timestep, x, eta=1.0, variance_noise=noise[step]).prev_sample
    torch.testing.assert_close(x0, x, atol=1e-5, rtol=1e-5)


def test_ddim_step_with_zero_eta_is_deterministic(schedule: NoiseSchedule) -> None:
    y, noise = _inputs()
    a, b = schedule.alpha_bar[100], schedule.alpha_bar[80]
    first = ddim_step(y, noise[0], a, b, 0.0, noise[1])
    second = ddim_step(y, noise[0], a, b, 0.0, noise[2])
    torch.testing.assert_close(first, second)


def test_guidance_pulls_the_anomalous_region_towards_the_observation(schedule: NoiseSchedule) -> None:
    y, noise = _inputs()
    mask = torch.ones_like(y[:, :1])
    kwargs = {"noise_level": 100, "num_steps": 5}
    free = masked_posterior_sampling(_toy_denoiser, schedule.alpha_bar, y, mask, noise, guidance_scale=0.0, **kwargs)
    for guidance in Guidance:
        guided = masked_posterior_sampling(
            _toy_denoiser, schedule.alpha_bar, y, mask, noise, guidance_scale=5.0, guidance=guidance, **kwargs,
        )
        assert (guided - y).norm() < (free - y).norm()


def test_guidance_gradient_is_per_sample(schedule: NoiseSchedule) -> None:
    y, noise = _inputs(batch=3)
    mask = torch.ones_like(y[:, :1])
    kwargs = {"noise_level": 100, "num_steps": 5, "guidance_scale": 10.0}
    together = masked_posterior_sampling(_toy_denoiser_per_sample, schedule.alpha_bar, y, mask, noise, **kwargs)
    alone = masked_posterior_sampling(_toy_denoiser_per_sample, schedule.alpha_bar, y[1:2], mask[1:2], noise[:, 1:2], **kwargs)
    torch.testing.assert_close(together[1:2], alone, atol=1e-6, rtol=1e-6)


def _toy_denoiser_per_sample(x: torch.Tensor, timestep: int) -> torch.Tensor:
    return torch.tanh(0.7 * x + 0.001 * timestep) + 0.1 * x.mean(dim=(1, 2, 3), keepdim=True)


def test_dps_guidance_refuses_inference_mode(schedule: NoiseSchedule) -> None:
    y, noise = _inputs()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="jacobian_free"):
        masked_posterior_sampling(
            _toy_denoiser, schedule.alpha_bar, y, torch.ones_like(y[:, :1]), noise, noise_level=100, num_steps=5,
        )


def test_mask_threshold_is_per_image_by_default() -> None:
    low = torch.linspace(0, 1, 16).view(1, 1, 4, 4)
    maps = torch.cat([low, 10 * low])
    mask = anomalous_region_mask(maps, 0.5)
    torch.testing.assert_close(mask[0], mask[1])
    assert mask[0].sum() == 8  # values above the mid-range of each image
    batch_mask = anomalous_region_mask(maps, 0.5, ThresholdMode.BATCH)
    assert batch_mask[0].sum() == 0 and batch_mask[1].sum() == 8


# ------------------------------------------------------------------ guidance calibration
def _pull(residual: torch.Tensor, region: torch.Tensor, norm: GuidanceNorm) -> torch.Tensor:
    """∂L/∂r by autograd: the per-pixel pull of eq. 16 before ρ·√(1-ᾱ_t)/√ᾱ_t."""
    r = residual.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(guidance_objective(region * r, region, norm).sum(), r)
    return gradient


@pytest.mark.parametrize("norm", list(GuidanceNorm))
def test_guidance_pull_is_the_same_at_64_and_128_px(norm: GuidanceNorm) -> None:
    pattern = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) - 0.5
    large = pattern.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)  # the same residual at 128 px
    pull_64 = _pull(pattern, torch.ones(1, 1, 64, 64), norm)
    pull_128 = _pull(large, torch.ones(1, 1, 128, 128), norm)
    torch.testing.assert_close(pull_128[..., ::2, ::2], pull_64, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("norm", list(GuidanceNorm))
def test_guidance_pull_does_not_depend_on_the_mask_area(norm: GuidanceNorm) -> None:
    residual = torch.full((1, 3, 64, 64), 0.2)
    small = torch.zeros(1, 1, 64, 64)
    small[..., :14, :14] = 1  # about 5 % of the image
    large = torch.zeros(1, 1, 64, 64)
    large[..., :32, :] = 1  # half of it
    pull_small = _pull(residual, small, norm)[..., :14, :14]
    pull_large = _pull(residual, large, norm)[..., :14, :14]
    torch.testing.assert_close(pull_small, pull_large, rtol=1e-4, atol=1e-7)


def test_plain_guidance_at_256_px_with_a_full_mask_is_the_plain_norm() -> None:
    residual = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(4)) - 0.5
    region = torch.ones(2, 1, 256, 256)
    torch.testing.assert_close(
        guidance_objective(residual, region, GuidanceNorm.PLAIN), residual.flatten(1).norm(dim=1), rtol=1e-5, atol=0,
    )
    torch.testing.assert_close(
        guidance_objective(residual, region, GuidanceNorm.SQUARED), residual.flatten(1).pow(2).sum(dim=1),
        rtol=1e-5, atol=0,
    )
    assert GUIDANCE_REFERENCE_ELEMENTS == 3 * 256 * 256


@pytest.mark.parametrize("norm", list(GuidanceNorm))
def test_jacobian_free_equals_dps_when_epsilon_does_not_depend_on_x(schedule: NoiseSchedule, norm: GuidanceNorm) -> None:
    y, noise = _inputs()
    fixed = noise[1]

    def constant_denoiser(x: torch.Tensor, timestep: int) -> torch.Tensor:
        del timestep
        return fixed + 0 * x  # ∂x̂0/∂x_t is then exactly I/√ᾱ_t

    mask = torch.zeros_like(y[:, :1])
    mask[..., 2:6, 1:5] = 1
    x_t = forward_diffusion(y, noise[0], schedule.alpha_bar[100])
    _, dps = likelihood_gradient(constant_denoiser, x_t, 99, y, schedule.alpha_bar[100], mask, Guidance.DPS, norm)
    _, free = likelihood_gradient(
        constant_denoiser, x_t, 99, y, schedule.alpha_bar[100], mask, Guidance.JACOBIAN_FREE, norm,
    )
    assert dps.abs().max() > 0
    torch.testing.assert_close(free, dps, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("guidance", list(Guidance))
def test_masked_guidance_ignores_the_residual_outside_the_mask(schedule: NoiseSchedule, guidance: Guidance) -> None:
    """With a pixel-wise denoiser, what happens inside the mask depends on y inside the mask only."""
    y, noise = _inputs(batch=1, steps=4)
    elsewhere = y.clone()
    elsewhere[..., 4:] = -elsewhere[..., 4:]
    mask = torch.zeros_like(y[:, :1])
    mask[..., :4] = 1

    def pixelwise_denoiser(x: torch.Tensor, timestep: int) -> torch.Tensor:
        return torch.tanh(0.7 * x + 0.001 * timestep)

    def inside(observation: torch.Tensor, masked: bool) -> torch.Tensor:
        x0 = masked_posterior_sampling(
            pixelwise_denoiser, schedule.alpha_bar, observation, mask, noise, noise_level=100, num_steps=4,
            guidance_scale=2000.0, guidance=guidance, masked_guidance=masked,
        )
        return x0[..., :4]

    torch.testing.assert_close(inside(y, masked=True), inside(elsewhere, masked=True), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(inside(y, masked=False), inside(elsewhere, masked=False), rtol=1e-3, atol=1e-4)


def test_eq_16_scales_the_gradient_by_rho_and_the_noise_level() -> None:
    prior, gradient = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    alpha_bar = torch.tensor(0.64)
    torch.testing.assert_close(guided_epsilon(prior, gradient, alpha_bar, 5.0), prior + 5.0 * 0.6 * gradient)


def test_eq_20_threshold_adds_lambda_of_the_range_to_the_minimum() -> None:
    maps = torch.linspace(0, 1, 16).view(1, 1, 4, 4) + 3.0  # minimum 3: the "min +" term matters
    mask = anomalous_region_mask(maps, 0.5)
    assert mask.sum() == 8
    torch.testing.assert_close(mask, (maps > 3.5).float())


def test_normal_threshold_mode_uses_the_normal_level_alone() -> None:
    maps = torch.cat([torch.linspace(0, 1, 16).view(1, 1, 4, 4), 10 * torch.linspace(0, 1, 16).view(1, 1, 4, 4)])
    mask = anomalous_region_mask(maps, 0.5, ThresholdMode.NORMAL, torch.tensor(0.9))
    assert mask[0].sum() == 2  # only 14/15 and 1 of the first image pass 0.9
    assert mask[1].sum() == 14  # every value of the second from 1.33 on
    with pytest.raises(ValueError, match="normal"):
        anomalous_region_mask(maps, 0.5, ThresholdMode.NORMAL)
