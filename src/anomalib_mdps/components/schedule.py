"""The DDPM noise schedule, taken from diffusers, with the indexing the papers use.

``alpha_bar[t]`` is ᾱ_t after ``t`` noising steps: ``alpha_bar[0] = 1`` (a clean image) and
``alpha_bar[t] = alphas_cumprod[t - 1]`` of diffusers' ``DDPMScheduler``. The denoiser for
level ``t`` is conditioned on diffusers' timestep index ``t - 1``, so training and sampling
use exactly diffusers' convention.
"""

import torch
from torch import nn


class NoiseSchedule(nn.Module):
    """ᾱ_t of a DDPM schedule (linear β from ``beta_start`` to ``beta_end`` by default)."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
    ) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
        )
        alpha_bar = torch.cat([torch.ones(1), scheduler.alphas_cumprod.float()])
        self.num_train_timesteps = num_train_timesteps
        self.register_buffer("alpha_bar", alpha_bar, persistent=False)

    @staticmethod
    def denoiser_timestep(t: int | torch.Tensor) -> int | torch.Tensor:
        """diffusers' timestep index that conditions the denoiser at noise level ``t`` (≥ 1)."""
        return t - 1

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t of eq. 3 at per-sample levels ``t`` (see ``forward_diffusion``)."""
        return forward_diffusion(x0, noise, self.alpha_bar[t].view(-1, *([1] * (x0.dim() - 1))))

    def training_draws(
        self, x0: torch.Tensor, max_level: int | None = None, generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Levels t uniform in {1, …, max_level} (default: the whole schedule, as the paper) and
        standard normal noise shaped like ``x0``, one of each per sample.

        A sampler that never starts above some T only needs the levels up to T, which a short
        training budget can favour.
        """
        high = self.num_train_timesteps if max_level is None else min(max_level, self.num_train_timesteps)
        levels = torch.randint(1, high + 1, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return levels, noise

    @staticmethod
    def regression_loss(predicted: torch.Tensor, target: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """‖target − ε_θ‖² of eq. 5, averaged over the batch.

        ``"sum"`` sums over an image's elements, as eq. 5 is written (and the authors' code). It
        keeps Adam's (coupled) weight decay at the size the paper's 5e-2 was chosen for; a
        per-element mean makes the loss gradient C·H·W times smaller, so the decay would dominate
        it. ``"mean"`` averages over the elements too.
        """
        if reduction == "mean":
            return nn.functional.mse_loss(predicted, target)
        if reduction == "sum":
            return (predicted - target).pow(2).flatten(1).sum(dim=1).mean()
        msg = f"reduction must be 'sum' or 'mean', got {reduction!r}."
        raise ValueError(msg)


def check_noise_level(level: int, num_train_timesteps: int, name: str = "noise_level") -> None:
    """Refuse a level the schedule does not have (levels run from 1 to ``num_train_timesteps``)."""
    if not 0 < level <= num_train_timesteps:
        msg = f"{name} must be in (0, {num_train_timesteps}], got {level}."
        raise ValueError(msg)


def forward_diffusion(x0: torch.Tensor, noise: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε: the forward diffusion of eq. 3 (MDPS Algorithm 1, line 2)."""
    return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * noise


def ddim_step_pairs(noise_level: int, num_steps: int) -> list[tuple[int, int]]:
    """The (t, s) pairs of Algorithm 1, line 4: t = T·n/N, s = T·(n-1)/N for n = N … 1."""
    if num_steps < 1 or noise_level < num_steps:
        msg = f"Need 1 <= num_steps <= noise_level, got num_steps={num_steps}, noise_level={noise_level}."
        raise ValueError(msg)
    levels = [round(noise_level * n / num_steps) for n in range(num_steps, -1, -1)]
    return list(zip(levels[:-1], levels[1:], strict=True))
