"""Masked diffusion posterior sampling (MDPS, Algorithm 1) as plain functions.

Every function is stateless. Randomness enters only through the ``noise`` tensor the caller
draws (from a seeded generator, or a fixed buffer in exported graphs), so the same inputs
always give the same output and an image's result never depends on its batch.
Images ``y`` and samples ``x`` live in [-1, 1]; ``alpha_bar`` is indexed by noise level as
in :class:`anomalib_mdps.components.NoiseSchedule`.
"""

from enum import Enum

import torch

from anomalib_mdps.components import Denoiser, ddim_step_pairs, forward_diffusion
from anomalib_mdps.components.ddim import ddim_step, predicted_clean_image, run_steps


class Guidance(str, Enum):
    """How ∇_{x_t}‖y − x̂0‖ of eq. 16 is obtained."""

    DPS = "dps"  # exact gradient through the denoiser (the paper)
    JACOBIAN_FREE = "jacobian_free"  # ∂x̂0/∂x_t ≈ I/√ᾱ_t: no autograd, exportable


class GuidanceNorm(str, Enum):
    """Which norm of the residual y − x̂0 eq. 16 differentiates."""

    PLAIN = "plain"  # ‖m⊙r‖₂, as the authors' code; rescaled so that ρ is defined at 3×256² elements
    SQUARED = "squared"  # ‖m⊙r‖₂², as eq. 16 is written; its per-pixel pull 2ρ·r_k needs no rescaling


class ThresholdMode(str, Enum):
    """Whose statistics set the threshold of eq. 20."""

    PER_IMAGE = "per_image"  # min + λ·(max − min) of each image on its own
    BATCH = "batch"  # min + λ·(max − min) over the whole batch, like the authors' test-set statistics
    NORMAL = "normal"  # a quantile of D̄ on held-out normal training images (inductive, image-independent)


# ρ of the plain norm is defined for a full mask on a 3-channel 256 × 256 image (the paper's size).
GUIDANCE_REFERENCE_ELEMENTS = 3 * 256 * 256


