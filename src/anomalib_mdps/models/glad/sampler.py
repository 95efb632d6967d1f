"""GLAD (Yao et al., ECCV 2024) in pixel space: anomaly-aware training pairs and the adaptive sampler.

Plain functions: randomness enters only through the ``noise`` the caller draws, and every image
of a batch is processed independently (the lock step is per image). Images live in [-1, 1];
``alpha_bar`` is indexed by noise level as in :class:`anomalib_mdps.components.NoiseSchedule`.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_mdps.components import Denoiser, ddim_step_pairs, forward_diffusion, predicted_clean_image, top_k_mean_score
from anomalib_mdps.components.ddim import run_steps
from anomalib_mdps.components.images import is_tracing
from anomalib_mdps.models.mdps.sampler import observation_epsilon

# (x̂0 a, x̂0 b) -> (B, 1, H, W): how far each location of a is from everything in b.
DistanceMap = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def anomaly_aware_pair(
    normal: torch.Tensor,
    anomalous: torch.Tensor,
    noise: torch.Tensor,
    levels: torch.Tensor,
    alpha_bar: torch.Tensor,
    num_train_timesteps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GLAD's training input and target: the noised input mixes the synthetic-anomaly image and the
    normal one by t/T, x_t = √ᾱ_t·((t/T)·x_anom + (1 − t/T)·x_norm) + √(1−ᾱ_t)·ε, and the target
    ε* = (x_t − √ᾱ_t·x_norm)/√(1−ᾱ_t) is the noise that leads back to the *normal* image (MDPS
    eq. 10 with y = x_norm). Where ``anomalous`` equals ``normal``, ε* is ε.
    """
    view = (-1, *([1] * (normal.dim() - 1)))
    share = (levels.to(normal.dtype) / num_train_timesteps).view(view)
    alpha_bar_t = alpha_bar[levels].view(view)
    x_t = forward_diffusion(share * anomalous + (1 - share) * normal, noise, alpha_bar_t)
    return x_t, observation_epsilon(x_t, normal, alpha_bar_t)


