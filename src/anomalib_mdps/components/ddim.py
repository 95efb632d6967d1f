"""Deterministic and stochastic DDIM updates shared by the plugin's models.

``alpha_bar_*`` are ᾱ values indexed by noise level as in
:class:`anomalib_mdps.components.NoiseSchedule` (``alpha_bar[0] = 1``), passed as tensors
that broadcast against ``x_t``. Equation numbers are those of the MDPS paper (Wu et al.), whose
notation the plugin follows; DDIM itself is Song et al., "Denoising Diffusion Implicit Models".
"""

from collections.abc import Callable
from typing import Any

import torch


def predicted_clean_image(x_t: torch.Tensor, epsilon: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """x̂0 = (x_t − √(1-ᾱ_t)·ε) / √ᾱ_t: eq. 13 (and Algorithm 1, lines 5 and 9)."""
    return (x_t - (1 - alpha_bar_t).sqrt() * epsilon) / alpha_bar_t.sqrt()


def ddim_step(
    x_t: torch.Tensor,
    epsilon: torch.Tensor,
    alpha_bar_t: torch.Tensor,
    alpha_bar_s: torch.Tensor,
    eta: float,
    noise: torch.Tensor,
) -> torch.Tensor:
    """One DDIM update from level t to s < t, eq. 4 (Algorithm 1, lines 9–11).

    σ_t = η·√((1-ᾱ_s)/(1-ᾱ_t))·√(1 − ᾱ_t/ᾱ_s); η = 1 is the paper's σ_t, η = 0 is deterministic.
    """
    x0 = predicted_clean_image(x_t, epsilon, alpha_bar_t)
    sigma = eta * ((1 - alpha_bar_s) / (1 - alpha_bar_t)).sqrt() * (1 - alpha_bar_t / alpha_bar_s).sqrt()
    direction = (1 - alpha_bar_s - sigma**2).clamp(min=0).sqrt() * epsilon
    return alpha_bar_s.sqrt() * x0 + direction + sigma * noise


def ddim_inversion_step(
    x_t: torch.Tensor,
    epsilon: torch.Tensor,
    alpha_bar_t: torch.Tensor,
    alpha_bar_next: torch.Tensor,
) -> torch.Tensor:
    """One deterministic DDIM inversion update from level t to a noisier level u > t.

    x_u = √ᾱ_u·x̂0 + √(1-ᾱ_u)·ε with x̂0 from eq. 13: the η = 0 update of eq. 4 run towards
    more noise, i.e. the DDIM ODE integrated forward in time (InvAD's latent inversion). For
    a fixed ε it is the exact inverse of ``ddim_step(x_u, ε, ᾱ_u, ᾱ_t, eta=0, ·)``; the
    round trip is only approximate because inversion evaluates ε at the lower level.
    """
    x0 = predicted_clean_image(x_t, epsilon, alpha_bar_t)
    return alpha_bar_next.sqrt() * x0 + (1 - alpha_bar_next).sqrt() * epsilon


def run_steps(
    step: Callable[..., tuple[torch.Tensor, ...]],
    state: tuple[torch.Tensor, ...],
    per_step: tuple[torch.Tensor, ...],
    fixed: tuple[torch.Tensor, ...] = (),
) -> tuple[torch.Tensor, ...]:
    """state ← step(state, inputs_n, *fixed) for each n, ``inputs_n`` being the n-th slice of every tensor
    in ``per_step``; ``state`` is a tuple of tensors (x of a DDIM loop, and whatever else a sampler
    carries from step to step) and ``fixed`` are tensors every step reads (``step`` must not capture
    tensors itself).

    Eager torch runs a Python loop (autograd inside ``step`` works). Under ``torch.export`` (and so
    ONNX export) the loop is one ``scan``: the exported graph holds the denoiser once, as the body
    of an ONNX ``Scan``, instead of once per step, which made exporting take minutes. ``fixed``
    rides in the scan's carry, which OpenVINO's ONNX reader needs (it rejects a ``Scan`` whose body
    reads non-constant tensors from outside).
    """
    if not torch.compiler.is_exporting():
        for inputs in zip(*per_step, strict=True):
            state = tuple(step(state, inputs, *fixed))
        return state
    from torch._higher_order_ops import scan

    size = len(state)

    def body(carry: list[torch.Tensor], inputs: Any) -> tuple[list[torch.Tensor], torch.Tensor]:  # noqa: ANN401
        new = step(tuple(carry[:size]), tuple(inputs), *carry[size:])
        return [*new, *(tensor.clone() for tensor in carry[size:])], new[0].new_zeros(())

    return tuple(scan(body, [*state, *fixed], list(per_step))[0][:size])
