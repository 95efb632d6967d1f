"""The diffusion prior p(x0) every model of the plugin learns: a DDPM schedule, a seeded ε-denoiser
and its exponential moving average (the denoiser the models sample and score with).
"""

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .denoiser import build_unet, exponential_moving_average
from .schedule import NoiseSchedule

# ε_θ(x_t, timestep) with diffusers' timestep index (level − 1), see ``NoiseSchedule``.
Denoiser = Callable[[torch.Tensor, int | torch.Tensor], torch.Tensor]
# (x0, noise, levels) -> (denoiser input x_t, regression target): what ``training_loss`` fits.
TrainingTarget = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class DiffusionPrior(nn.Module):
    """p(x0) as a DDPM: ``schedule`` (ᾱ by level), ``denoiser`` (trained) and ``ema_denoiser``.

    Args:
        sample_size: (height, width) of the denoiser's input (its UNet is convolutional, so other
            sizes that pass its downsampling work too).
        channels: channels of x0 (3 for images, the feature channels for InvAD).
        unet_channels, layers_per_block, attention_levels: the UNet (see ``build_unet``).
        num_train_timesteps, beta_start, beta_end: the linear-β DDPM schedule.
        ema_decay: decay of the EMA copy.
        seed: seed of the denoiser's initialisation, independent of the global generator.
    """

    def __init__(
        self,
        sample_size: Sequence[int],
        channels: int,
        unet_channels: Sequence[int],
        layers_per_block: int = 1,
        attention_levels: Sequence[bool] | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        ema_decay: float = 0.995,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.schedule = NoiseSchedule(num_train_timesteps, beta_start, beta_end)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.denoiser = build_unet(tuple(sample_size), channels, unet_channels, layers_per_block, attention_levels)
        self.ema_denoiser = exponential_moving_average(self.denoiser, ema_decay)
        self.ema_denoiser.requires_grad_(False)

    @property
    def alpha_bar(self) -> torch.Tensor:
        return self.schedule.alpha_bar

    @property
    def sampling_denoiser(self) -> nn.Module:
        """The EMA denoiser, which sampling and scoring use."""
        return self.ema_denoiser.module

    def update_ema(self) -> None:
        self.ema_denoiser.update_parameters(self.denoiser)

    def training_loss(
        self,
        x0: torch.Tensor,
        max_level: int | None = None,
        generator: torch.Generator | None = None,
        reduction: str = "sum",
        target: TrainingTarget | None = None,
    ) -> torch.Tensor:
        """The denoiser's regression loss (eq. 5 of MDPS) on clean ``x0``, levels uniform in {1, …, max_level}.

        ``target`` (default: x_t of eq. 3 and its noise ε, plain ε-prediction) lets a model fit
        another ε, e.g. one that leads back to a different clean image. ``reduction``: see
        ``NoiseSchedule.regression_loss``.
        """
        levels, noise = self.schedule.training_draws(x0, max_level, generator)
        x_t, wanted = (target or self._epsilon_target)(x0, noise, levels)
        predicted = self.denoiser(x_t, self.schedule.denoiser_timestep(levels))
        return self.schedule.regression_loss(predicted, wanted, reduction)

    def _epsilon_target(
        self, x0: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.schedule.add_noise(x0, noise, levels), noise