def nearest_neighbour_distance(query: list[torch.Tensor], reference: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Σ over feature stages of min over the reference's locations of (1 − cos): for every location of
    ``query``, how far it is from anything in ``reference`` (GLAD's patch distance), upsampled to ``size``.

    Nearest neighbours anywhere in the image tolerate the small shifts a reconstruction makes.
    """
    total = query[0].new_zeros(query[0].shape[0], 1, *size)
    for features_q, features_r in zip(query, reference, strict=True):
        batch, _, height, width = features_q.shape
        q = F.normalize(features_q.flatten(2), dim=1)
        r = F.normalize(features_r.flatten(2), dim=1)
        similarity = torch.bmm(q.transpose(1, 2), r).amax(dim=2)  # (B, h·w)
        distance = (1 - similarity).view(batch, 1, height, width)
        total = total + F.interpolate(distance, size=size, mode="bilinear", align_corners=False)
    return total


def spatially_adaptive_fusion(
    x0_prior: torch.Tensor, x0_input: torch.Tensor, weight: torch.Tensor,
) -> torch.Tensor:
    """SAFF: x̂0 = W·x̂0_prior + (1 − W)·x̂0_input; W near 1 where the input looks anomalous."""
    return weight * x0_prior + (1 - weight) * x0_input


class AdaptiveReconstruction(NamedTuple):
    """What GLAD's sampler returns, per image."""

    sample: torch.Tensor  # (B, C, H, W) in [-1, 1]
    lock_level: torch.Tensor  # (B,) the level whose step fused and locked the image
    distances: torch.Tensor  # (B, N) the top-k distance at each step, NaN once locked


def adaptive_reconstruction(
    denoiser: Denoiser,
    alpha_bar: torch.Tensor,
    y: torch.Tensor,
    noise: torch.Tensor,
    distance_map: DistanceMap,
    *,
    start_level: int,
    num_steps: int,
    lock_distance: float | torch.Tensor,
    min_level: int,
    top_k: int,
) -> AdaptiveReconstruction:
    """GLAD's global and local adaptive denoising: a normal reconstruction of ``y``.

    ``y`` is noised once to ``start_level`` (T_max) with ``noise`` and denoised by deterministic DDIM
    (η = 0). At each step, until an image is locked, two views of x̂0 from the same ε_θ(x_t, t) are
    compared: the trajectory's (the prior's) and that of ``y`` re-noised to the current level with
    the same noise (the input's). The image's distance is the mean of the ``top_k`` largest values
    of ``distance_map(x̂0 input, x̂0 prior)``. The image locks at the first step where
    - the distance exceeds ``lock_distance`` (τ): its x̂0 becomes the SAFF fusion with
      W = sigmoid(distance map), mostly the prior's where the input looks anomalous;
    - or the level is below ``min_level`` (t_min): its x̂0 becomes the input's view;
    and plain DDIM continues from there. An anomalous image leaves the input's view early and is
    rebuilt from a high level; a normal one reaches t_min and keeps its detail. Every step updates
    x_s = √ᾱ_s·x̂0 + √(1−ᾱ_s)·ε_θ (eq. 4 with σ = 0) with the x̂0 chosen, as the authors' code does.
    """
    pairs = torch.tensor(ddim_step_pairs(start_level, num_steps), device=y.device)
    batch = y.shape[0]

    def step(
        state: tuple[torch.Tensor, ...], inputs: tuple[torch.Tensor, ...],
        y: torch.Tensor, noise: torch.Tensor, lock_distance: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        x, locked, lock_level, trajectory = state
        level, alpha_bar_t, alpha_bar_s, this_step = inputs
        epsilon = denoiser(x, level - 1)
        x0 = predicted_clean_image(x, epsilon, alpha_bar_t)
        # Eager runs skip the comparison once every image is locked; a captured graph always runs it.
        if is_tracing() or not bool(locked.all()):
            x0_input = predicted_clean_image(forward_diffusion(y, noise, alpha_bar_t), epsilon, alpha_bar_t)
            distances = distance_map(x0_input, x0)
            distance = top_k_mean_score(distances, top_k)
            recorded = this_step.view(1, -1).bool() & ~locked.view(-1, 1)
            trajectory = torch.where(recorded, distance.view(-1, 1), trajectory)
            exceeds = distance > lock_distance
            lock_now = ~locked & (exceeds | (level < min_level))
            fused = spatially_adaptive_fusion(x0, x0_input, torch.sigmoid(distances))
            chosen = torch.where(exceeds.view(-1, 1, 1, 1), fused, x0_input)
            x0 = torch.where(lock_now.view(-1, 1, 1, 1), chosen, x0)
            lock_level = torch.where(lock_now, level, lock_level)
            locked = locked | lock_now
        # Eq. 4 with σ = 0 around the chosen x̂0: the forward diffusion of x̂0 with ε_θ as its noise.
        return forward_diffusion(x0, epsilon, alpha_bar_s), locked, lock_level, trajectory

    state = (
        forward_diffusion(y, noise, alpha_bar[start_level]),
        torch.zeros(batch, dtype=torch.bool, device=y.device),
        torch.zeros(batch, dtype=torch.long, device=y.device),
        torch.full((batch, len(pairs)), float("nan"), device=y.device),
    )
    per_step = (pairs[:, 0], alpha_bar[pairs[:, 0]], alpha_bar[pairs[:, 1]], torch.eye(len(pairs), device=y.device))
    fixed = (y, noise.expand_as(y).contiguous(), torch.as_tensor(lock_distance, dtype=y.dtype, device=y.device))
    x, _, lock_level, trajectory = run_steps(step, state, per_step, fixed)
    return AdaptiveReconstruction(x, lock_level, trajectory)
