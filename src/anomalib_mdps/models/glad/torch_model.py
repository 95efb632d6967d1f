"""PyTorch model of GLAD in pixel space: an anomaly-aware DDPM prior and the adaptive DDIM sampler.

Paper: Yao et al., "GLAD: Towards Better Reconstruction with Global and Local Adaptive Diffusion
Models for Unsupervised Anomaly Detection" (ECCV 2024). The authors fine-tune Stable Diffusion in
its latent space and score with DINO features; neither set of weights can be had offline, so the
prior here is the plugin's own pixel-space DDPM (the one Mdps learns) and the features are the
offline EfficientNet-Lite's.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from anomalib.data import InferenceBatch

from anomalib_mdps.components import (
    DiffusionPrior,
    FeatureExtractor,
    check_noise_level,
    top_k_for_size,
    top_k_mean_score,
)
from anomalib_mdps.components.images import is_tracing
from anomalib_mdps.models.input_size import track_input_size
from anomalib_mdps.models.pixel_space import PixelSpaceModel

from .anomaly_map import reconstruction_distance
from .sampler import AdaptiveReconstruction, adaptive_reconstruction, anomaly_aware_pair, nearest_neighbour_distance


class GladOutput(NamedTuple):
    """Everything one GLAD scoring run produces, per input image."""

    pred_score: torch.Tensor  # (B,)
    anomaly_map: torch.Tensor  # (B, 1, H, W), blurred
    reconstruction: torch.Tensor  # (B, 3, H, W) in [0, 1]
    lock_level: torch.Tensor  # (B,) the level at which the adaptive step locked each image


class GladModel(PixelSpaceModel):
    """GLAD: reconstruct a normal version of each image from an image-specific noise level.

    Images enter in [0, 1] at ``image_size``; the diffusion works in [-1, 1].

    Args:
        image_size: (height, width) the denoiser runs at (``set_image_size`` changes it).
        unet_channels, layers_per_block, attention_levels: the denoiser UNet.
        num_train_timesteps, beta_start, beta_end: the DDPM schedule.
        start_level: T_max, the level the input is noised to. The authors' 750 on Stable Diffusion's
            schedule (ᾱ 0.057) is level 531 on this linear one; 400 (ᾱ 0.40) reconstructed
            bottle better with the CPU-trained prior (image / pixel AUROC 0.989 / 0.951 against
            0.923 / 0.856 at 750 with t_min 350, prior trained on all levels): from higher
            levels it forgets the image.
        num_steps: deterministic DDIM steps from ``start_level`` to 0.
        min_level: t_min: an image not locked by then locks at the first step below it (authors:
            350 on Stable Diffusion's schedule, level 256 here).
        lock_distance: τ, the distance between the prior's and the input's x̂0 above which an image
            locks (authors: 0.32–0.5 per category, on DINO features). ``None``: measured on
            held-out normal training images by ``calibrate`` (the ``lock_quantile`` of their
            largest distance down to ``min_level``), since the scale depends on the backbone.
        lock_quantile: see ``lock_distance``.
        lock_top_k: pixels (at 256²; scales with the area) whose mean distance decides the lock.
        backbone, feature_layers: offline EfficientNet-Lite and the stages of the distances.
        backbone_input_size: resize images to this before the backbone (``None``: a 256 px short
            side, the aspect ratio kept).
        pixel_weight: weight of the max-normalised L1 term of the map (authors' option; 0: off).
        blur_sigma: σ of the map's Gaussian smoothing at 256 px (authors: 6 at 512 px).
        top_k: pixels at 256² averaged into the image score (authors: 250 at 512²).
        ema_decay: decay of the EMA denoiser used for sampling.
        seed: seed of the denoiser's initialisation and of the sampling noise (drawn once,
            shared by every image).
    """

    def __init__(
        self,
        image_size: Sequence[int] = (64, 64),
        unet_channels: Sequence[int] = (32, 64, 128, 256),
        layers_per_block: int = 1,
        attention_levels: Sequence[bool] | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        start_level: int = 400,
        num_steps: int = 10,
        min_level: int = 150,
        lock_distance: float | None = None,
        lock_quantile: float = 1.0,
        lock_top_k: int = 160,
        backbone: str = "tf_efficientnet_lite0",
        feature_layers: Sequence[str] = ("blocks.2", "blocks.4"),
        backbone_input_size: Sequence[int] | None = None,
        pixel_weight: float = 0.0,
        blur_sigma: float = 3.0,
        top_k: int = 62,
        ema_decay: float = 0.995,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_noise_level(start_level, num_train_timesteps, "start_level")
        if not 0 <= min_level <= start_level:
            msg = f"min_level must be in [0, start_level={start_level}], got {min_level}."
            raise ValueError(msg)
        if not 0 < lock_quantile <= 1:
            msg = f"lock_quantile must be in (0, 1], got {lock_quantile}."
            raise ValueError(msg)
        self.unet_channels = tuple(unet_channels)
        self.num_train_timesteps = num_train_timesteps
        self.start_level = start_level
        self.num_steps = num_steps
        self.min_level = min_level
        self.lock_quantile = lock_quantile
        self.lock_top_k_at_256 = lock_top_k
        self.pixel_weight = pixel_weight
        self.blur_sigma = blur_sigma
        self.top_k_at_256 = top_k
        self.fixed_backbone_input_size = tuple(int(v) for v in backbone_input_size) if backbone_input_size else None
        self.seed = seed

        self.prior = DiffusionPrior(
            image_size, 3, unet_channels, layers_per_block, attention_levels,
            num_train_timesteps, beta_start, beta_end, ema_decay, seed,
        )
        self.feature_extractor = FeatureExtractor(backbone, feature_layers)
        self.register_buffer("sampling_noise", torch.empty(0), persistent=False)
        track_input_size(self)
        self.set_image_size(image_size)
        fixed = lock_distance is not None
        self.register_buffer("lock_threshold", torch.tensor(float(lock_distance) if fixed else float("inf")))
        self.register_buffer("calibrated", torch.tensor(fixed))
        self.lock_distance_given = fixed

    def set_image_size(self, image_size: Sequence[int]) -> None:
        super().set_image_size(image_size)
        self.lock_top_k = top_k_for_size(self.image_size, self.lock_top_k_at_256)

    # ----------------------------------------------------------------- training
    def training_loss(self, normal: torch.Tensor, anomalous: torch.Tensor) -> torch.Tensor:
        """Anomaly-aware ε loss on normal images and their synthetic-anomaly versions, both in [0, 1]:
        the denoiser learns the noise that leads back to the normal image (see ``anomaly_aware_pair``), at
        levels up to ``start_level``.
        """
        normal, anomalous = self._checked(normal) * 2 - 1, self._checked(anomalous) * 2 - 1

        def target(x0: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return anomaly_aware_pair(x0, anomalous, noise, levels, self.prior.alpha_bar, self.num_train_timesteps)

        # Sampling never starts above T_max, so the prior learns only the levels it will be asked about.
        return self.prior.training_loss(normal, self.start_level, reduction="sum", target=target)

    def update_ema(self) -> None:
        self.prior.update_ema()

    # ---------------------------------------------------------------- inference
    def forward(self, images: torch.Tensor) -> InferenceBatch:
        output = self.reconstruct(images)
        return InferenceBatch(pred_score=output.pred_score, anomaly_map=output.anomaly_map)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> GladOutput:
        """Score images in [0, 1]: the adaptive reconstruction, its distance map and the image score."""
        images = self._checked(images)
        if not is_tracing() and not bool(self.calibrated):
            msg = (
                "This Glad model has no lock distance. Train it with the Lightning module (it calibrates on "
                "held-out training images), call GladModel.calibrate(normal_images), or set lock_distance."
            )
            raise RuntimeError(msg)
        result = self._adaptive(images, self.lock_threshold)
        reconstruction = ((result.sample + 1) / 2).clamp(0, 1)
        distance = reconstruction_distance(
            images, reconstruction, self.features(images), self.features(reconstruction), self.pixel_weight,
        )
        anomaly_map = self.blur(distance)
        return GladOutput(
            pred_score=top_k_mean_score(anomaly_map, self.top_k),
            anomaly_map=anomaly_map,
            reconstruction=reconstruction,
            lock_level=result.lock_level,
        )

    @torch.no_grad()
    def calibrate(self, normal_images: torch.Tensor, batch_size: int = 8) -> None:
        """τ from normal images the denoiser never saw: the ``lock_quantile`` of their largest x̂0 distance
        over the steps down to t_min, so that a normal image runs down to t_min and only images that
        leave the normal range lock earlier. A ``lock_distance`` given by the user is kept.
        """
        if self.lock_distance_given:
            return
        largest = []
        for chunk in self._checked(normal_images).split(batch_size):
            # With τ = ∞ an image runs to the first step below t_min and locks there: the distances
            # recorded (NaN after the lock) are those its lock test compares with τ.
            result = self._adaptive(chunk, torch.tensor(float("inf")))
            largest.append(result.distances.nan_to_num(nan=0.0).amax(dim=1))
        self.lock_threshold.copy_(torch.quantile(torch.cat(largest), self.lock_quantile))
        self.calibrated.fill_(True)

    def _adaptive(self, images: torch.Tensor, lock_distance: torch.Tensor) -> AdaptiveReconstruction:
        noise = self.noise_for(images.shape[1:]).expand(images.shape[0], -1, -1, -1)
        return adaptive_reconstruction(
            self.prior.sampling_denoiser,
            self.prior.alpha_bar,
            images * 2 - 1,
            noise,
            self._x0_distance,
            start_level=self.start_level,
            num_steps=self.num_steps,
            lock_distance=lock_distance,
            min_level=self.min_level,
            top_k=self.lock_top_k,
        )

    def _x0_distance(self, x0_input: torch.Tensor, x0_prior: torch.Tensor) -> torch.Tensor:
        """GLAD's distance map between the input's and the prior's x̂0 (both in [-1, 1]), on the deepest
        feature stage only, as the authors' lock test uses their backbone's last layer.
        """
        to_unit = lambda x: ((x + 1) / 2).clamp(0, 1)  # noqa: E731
        size = tuple(x0_input.shape[-2:])
        deepest = lambda x: self.features(to_unit(x))[-1:]  # noqa: E731
        return nearest_neighbour_distance(deepest(x0_input), deepest(x0_prior), size)

    def noise_for(self, image_shape: Sequence[int]) -> torch.Tensor:
        """The (1, C, H, W) start noise: drawn once from ``seed``, shared by all images."""
        shape = (1, *image_shape)
        if tuple(self.sampling_noise.shape) != shape:
            generator = torch.Generator().manual_seed(self.seed)
            self.sampling_noise = torch.randn(shape, generator=generator).to(self.prior.alpha_bar.device)
        return self.sampling_noise

    @contextmanager
    def exportable(self) -> Iterator[None]:
        """Within this context ``forward`` can be captured as a graph: the start noise is a constant buffer."""
        self.noise_for((3, *self.image_size))
        yield