def observation_epsilon(x_t: torch.Tensor, y: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """ε in the normal region, where x0 = y: (x_t − √ᾱ_t·y) / √(1-ᾱ_t), eq. 10."""
    return (x_t - alpha_bar_t.sqrt() * y) / (1 - alpha_bar_t).sqrt()


def guided_epsilon(
    epsilon_prior: torch.Tensor,
    likelihood_gradient: torch.Tensor,
    alpha_bar_t: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """ε in the anomalous region: ε_θ + ρ·√(1-ᾱ_t)·∇_{x_t}‖y − x̂0‖, eq. 16."""
    return epsilon_prior + guidance_scale * (1 - alpha_bar_t).sqrt() * likelihood_gradient


def masked_posterior_epsilon(
    epsilon_normal: torch.Tensor,
    epsilon_anomalous: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """ε_φ = (1 − m)⊙ε^{m̄} + m⊙ε^{m}: the posterior denoiser of eq. 17."""
    return (1 - mask) * epsilon_normal + mask * epsilon_anomalous


def _plain_norm_scale(residual: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """√(n_m / n_ref) per sample: the factor that makes the plain norm's pull size- and area-free."""
    elements = region.expand_as(residual).flatten(1).sum(dim=1).detach()
    return (elements / GUIDANCE_REFERENCE_ELEMENTS).sqrt()


def guidance_objective(residual: torch.Tensor, region: torch.Tensor, norm: GuidanceNorm) -> torch.Tensor:
    """Per-sample L(r) whose gradient eq. 16 scales by ρ, for r = region⊙(y − x̂0).

    ``SQUARED``: ‖r‖₂², eq. 16 as written; ∂L/∂r_k = 2·r_k does not depend on the image size or
    on the mask area. ``PLAIN``: ‖r‖₂·√(n_m / n_ref), with n_m the number of masked elements and
    n_ref = 3·256². The plain norm's gradient r_k/‖r‖ shrinks as 1/√n_m (a 64 px image gets 4×
    the pull of a 256 px one, a mask over 5 % of the image 4.5× that of a full one); the factor
    cancels this, so ∂L/∂r_k = r_k / (rms(r)·√n_ref) at every size and mask area, and a full mask
    at 256 px is exactly the authors' per-sample plain norm.
    """
    energy = residual.pow(2).flatten(1).sum(dim=1)
    if norm == GuidanceNorm.SQUARED:
        return energy
    return (energy + 1e-12).sqrt() * _plain_norm_scale(residual, region)


def guidance_objective_gradient(residual: torch.Tensor, region: torch.Tensor, norm: GuidanceNorm) -> torch.Tensor:
    """∂L/∂r of :func:`guidance_objective`, in closed form (for the autograd-free guidance)."""
    if norm == GuidanceNorm.SQUARED:
        return 2 * residual
    norm_value = (residual.pow(2).flatten(1).sum(dim=1) + 1e-12).sqrt()
    scale = _plain_norm_scale(residual, region) / norm_value
    return scale.view(-1, *([1] * (residual.dim() - 1))) * residual


def likelihood_gradient(
    denoiser: Denoiser,
    x_t: torch.Tensor,
    timestep: int | torch.Tensor,
    y: torch.Tensor,
    alpha_bar_t: torch.Tensor,
    region: torch.Tensor,
    guidance: Guidance,
    norm: GuidanceNorm = GuidanceNorm.PLAIN,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ε_θ(x_t, t) and ∇_{x_t} L(region⊙(y − x̂0^prior)) per sample (eqs. 13, 15, 16).

    ``Guidance.DPS`` differentiates through the denoiser; ``Guidance.JACOBIAN_FREE`` takes
    ∂x̂0/∂x_t ≈ I/√ᾱ_t, which needs no autograd and can be exported. L is
    :func:`guidance_objective`.
    """
    if guidance == Guidance.JACOBIAN_FREE:
        epsilon = denoiser(x_t, timestep)
        residual = region * (y - predicted_clean_image(x_t, epsilon, alpha_bar_t))
        return epsilon, -guidance_objective_gradient(residual, region, norm) / alpha_bar_t.sqrt()
    if torch.is_inference_mode_enabled():
        msg = (
            "DPS guidance differentiates through the denoiser and cannot run under torch.inference_mode(). "
            "Use torch.no_grad() (Lightning: Trainer(inference_mode=False)) or guidance='jacobian_free'."
        )
        raise RuntimeError(msg)
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        epsilon = denoiser(x, timestep)
        residual = region * (y - predicted_clean_image(x, epsilon, alpha_bar_t))
        (gradient,) = torch.autograd.grad(guidance_objective(residual, region, norm).sum(), x)
    return epsilon.detach(), gradient


def masked_posterior_sampling(
    denoiser: Denoiser,
    alpha_bar: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    noise: torch.Tensor,
    *,
    noise_level: int = 200,
    num_steps: int = 10,
    guidance_scale: float = 100.0,
    eta: float = 1.0,
    guidance: Guidance = Guidance.DPS,
    masked_guidance: bool = True,
    guidance_norm: GuidanceNorm = GuidanceNorm.PLAIN,
) -> torch.Tensor:
    """Algorithm 1: a normal image x0 drawn from p(x0 | y) under the mask ``m``.

    Args:
        denoiser: ε_θ(x, t) taking the denoiser timestep index (level − 1).
        alpha_bar: ᾱ by noise level, ``alpha_bar[0] = 1``.
        y: observed images in [-1, 1], (B, C, H, W).
        mask: m of eq. 7, 1 where y may be anomalous; broadcastable to y.
        noise: (num_steps + 1, B, C, H, W) standard normal draws: the start noise of line 1,
            then ε_t of line 10 for each step.
        noise_level: T; num_steps: N; guidance_scale: ρ; eta: DDIM η of eq. 4.
        guidance: how the likelihood gradient of eq. 16 is computed.
        masked_guidance: restrict ‖y − x̂0‖ to the anomalous region m (eq. 15 holds there);
            ``False`` uses the whole image, as in the authors' code.
        guidance_norm: the norm of eq. 16 (see :func:`guidance_objective`).
    """
    if noise.shape[0] != num_steps + 1:
        msg = f"noise must hold num_steps + 1 = {num_steps + 1} draws, got {noise.shape[0]}."
        raise ValueError(msg)
    pairs = torch.tensor(ddim_step_pairs(noise_level, num_steps), device=y.device)

    def step(
        state: tuple[torch.Tensor], inputs: tuple[torch.Tensor, ...], y: torch.Tensor, mask: torch.Tensor,
    ) -> tuple[torch.Tensor]:
        (x,) = state
        timestep, alpha_bar_t, alpha_bar_s, step_noise = inputs
        region = mask if masked_guidance else torch.ones_like(mask)
        if guidance_scale == 0:
            epsilon_prior = denoiser(x, timestep)
            epsilon_anomalous = epsilon_prior
        else:
            epsilon_prior, gradient = likelihood_gradient(
                denoiser, x, timestep, y, alpha_bar_t, region, guidance, guidance_norm,
            )
            epsilon_anomalous = guided_epsilon(epsilon_prior, gradient, alpha_bar_t, guidance_scale)
        epsilon = masked_posterior_epsilon(observation_epsilon(x, y, alpha_bar_t), epsilon_anomalous, mask)
        return (ddim_step(x, epsilon, alpha_bar_t, alpha_bar_s, eta, step_noise),)

    x = forward_diffusion(y, noise[0], alpha_bar[noise_level])  # Algorithm 1, line 2
    # The denoiser takes the timestep index, level − 1.
    per_step = (pairs[:, 0] - 1, alpha_bar[pairs[:, 0]], alpha_bar[pairs[:, 1]], noise[1:])
    fixed = (y, torch.broadcast_to(mask, (y.shape[0], *mask.shape[1:])).contiguous())
    return run_steps(step, (x,), per_step, fixed)[0]


def anomalous_region_mask(
    difference: torch.Tensor,
    threshold_ratio: float,
    mode: ThresholdMode = ThresholdMode.PER_IMAGE,
    normal_threshold: torch.Tensor | None = None,
) -> torch.Tensor:
    """m = (D̄ > min D̄ + λ·(max D̄ − min D̄)), eq. 20, for maps of shape (B, 1, H, W).

    ``ThresholdMode.NORMAL`` replaces the min/max rule by ``normal_threshold``, a level of D̄
    measured on held-out normal training images, so that a normal image's mask covers the same
    expected share of its pixels whatever the image's own range.
    """
    if mode == ThresholdMode.NORMAL:
        if normal_threshold is None:
            msg = "ThresholdMode.NORMAL needs the threshold measured on normal images."
            raise ValueError(msg)
        return (difference > normal_threshold).to(difference.dtype)
    dims = tuple(range(difference.dim())) if mode == ThresholdMode.BATCH else tuple(range(1, difference.dim()))
    low = difference.amin(dim=dims, keepdim=True)
    high = difference.amax(dim=dims, keepdim=True)
    return (difference > low + threshold_ratio * (high - low)).to(difference.dtype)
