"""PyTorch model of InvAD: likelihood of DDIM-inverted backbone features under N(0, I).

Paper: Sakai et al., "Reconstruction-Free Anomaly Detection with Diffusion Models via Direct
Latent Likelihood Evaluation" (InvAD). A diffusion prior is trained on pretrained CNN features
of normal images; at test time the features are mapped deterministically (DDIM inversion,
η = 0) to the latent z_T in a few steps, and anomalies are latents that are unlikely under
the Gaussian prior. Nothing is reconstructed.

Departures from the authors' code, each for a single-image, CPU setting: features are
standardised per channel with training statistics before the diffusion; image scores are
standardised with statistics of the normal training images (the code min-max normalises over
the test set); stages are area-averaged to the grid (the code resamples bilinearly); the map is
‖z_T‖ standardised at each location with normal training statistics (the code maps the raw norm).
"""

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components.base import DynamicBufferMixin
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_mdps.components import (
    Denoiser,
    DiffusionPrior,
    FeatureExtractor,
    NoiseSchedule,
    anomaly_map_blur,
    check_noise_level,
    ddim_inversion_step,
    ddim_step_pairs,
    unet_downsampling_factor,
)
from anomalib_mdps.components.images import as_rgb_batch, is_tracing
from anomalib_mdps.models.input_size import track_input_size

from .anomaly_map import gaussian_negative_log_likelihood, latent_norm_map, spatial_score, standardised


class InvADOutput(NamedTuple):
    """Everything one InvAD scoring run produces, per input image."""

    pred_score: torch.Tensor  # (B,) standardised NLL (+ weighted standardised spatial term)
    anomaly_map: torch.Tensor  # (B, 1, H, W) per-location ‖z_T‖ standardised per location, upsampled, blurred
    negative_log_likelihood: torch.Tensor  # (B,) raw −log N(z_T; 0, I)
    spatial_score: torch.Tensor  # (B,) raw max − min of the per-location ‖z_T‖
    latent: torch.Tensor  # (B, C, h, w) z_T


