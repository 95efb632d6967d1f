"""The shared diffusion prior: eq. 5's loss, diffusers' noising convention, pluggable targets, seeding."""

import pytest
import torch
from torch import nn

from anomalib_mdps.components import DiffusionPrior
from anomalib_mdps.models.mdps.sampler import observation_epsilon


class RecordingDenoiser(nn.Module):
    """Remembers its input and returns a smooth, input-dependent ε."""

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        self.x_t, self.timestep = x, timestep
        return 0.5 * x + 0.01 * timestep.view(-1, 1, 1, 1)


@pytest.fixture
def prior() -> DiffusionPrior:
    prior = DiffusionPrior((8, 8), 3, unet_channels=(32,), seed=0)
    prior.denoiser = RecordingDenoiser()
    return prior


def _x0() -> torch.Tensor:
    return torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1


def test_training_loss_sums_over_pixels_as_eq_5(prior: DiffusionPrior) -> None:
    summed = prior.training_loss(_x0(), generator=torch.Generator().manual_seed(0))
    mean = prior.training_loss(_x0(), generator=torch.Generator().manual_seed(0), reduction="mean")
    torch.testing.assert_close(summed, mean * 3 * 8 * 8, rtol=1e-5, atol=0)


def test_training_input_at_level_t_is_diffusers_add_noise_at_index_t_minus_1(prior: DiffusionPrior) -> None:
    from diffusers import DDPMScheduler

    x0 = _x0()
    prior.training_loss(x0, generator=torch.Generator().manual_seed(9))
    replay = torch.Generator().manual_seed(9)
    levels = torch.randint(1, 1001, (4,), generator=replay)
    noise = torch.randn(x0.shape, generator=replay)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    torch.testing.assert_close(prior.denoiser.timestep, levels - 1)
    torch.testing.assert_close(prior.denoiser.x_t, scheduler.add_noise(x0, noise, levels - 1), rtol=1e-5, atol=1e-6)


def test_a_target_leading_back_to_x0_is_plain_epsilon_prediction(prior: DiffusionPrior) -> None:
    """Eq. 10's ε of the clean image, at x_t of eq. 3, is the noise that made x_t."""

    def back_to(clean: torch.Tensor):  # noqa: ANN202
        def target(x0: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x_t = prior.schedule.add_noise(x0, noise, levels)
            return x_t, observation_epsilon(x_t, clean, prior.alpha_bar[levels].view(-1, 1, 1, 1))

        return target

    x0 = _x0()
    plain = prior.training_loss(x0, max_level=300, generator=torch.Generator().manual_seed(1))
    same = prior.training_loss(x0, max_level=300, generator=torch.Generator().manual_seed(1), target=back_to(x0))
    other = prior.training_loss(x0, max_level=300, generator=torch.Generator().manual_seed(1), target=back_to(-x0))
    torch.testing.assert_close(same, plain, rtol=1e-4, atol=0)
    assert other > 1.5 * plain


def test_the_denoiser_is_seeded_without_touching_the_global_generator() -> None:
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    first = DiffusionPrior((8, 8), 3, unet_channels=(32,), seed=7)
    assert torch.rand(1) == expected_next
    second = DiffusionPrior((8, 8), 3, unet_channels=(32,), seed=7)
    other = DiffusionPrior((8, 8), 3, unet_channels=(32,), seed=8)
    weights = [dict(prior.denoiser.state_dict()) for prior in (first, second, other)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert not all(torch.equal(weights[0][name], weights[2][name]) for name in weights[0])


def test_the_ema_follows_the_denoiser_and_sampling_uses_it() -> None:
    prior = DiffusionPrior((8, 8), 3, unet_channels=(32,), ema_decay=0.9)
    prior.update_ema()  # the first update copies
    with torch.no_grad():
        for parameter in prior.denoiser.parameters():
            parameter.add_(1.0)
    before = [p.clone() for p in prior.sampling_denoiser.parameters()]
    prior.update_ema()
    for old, new, target in zip(before, prior.sampling_denoiser.parameters(), prior.denoiser.parameters(), strict=True):
        torch.testing.assert_close(new, old + 0.1 * (target - old))
    assert prior.sampling_denoiser is prior.ema_denoiser.module
    assert not any(p.requires_grad for p in prior.ema_denoiser.parameters())


@pytest.mark.parametrize("level", [0, 1001])
def test_both_models_refuse_a_noise_level_the_schedule_lacks(level: int) -> None:
    from anomalib_mdps.models.invad import InvADModel
    from anomalib_mdps.models.mdps import MdpsModel

    for model in (MdpsModel, InvADModel):
        with pytest.raises(ValueError, match=r"noise_level must be in \(0, 1000\]"):
            model(noise_level=level)