def feature_grid(
    stage_features: Sequence[torch.Tensor],
    grid_size: tuple[int, int],
    neighbourhood: int = 1,
) -> torch.Tensor:
    """Multi-stage backbone features on one grid: each stage area-averaged to ``grid_size``
    and concatenated along channels (InvAD's feature space, "stages brought to 16×16").

    Area averaging rather than bilinear resampling keeps every fine-stage cell's evidence.
    ``neighbourhood`` > 1 also averages each cell with its neighbours (3 gives each location
    a 3×3 patch context, as PatchCore's local aggregation does).
    """
    resized = [F.adaptive_avg_pool2d(stage, grid_size) for stage in stage_features]
    grid = torch.cat(resized, dim=1)
    if neighbourhood > 1:
        grid = F.avg_pool2d(grid, neighbourhood, stride=1, padding=neighbourhood // 2, count_include_pad=False)
    return grid


def drop_blocks_after_last_stage(extractor: FeatureExtractor) -> None:
    """Remove the EfficientNet blocks after the deepest requested stage from ``extractor``.

    timm's feature model runs every block even when no requested stage follows; at 256 px the
    last two blocks of EfficientNet-Lite0 cost a fifth of the backbone's time for nothing.
    """
    network = extractor.network
    block_indices = [int(layer.split(".")[1]) for layer in extractor.layers if layer.startswith("blocks.")]
    if len(block_indices) == len(extractor.layers) and isinstance(getattr(network, "blocks", None), nn.Sequential):
        network.blocks = network.blocks[: max(block_indices) + 1]


def ddim_inversion(
    denoiser: Denoiser,
    alpha_bar: torch.Tensor,
    z0: torch.Tensor,
    noise_level: int,
    num_steps: int,
) -> torch.Tensor:
    """z_T from clean features z_0 by ``num_steps`` deterministic DDIM inversion steps to level T.

    The levels are those DDIM sampling from T would visit (``ddim_step_pairs``), walked upwards.
    The denoiser is conditioned on level ``max(t, 1)``: level 0 has no timestep of its own, and
    ᾱ_1 = 1 − β_1 ≈ 1 (guided diffusion evaluates its first inversion step at that index too).
    The loop has a fixed length, so exported graphs unroll it.
    """
    z = z0
    for higher, lower in reversed(ddim_step_pairs(noise_level, num_steps)):
        epsilon = denoiser(z, NoiseSchedule.denoiser_timestep(max(lower, 1)))
        z = ddim_inversion_step(z, epsilon, alpha_bar[lower], alpha_bar[higher])
    return z


def mean_and_spread(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation over the first dimension, kept; a single value spreads by 1."""
    spread = values.std(dim=0, keepdim=True) if values.shape[0] > 1 else torch.ones_like(values[:1])
    return values.mean(dim=0, keepdim=True), spread.clamp(min=1e-6)


class InvADModel(DynamicBufferMixin, nn.Module):
    """InvAD: a feature-space diffusion prior scored by the likelihood of the DDIM-inverted latent.

    Images enter in [0, 1] at ``image_size``. The backbone's stages are brought to the grid of
    its coarsest stage (16×16 at 256 px), standardised per channel with statistics of the
    normal training features, and inverted to z_T.

    Args:
        image_size: (height, width) the model is built for (sets the feature grid).
        backbone, feature_layers: offline EfficientNet-Lite and its stages.
        feature_neighbourhood: local averaging window applied on the grid (1: none).
        denoiser_channels: widths of the denoiser UNet's levels (one halving between levels).
        layers_per_block: residual blocks per UNet level.
        attention_levels: self-attention per UNet level (default: none).
        num_train_timesteps, beta_start, beta_end: the DDPM training schedule.
        noise_level: T, the level the inversion ends at.
        num_steps: S, inversion steps from 0 to T (the paper uses 2–5).
        spatial_weight: weight of the standardised spatial term in the image score (0: NLL only).
        blur_sigma: σ of the Gaussian smoothing of the map, given at 256 px.
        ema_decay: decay of the EMA denoiser used for scoring.
        seed: seed of the denoiser's initialisation and of the training draws (levels and noise),
            independent of the global RNG state.
    """

    def __init__(
        self,
        image_size: Sequence[int] = (256, 256),
        backbone: str = "tf_efficientnet_lite0",
        feature_layers: Sequence[str] = ("blocks.1", "blocks.2", "blocks.4"),
        feature_neighbourhood: int = 1,
        denoiser_channels: Sequence[int] = (32, 64),
        layers_per_block: int = 1,
        attention_levels: Sequence[bool] | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        noise_level: int = 1000,
        num_steps: int = 2,
        spatial_weight: float = 1.0,
        blur_sigma: float = 4.0,
        ema_decay: float = 0.995,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_noise_level(noise_level, num_train_timesteps)
        if feature_neighbourhood < 1 or feature_neighbourhood % 2 == 0:
            msg = f"feature_neighbourhood must be an odd window size >= 1, got {feature_neighbourhood}."
            raise ValueError(msg)
        if not 1 <= num_steps <= noise_level:
            msg = f"num_steps must be in [1, noise_level={noise_level}], got {num_steps}."
            raise ValueError(msg)
        self.noise_level = noise_level
        self.num_steps = num_steps
        self.spatial_weight = spatial_weight
        self.feature_neighbourhood = feature_neighbourhood
        self.seed = seed

        self.feature_extractor = FeatureExtractor(backbone, feature_layers)
        drop_blocks_after_last_stage(self.feature_extractor)
        self.grid_stride = max(self.feature_extractor.strides)
        self.denoiser_factor = unet_downsampling_factor(denoiser_channels)
        self.minimum_image_side = self.grid_stride * self.denoiser_factor
        self.blur_sigma = blur_sigma
        track_input_size(self)
        self.set_image_size(image_size)
        self.feature_channels = sum(self.feature_extractor.channels)

        self.prior = DiffusionPrior(
            self.grid_size, self.feature_channels, denoiser_channels, layers_per_block, attention_levels,
            num_train_timesteps, beta_start, beta_end, ema_decay, seed,
        )
        self._training_generator: torch.Generator | None = None

        # Statistics of normal training data, saved with the checkpoint so that a reloaded model
        # scores exactly as the trained one did.
        channel_shape = (1, self.feature_channels, 1, 1)
        self.register_buffer("feature_mean", torch.zeros(channel_shape))
        self.register_buffer("feature_std", torch.ones(channel_shape))
        self.register_buffer("score_mean", torch.zeros(2))  # NLL, spatial term
        self.register_buffer("score_std", torch.ones(2))
        self.register_buffer("feature_statistics_fitted", torch.tensor(False))
        self.register_buffer("score_statistics_fitted", torch.tensor(False))
        # (1, 1, h, w) mean and spread of ‖z_T‖ at each grid location over normal training images;
        # empty (the raw norm) until fitted, and in weights saved before the map was standardised.
        self.register_buffer("map_mean", torch.empty(0))
        self.register_buffer("map_std", torch.empty(0))

    @property
    def size_factor(self) -> int:
        """Image sides must be multiples of this (backbone stride times the denoiser's downsampling)."""
        return self.minimum_image_side

    def set_image_size(self, image_size: Sequence[int]) -> None:
        """Run at ``image_size`` (height, width): the denoiser is convolutional, so only the feature
        grid and the map's smoothing follow.
        """
        size = (int(image_size[0]), int(image_size[1]))
        self._check_image_size(*size)
        grid_size = (size[0] // self.grid_stride, size[1] // self.grid_stride)
        if grid_size[0] % self.denoiser_factor or grid_size[1] % self.denoiser_factor:
            msg = (
                f"image_size {size} gives a {grid_size[0]}x{grid_size[1]} feature grid that the denoiser's "
                f"{self.denoiser_factor}x downsampling cannot halve evenly: use an image size that is a multiple "
                f"of {self.size_factor}."
            )
            raise ValueError(msg)
        self.image_size, self.grid_size = size, grid_size
        self.full_size = size  # the size images enter at, as for the pixel-space models
        self.input_size.copy_(torch.tensor(size))
        # The map holds no detail finer than its grid: blurring it at a quarter of the image size
        # and then interpolating matches blurring at full size at a fraction of the cost.
        self.blur_size = (max(size[0] // 4, 1), max(size[1] // 4, 1))
        self.blur = anomaly_map_blur(self.blur_size, self.blur_sigma)

    # ----------------------------------------------------------------- features
    def raw_features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features of images in [0, 1] on the model's grid, before standardisation."""
        images = self._checked(images)
        return feature_grid(self.feature_extractor(images), self.grid_size, self.feature_neighbourhood)

    def standardise_features(self, features: torch.Tensor) -> torch.Tensor:
        """Per-channel standardisation with the training statistics: the diffusion space z_0."""
        return (features - self.feature_mean) / self.feature_std

    @torch.no_grad()
    def fit_feature_statistics(self, feature_batches: Iterable[torch.Tensor], min_std: float = 1e-3) -> None:
        """Per-channel mean and standard deviation of raw training features, over images and locations.

        Without it the diffusion would see channels whose scales differ by orders of magnitude.
        """
        count, total, total_squares = 0, 0.0, 0.0
        for features in feature_batches:
            features = features.double()
            count += features.shape[0] * features.shape[2] * features.shape[3]
            total = total + features.sum(dim=(0, 2, 3))
            total_squares = total_squares + features.pow(2).sum(dim=(0, 2, 3))
        if count == 0:
            msg = "No training features to measure: the training set is empty."
            raise ValueError(msg)
        mean = total / count
        std = (total_squares / count - mean.pow(2)).clamp(min=0).sqrt().clamp(min=min_std)
        self.feature_mean.copy_(mean.view_as(self.feature_mean).float())
        self.feature_std.copy_(std.view_as(self.feature_std).float())
        self.feature_statistics_fitted.fill_(True)

    # ----------------------------------------------------------------- training
    def training_loss(self, features: torch.Tensor) -> torch.Tensor:
        """ε-prediction loss (DDPM eq. 5 of the MDPS notation) on standardised raw ``features``."""
        if self._training_generator is None or self._training_generator.device != features.device:
            self._training_generator = torch.Generator(device=features.device).manual_seed(self.seed)
        return self.prior.training_loss(
            self.standardise_features(features),
            generator=self._training_generator,
            reduction="mean",  # InvAD's preset was measured with the per-element mean and AdamW
        )

    def update_ema(self) -> None:
        self.prior.update_ema()

    # ---------------------------------------------------------------- inference
    def forward(self, images: torch.Tensor) -> InferenceBatch:
        output = self.score(images)
        return InferenceBatch(pred_score=output.pred_score, anomaly_map=output.anomaly_map)

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> InvADOutput:
        """Score images in [0, 1]: invert their features and evaluate the latent under N(0, I)."""
        return self.score_features(self.raw_features(images), tuple(images.shape[-2:]))

    def score_features(self, features: torch.Tensor, image_size: tuple[int, int] | None = None) -> InvADOutput:
        """Score raw grid features (see ``raw_features``); maps come out at ``image_size``."""
        latent = self.invert(self.standardise_features(features))
        negative_log_likelihood = gaussian_negative_log_likelihood(latent)
        norm_map = latent_norm_map(latent)
        spatial = spatial_score(norm_map)
        pred_score = standardised(negative_log_likelihood, self.score_mean[0], self.score_std[0])
        if self.spatial_weight:
            pred_score = pred_score + self.spatial_weight * standardised(spatial, self.score_mean[1], self.score_std[1])
        return InvADOutput(
            pred_score=pred_score,
            anomaly_map=self.anomaly_map(self.standardised_norm_map(norm_map), image_size or self.image_size),
            negative_log_likelihood=negative_log_likelihood,
            spatial_score=spatial,
            latent=latent,
        )

    def standardised_norm_map(self, norm_map: torch.Tensor) -> torch.Tensor:
        """‖z_T‖ against its normal value at each location. The raw norm also varies with position,
        alike in every image; on tyres that pattern ranked normal rubber above the small defects.
        """
        if self.map_mean.numel() == 0:
            return norm_map
        if not is_tracing() and self.map_mean.shape[-2:] != norm_map.shape[-2:]:
            msg = (f"The map statistics were fit on a {tuple(self.map_mean.shape[-2:])} grid, got "
                   f"{tuple(norm_map.shape[-2:])}: score images at the size the model was trained at.")
            raise ValueError(msg)
        return standardised(norm_map, self.map_mean, self.map_std)

    def anomaly_map(self, norm_map: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """The per-location ‖z_T‖ upsampled to ``image_size`` and smoothed."""
        blurred = self.blur(F.interpolate(norm_map, size=self.blur_size, mode="bilinear", align_corners=False))
        return F.interpolate(blurred, size=image_size, mode="bilinear", align_corners=False)

    def invert(self, z0: torch.Tensor) -> torch.Tensor:
        """z_T of standardised features with the EMA denoiser (deterministic)."""
        return ddim_inversion(self.prior.sampling_denoiser, self.prior.alpha_bar, z0, self.noise_level, self.num_steps)

    @torch.no_grad()
    def fit_score_statistics(self, feature_batches: Iterable[torch.Tensor]) -> None:
        """Mean and standard deviation of the raw NLL and spatial term over normal training images,
        and of ‖z_T‖ at each grid location (``standardised_norm_map``).

        They put both terms on one scale before they are added, make scores comparable between
        runs, and take the position pattern out of the map, without ever looking at test data.
        """
        raw, norm_maps = [], []
        self.map_mean, self.map_std = self.map_mean[:0], self.map_std[:0]  # raw norms while measuring them
        for features in feature_batches:
            output = self.score_features(features)
            raw.append(torch.stack([output.negative_log_likelihood, output.spatial_score], dim=1).double())
            norm_maps.append(latent_norm_map(output.latent).double())
        if not raw:
            msg = "No training features to score: the training set is empty."
            raise ValueError(msg)
        score_mean, score_std = mean_and_spread(torch.cat(raw))
        self.score_mean.copy_(score_mean[0].float())
        self.score_std.copy_(score_std[0].float())
        map_mean, map_std = mean_and_spread(torch.cat(norm_maps))
        self.map_mean, self.map_std = map_mean.to(self.score_mean), map_std.to(self.score_mean)
        self.score_statistics_fitted.fill_(True)

    # -------------------------------------------------------------------- input
    def _check_image_size(self, height: int, width: int) -> None:
        if height < self.minimum_image_side or width < self.minimum_image_side:
            msg = (
                f"Image of size {height}x{width} is too small for InvAD: the backbone's stride-{self.grid_stride} "
                f"stage and the denoiser's {self.denoiser_factor}x downsampling need at least "
                f"{self.minimum_image_side}x{self.minimum_image_side} pixels (256x256 is the intended size)."
            )
            raise ValueError(msg)

    def _checked(self, images: torch.Tensor) -> torch.Tensor:
        images = as_rgb_batch(images)
        self._check_image_size(images.shape[-2], images.shape[-1])
        return images
