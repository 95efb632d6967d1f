"""PyTorch model of MDPS: a DDPM prior on normal images and masked posterior sampling."""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import NamedTuple

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components.base import DynamicBufferMixin
from torch.nn import functional as F  # noqa: N812

from anomalib_mdps.components import (
    DiffusionPrior,
    FeatureDensity,
    FeatureExtractor,
    PatchMemory,
    check_noise_level,
    perceptual_difference,
    pixel_difference,
    top_k_mean_score,
)
from anomalib_mdps.components.images import as_rgb_batch, is_tracing
from anomalib_mdps.models.input_size import track_input_size
from anomalib_mdps.models.pixel_space import PixelSpaceModel
from anomalib_mdps.selection_split import SelectionSplit

from .anomaly_map import (
    TERM_NAMES,
    FusionChoice,
    choose_fusion,
    fused,
    mean_over_samples,
    reconstruction_difference,
    weighted_terms,
)
from .sampler import Guidance, GuidanceNorm, ThresholdMode, anomalous_region_mask, masked_posterior_sampling

# A location's spread is estimated from the few held-out images (16: about 18 % error); below
# this fraction of the spread over all locations it would amplify noise, not calibrate it.
DENSITY_SPREAD_FLOOR = 0.25


class DensityStatistics(str, Enum):
    """How the density term is standardised on held-out normal images."""

    PER_LOCATION = "per_location"
    GLOBAL = "global"


class ScoreFusion(str, Enum):
    """How the image score and the map weigh D̄ (eq. 19) against the feature density."""

    AUTO = "auto"  # chosen at fit time on the selection split (``choose_fusion``)
    FIXED = "fixed"  # ``density_weight`` and ``score_density_weight`` as given


class MdpsOutput(NamedTuple):
    """Everything one MDPS scoring run produces, per input image."""

    pred_score: torch.Tensor  # (B,)
    anomaly_map: torch.Tensor  # (B, 1, H, W) at the input's size: the fused map (``fusion`` row 0)
    # (B, 3, h, w) in [0, 1] at image_size, first posterior sample of the final pass; None when the
    # fusion gives D̄ no weight and the diffusion passes are skipped (``needed_terms``)
    reconstruction: torch.Tensor | None
    mask: torch.Tensor | None  # (B, 1, h, w) at image_size, m of the final pass (all ones without the mask pass)
    # (B, 3): the image score (top-S mean) of D̄ alone (eq. 18-19), of the density alone and of the patch
    # memory's distance alone (NaN for a term the model does not compute)
    score_terms: torch.Tensor


class MdpsTerms(NamedTuple):
    """The two maps an Mdps score is made of, at the denoiser's size, before they are fused."""

    difference: torch.Tensor | None  # (B, 1, h, w): D̄ of the final pass, blurred; None when not sampled
    density: torch.Tensor | None  # (B, 1, h, w): the standardised density, blurred; None without it
    memory: torch.Tensor | None  # (B, 1, h, w): the standardised patch-memory distance, blurred; None without it
    reconstruction: torch.Tensor | None
    mask: torch.Tensor | None

    @property
    def maps(self) -> list[torch.Tensor | None]:
        """The terms in ``TERM_NAMES`` order."""
        return [self.difference, self.density, self.memory]


class MdpsModel(DynamicBufferMixin, PixelSpaceModel):
    """MDPS (Wu et al.): reconstruct the normal image by masked diffusion posterior sampling.

    Images enter in [0, 1] at ``full_size`` (``input_scale`` × ``image_size``) and maps leave at
    it. The diffusion path sees them box-filtered down to ``image_size``, in [-1, 1]; the
    perceptual difference uses an offline ImageNet EfficientNet-Lite.

    Args:
        image_size: (height, width) the denoiser runs at (``set_image_size`` changes it).
        unet_channels: widths of the UNet levels (one halving between levels).
        layers_per_block: residual blocks per UNet level.
        attention_levels: self-attention per UNet level (default: none).
        num_train_timesteps, beta_start, beta_end: the DDPM training schedule.
        noise_level: T, the level sampling starts from (Algorithm 1).
        num_steps: N, DDIM steps from T to 0.
        guidance_scale: ρ of eq. 16 in the final (masked) pass; the authors' ``w``.
        mask_guidance_scale: ρ in the first pass (m = 1) that finds the mask; the authors'
            ``w_mask`` (``None``: ``guidance_scale``).
        guidance_norm: ``plain`` (‖y − x̂0‖, rescaled so that ρ means the same at every image size
            and mask area) or ``squared`` (eq. 16 as written); see ``sampler.guidance_objective``.
        ddim_eta: η of the DDIM update (eq. 4); 1 is the paper's σ_t.
        num_samples: N_s posterior samples averaged in eq. 19.
        use_mask: run the second pass with the mask of eq. 20 (``False``: one pass with m = 1).
        mask_threshold: λ of eq. 20 (``per_image`` and ``batch`` modes).
        threshold_mode: ``normal`` (the ``mask_quantile`` of D̄ on held-out normal training
            images), ``per_image`` or ``batch`` (min + λ·(max − min) of eq. 20).
        mask_quantile: quantile of the normal images' first-pass D̄ pixels above which a pixel is
            masked (``normal`` mode).
        standardize: divide each term of eq. 18 by its spread on held-out normal images, so
            that pixel and perceptual terms are balanced by data, not by a hand-set η.
        guidance: ``dps`` (gradient through the UNet) or ``jacobian_free`` (exportable).
        masked_guidance: restrict the guidance residual to the mask region.
        pixel_weight: η of eq. 18 (images in [0, 1], L1 averaged over channels).
        backbone, feature_layers: perceptual network and its stages J of eq. 18.
        feature_pool_size: local averaging of features before the cosine (authors' code: 3).
        backbone_input_size: resize images to this before the backbone (``None``: the image
            size scaled to a 256 px short side, keeping the aspect ratio); small diffusion
            resolutions give the backbone too few pixels otherwise.
        blur_sigma: σ of the Gaussian smoothing of the map, given at 256 px.
        top_k: S of the image score at 256 px; scales with the image area.
        ema_decay: decay of the EMA denoiser used for sampling.
        train_max_noise_level: train only on levels up to this (``None``: all, as the paper).
        seed: seed of the denoiser's initialisation, of training (see the Lightning module), of
            the sampling noise (drawn once, shared by every image) and of the density's channels.
        density_weight: weight of a term that is not in MDPS: the Mahalanobis distance of the
            input's backbone features to a per-location Gaussian of normal training features
            (PaDiM's model), added to the final map. 0 maps eq. 18–19 alone, as the paper.
            Standardised at each location by its mean and spread on the held-out normal images
            (``density_statistics``).
        score_density_weight: weight of the same density term in the image score (the top-S mean
            of D̄ + ``score_density_weight`` × density). Separate from ``density_weight`` because
            the two metrics want different weights: a 64 px denoiser's D̄ locates defects well but
            its image-level maxima on normal images vary (MVTec 3D tire), while the density ranks
            whole images better than it outlines defects. With both 0 the score is the paper's.
        density_dims: backbone channels (seeded random choice) the Gaussian models.
        density_statistics: ``per_location`` (each location's own mean and spread on the held-out
            normal images, the spread floored at ``DENSITY_SPREAD_FLOOR`` × the spread over all
            locations) or ``global`` (one mean and spread for the whole map).
        input_scale: images enter at ``input_scale`` × ``image_size``. The denoiser and eq. 18 see
            them box-filtered down to ``image_size``; the feature density sees them as they came,
            so it keeps the detail the denoiser's resolution drops (a small dark defect on a tyre
            at 64 px). 1: images enter at the denoiser's size, as the paper.
        score_fusion: ``auto``: the map and the image score are each a weighted mean of D̄, the
            density and the patch memory's distance, with weights chosen by ``choose_fusion`` on the
            selection split (held-out normal training images and synthetic defects) while the model
            trains, and saved with it; until then, and with ``fixed``, D̄ + ``density_weight``·density
            (map) and D̄ + ``score_density_weight``·density (score). Scoring computes only the terms
            the weights use (``needed_terms``): where D̄ has no share, it skips the diffusion passes.
        memory_size: normal training patches in the patch memory (``score_fusion='auto'`` only; 0:
            none). Its term, not in MDPS, is each patch's distance to the nearest normal patch from
            anywhere in the training images (PatchCore's idea), for parts that do not sit in the
            same place in every image, where a per-location Gaussian fails.
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
        noise_level: int = 200,
        num_steps: int = 5,
        guidance_scale: float = 0.0,
        mask_guidance_scale: float | None = 1.0,
        guidance_norm: GuidanceNorm | str = GuidanceNorm.SQUARED,
        ddim_eta: float = 1.0,
        num_samples: int = 4,
        use_mask: bool = True,
        mask_threshold: float = 0.5,
        threshold_mode: ThresholdMode | str = ThresholdMode.NORMAL,
        mask_quantile: float = 0.2,
        standardize: bool = True,
        guidance: Guidance | str = Guidance.JACOBIAN_FREE,
        masked_guidance: bool = True,
        pixel_weight: float = 1.0,
        backbone: str = "tf_efficientnet_lite0",
        feature_layers: Sequence[str] = ("blocks.1", "blocks.2", "blocks.4"),
        feature_pool_size: int = 3,
        backbone_input_size: Sequence[int] | None = None,
        blur_sigma: float = 4.0,
        top_k: int = 500,
        ema_decay: float = 0.995,
        train_max_noise_level: int | None = 400,
        seed: int = 0,
        density_weight: float = 0.5,
        score_density_weight: float = 4.0,
        density_dims: int = 100,
        density_statistics: DensityStatistics | str = DensityStatistics.PER_LOCATION,
        input_scale: int = 4,
        score_fusion: ScoreFusion | str = ScoreFusion.AUTO,
        memory_size: int = 16384,
    ) -> None:
        super().__init__()
        if input_scale < 1:
            msg = f"input_scale must be an integer >= 1, got {input_scale}."
            raise ValueError(msg)
        self.input_scale = int(input_scale)
        self.unet_channels = tuple(unet_channels)
        check_noise_level(noise_level, num_train_timesteps)
        if num_samples < 1:
            msg = f"num_samples must be >= 1, got {num_samples}."
            raise ValueError(msg)
        if not 0 < mask_quantile < 1:
            msg = f"mask_quantile must be in (0, 1), got {mask_quantile}."
            raise ValueError(msg)
        self.noise_level = noise_level
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.mask_guidance_scale = guidance_scale if mask_guidance_scale is None else mask_guidance_scale
        self.guidance_norm = GuidanceNorm(guidance_norm)
        self.ddim_eta = ddim_eta
        self.num_samples = num_samples
        self.use_mask = use_mask
        self.mask_threshold = mask_threshold
        self.threshold_mode = ThresholdMode(threshold_mode)
        self.mask_quantile = mask_quantile
        self.standardize = standardize
        self.guidance = Guidance(guidance)
        self.masked_guidance = masked_guidance
        self.pixel_weight = pixel_weight
        self.feature_pool_size = feature_pool_size
        self.fixed_backbone_input_size = tuple(int(v) for v in backbone_input_size) if backbone_input_size else None
        self.top_k_at_256 = top_k
        self.blur_sigma = blur_sigma
        self.train_max_noise_level = train_max_noise_level
        self.seed = seed
        for name, weight in (("density_weight", density_weight), ("score_density_weight", score_density_weight)):
            if weight < 0:
                msg = f"{name} must be >= 0, got {weight}."
                raise ValueError(msg)
        self.density_weight = density_weight
        self.score_density_weight = score_density_weight
        self.density_statistics = DensityStatistics(density_statistics)
        self.score_fusion = ScoreFusion(score_fusion)

        self.prior = DiffusionPrior(
            image_size, 3, unet_channels, layers_per_block, attention_levels,
            num_train_timesteps, beta_start, beta_end, ema_decay, seed,
        )
        self.feature_extractor = FeatureExtractor(backbone, feature_layers)
        self.feature_density = FeatureDensity(sum(self.feature_extractor.channels), density_dims, seed)
        use_memory = self.score_fusion == ScoreFusion.AUTO and memory_size > 0
        self.patch_memory = PatchMemory(memory_size, seed) if use_memory else None
        self.register_buffer("sampling_noise", torch.empty(0), persistent=False)
        track_input_size(self)
        self.set_image_size(image_size)
        # Normal-image statistics (see ``calibrate``); saved with the weights.
        self.register_buffer("term_scale", torch.ones(2))  # spread of the pixel and perceptual terms
        # Mean and spread of the density term: (2,), or (2, h, w) per location (``density_statistics``).
        self.register_buffer("density_scale", torch.tensor([0.0, 1.0]))
        self.register_buffer("memory_scale", torch.tensor([0.0, 1.0]))  # mean and spread of the memory's distance
        self.register_buffer("normal_mask_threshold", torch.tensor(float("inf")))
        self.register_buffer("calibrated", torch.tensor(False))
        # Weights of D̄, the density and the memory in the map (row 0) and the image score (row 1).
        self.register_buffer("fusion", self.fixed_fusion())
        # What ``choose_fusion`` measured on the selection split (NaN until it ran): image (row 0) and
        # pixel (row 1) AUROC of each term alone, then of the chosen mix.
        self.register_buffer("selection_metrics", torch.full((2, len(TERM_NAMES) + 1), float("nan")))

    def fusion_report(self) -> dict[str, float]:
        """The fusion weights in use and what ``choose_fusion`` measured on the selection split."""
        report = {}
        for row, use in enumerate(("map", "score")):
            report |= {f"fusion_{use}_{name}": float(w) for name, w in zip(TERM_NAMES, self.fusion[row], strict=True)}
        for row, level in enumerate(("image", "pixel")):
            for name, value in zip((*TERM_NAMES, "fused"), self.selection_metrics[row], strict=True):
                report[f"selection_{level}_AUROC_{name}"] = float(value)
        return report

    def optional_state(self) -> dict[str, torch.Tensor]:
        """Tensors that weights saved before the fusion was chosen at fit time lack, as they scored then:
        the fixed weights, no selection metrics, an empty patch memory.
        """
        state = {
            "fusion": self.fixed_fusion().to(self.fusion.device),
            "selection_metrics": torch.full_like(self.selection_metrics, float("nan")),
            "memory_scale": torch.tensor([0.0, 1.0], device=self.memory_scale.device),
        }
        if self.patch_memory is not None:
            state["patch_memory.memory"] = self.patch_memory.memory[:0]
        return state

    def fixed_fusion(self) -> torch.Tensor:
        """The (2, 2) coefficients of ``score_fusion='fixed'``: D̄ + ``density_weight``·density (map),
        D̄ + ``score_density_weight``·density (score).
        """
        return torch.tensor([[1.0, self.density_weight, 0.0], [1.0, self.score_density_weight, 0.0]])

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        # Weights saved before the fusion was chosen at fit time carry the fixed weights they scored with.
        for name, value in self.optional_state().items():
            state_dict.setdefault(prefix + name, value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----------------------------------------------------------------- training
    def training_loss(self, images: torch.Tensor) -> torch.Tensor:
        """ε-prediction loss (eq. 5) of the denoiser on normal images in [0, 1]."""
        images, _ = self._checked(images)
        return self.prior.training_loss(images * 2 - 1, self.train_max_noise_level, reduction="sum")

    def update_ema(self) -> None:
        self.prior.update_ema()

    @torch.no_grad()
    def accumulate_feature_density(self, images: torch.Tensor) -> None:
        """Add normal training images in [0, 1] to the sums of the feature density and to the patch
        memory's collection (see ``fit_feature_density``).
        """
        if len(images):
            _, full = self._checked(images)
            embedding = self.feature_density.embedding(self.features(full))
            self.feature_density.accumulate(embedding)
            if self.patch_memory is not None:
                self.patch_memory.accumulate(embedding)

    @torch.no_grad()
    def fit_feature_density(self, normal_images: torch.Tensor | None = None, batch_size: int = 8) -> None:
        """Fit the per-location Gaussian and draw the patch memory from normal training images (those
        passed here and any accumulated before); the backbone is frozen, so one pass suffices.
        """
        if normal_images is not None:
            for chunk in normal_images.split(batch_size):
                self.accumulate_feature_density(chunk)
        self.feature_density.fit()
        if self.patch_memory is not None:
            self.patch_memory.fit()

    # ---------------------------------------------------------------- inference
    def forward(self, images: torch.Tensor) -> InferenceBatch:
        output = self.reconstruct(images)
        return InferenceBatch(pred_score=output.pred_score, anomaly_map=output.anomaly_map)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> MdpsOutput:
        """Score images in [0, 1]: two MDPS passes (m = 1, then m of eq. 20), maps and scores.

        Only the terms the fusion weighs are computed (``needed_terms``): without D̄ the passes are
        skipped, and the output is the same without the reconstruction and the mask; without the
        density or the memory, their distances are.
        """
        terms = self.terms(images, self.needed_terms)
        return MdpsOutput(
            pred_score=top_k_mean_score(fused(terms.maps, self.fusion[1]), self.top_k),
            anomaly_map=self._at_input_size(fused(terms.maps, self.fusion[0]), images),
            reconstruction=terms.reconstruction,
            mask=terms.mask,
            score_terms=self.score_terms(terms),
        )

    def score_terms(self, terms: MdpsTerms) -> torch.Tensor:
        """(B, 3): the image score (top-S mean) of each term alone, NaN for a term not computed."""
        present = next(term for term in terms.maps if term is not None)
        nan = torch.full_like(present[:, 0, 0, 0], float("nan"))
        return torch.stack([nan if term is None else top_k_mean_score(term, self.top_k) for term in terms.maps], dim=1)

    @torch.no_grad()
    def terms(self, images: torch.Tensor, needed: Sequence[bool] = (True, True, True)) -> MdpsTerms:
        """D̄ of the final pass (eqs. 18-19), the density and the memory, at the denoiser's size, unfused.

        ``needed`` (one flag per term, in ``TERM_NAMES`` order) leaves terms out as None; without D̄
        both sampling passes are skipped and ``reconstruction`` and ``mask`` are None too.
        """
        with_difference, with_density, with_memory = needed
        images, full = self._checked(images)
        self._check_calibrated()
        density, memory = self.feature_maps(full, images.shape[-2:], with_density, with_memory)
        if not with_difference:
            return MdpsTerms(None, density, memory, None, None)
        y, noise, features_y, samples = self._first_pass(images)
        mask = torch.ones_like(y[:, :1])
        difference = self.difference_map(samples, images, features_y)
        if self.use_mask:
            mask = anomalous_region_mask(
                difference, self.mask_threshold, self.threshold_mode, self.normal_mask_threshold,
            )
            samples = self._posterior_samples(
                y, mask.repeat_interleave(self.num_samples, dim=0), noise, self.guidance_scale,
            )
            difference = self.difference_map(samples, images, features_y)
        else:
            mask = mask[:: self.num_samples]
        return MdpsTerms(difference, density, memory, samples[:: self.num_samples], mask)

    @torch.no_grad()
    def choose_fusion(self, split: SelectionSplit, batch_size: int = 8) -> FusionChoice:
        """Set ``fusion`` from the selection split: the weights of D̄, the density and the memory in
        the map and in the image score that separate its synthetic defects best (``choose_fusion`` of
        ``anomaly_map``). Needs the normal-image statistics (``calibrate``) first.
        """
        if not self.uses_density:
            msg = "score_fusion='auto' needs the feature density; it is off (fixed fusion with both weights 0)."
            raise RuntimeError(msg)
        maps: list[list[torch.Tensor | None]] = []
        for chunk in split.images.split(batch_size):
            maps.append(self.terms(chunk).maps)
        terms = [None if parts[0] is None else torch.cat(parts) for parts in zip(*maps, strict=True)]
        choice = choose_fusion(terms, split.labels, split.masks, self.top_k)
        self.fusion.copy_(choice.coefficients.to(self.fusion))
        self.selection_metrics.copy_(choice.metrics.to(self.selection_metrics))
        return choice

    @torch.no_grad()
    def calibrate(self, normal_images: torch.Tensor, batch_size: int = 8) -> None:
        """Measure the eq.-18 terms and the first-pass D̄ on normal images the denoiser never saw.

        ``density_scale``: the mean and spread of the density term's distances there (see
        ``normal_density_statistics``).
        ``term_scale``: the standard deviation of the pixel and of the perceptual term over all
        pixels and samples of the first pass (m = 1), so that ``standardize`` weighs both by
        their spread on normal data. ``normal_mask_threshold``: the ``mask_quantile`` of the
        first-pass D̄ over those pixels (``threshold_mode='normal'``). Only normal training
        images enter: nothing of the test set.
        """
        self._check_density_fitted()
        pixel, perceptual, density, memory = [], [], [], []
        for full_chunk in normal_images.split(batch_size):
            chunk, full_chunk = self._checked(full_chunk)
            _, _, features_y, samples = self._first_pass(chunk)
            distances = self._feature_distances(full_chunk, chunk.shape[-2:])
            if distances[0] is not None:
                density.append(distances[0])
            if distances[1] is not None:
                memory.append(distances[1])
            pixel.append(pixel_difference(samples, chunk.repeat_interleave(self.num_samples, dim=0)))
            perceptual.append(
                perceptual_difference(self.features(samples), features_y, tuple(chunk.shape[-2:]), self.feature_pool_size),
            )
        pixel, perceptual = torch.cat(pixel), torch.cat(perceptual)
        self.term_scale.copy_(torch.stack([pixel.std(), perceptual.std()]).clamp(min=1e-6))
        if density:
            self.density_scale = normal_density_statistics(torch.cat(density), self.density_statistics)
        if memory:
            # One mean and spread for the whole map: the memory's distance does not depend on where a patch is.
            self.memory_scale.copy_(normal_density_statistics(torch.cat(memory), DensityStatistics.GLOBAL))
        self.calibrated.fill_(True)
        difference = self._smoothed_mean(weighted_terms(pixel, perceptual, self.pixel_weight, self._term_scale()))
        self.normal_mask_threshold.copy_(_quantile(difference.flatten(), self.mask_quantile))

    def _first_pass(
        self, images: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """y, the sampling noise and y's features repeated N_s times, and the m = 1 posterior samples."""
        y = (images * 2 - 1).repeat_interleave(self.num_samples, dim=0)
        noise = self.noise_for(images.shape[1:]).repeat(1, images.shape[0], 1, 1, 1)
        features_y = [f.repeat_interleave(self.num_samples, dim=0) for f in self.features(images)]
        samples = self._posterior_samples(y, torch.ones_like(y[:, :1]), noise, self.mask_guidance_scale)
        return y, noise, features_y, samples

    @property
    def needed_terms(self) -> tuple[bool, bool, bool]:
        """Which of D̄, the density and the memory weigh in the map or the image score (``fusion``'s
        columns); scoring computes only those. Inside ``exportable`` it is the value read on entry,
        since a buffer's value cannot steer a traced graph.
        """
        at_export = getattr(self, "_terms_at_export", None)
        return at_export if at_export is not None else tuple(bool(used) for used in self.fusion.any(dim=0).tolist())

    @property
    def needs_difference(self) -> bool:
        """Whether D̄ weighs in the map or the image score: scoring samples only then."""
        return self.needed_terms[0]

    @property
    def uses_density(self) -> bool:
        """Whether the map or the image score may add the feature density (not in MDPS)."""
        return self.score_fusion == ScoreFusion.AUTO or self.density_weight > 0 or self.score_density_weight > 0

    @property
    def uses_memory(self) -> bool:
        """Whether the model has a patch memory to score with (weights saved before it existed have none)."""
        return self.patch_memory is not None and self.patch_memory.fitted

    def _feature_distances(
        self, full_images: torch.Tensor, size: Sequence[int], density: bool = True, memory: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The Mahalanobis distances of the input's features (as it entered) to the per-location Gaussian,
        and their distances to the nearest normal patch in the memory, at the denoiser's ``size``;
        None for a term the model does not use or that is not asked for. One backbone pass serves both.
        """
        density, memory = density and self.uses_density, memory and self.uses_density and self.uses_memory
        if not (density or memory):
            return None, None
        embedding = self.feature_density.embedding(self.features(full_images))
        resized = lambda distance: F.interpolate(distance, size=tuple(size), mode="bilinear", align_corners=False)  # noqa: E731
        return (resized(self.feature_density.distance(embedding)) if density else None,
                resized(self.patch_memory.distance(embedding)) if memory else None)

    def _density_distance(self, full_images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Mahalanobis distances of the features of images as they entered, at the denoiser's ``size``."""
        return self._feature_distances(full_images, size)[0]

    def feature_maps(
        self, full_images: torch.Tensor, size: Sequence[int], density: bool = True, memory: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The density and the memory terms (not in MDPS), each standardised by its normal-image mean and
        spread and smoothed; None for a term the model does not use or that is not asked for.
        """
        density, memory = self._feature_distances(full_images, size, density, memory)
        if density is not None:
            density = self.blur((density - self.density_scale[0]) / self.density_scale[1])
        if memory is not None:
            memory = self.blur((memory - self.memory_scale[0]) / self.memory_scale[1])
        return density, memory

    def density_map(self, full_images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """The density term (not in MDPS), standardised by its normal-image mean and spread, smoothed."""
        return self.feature_maps(full_images, size)[0]

    def _check_density_fitted(self) -> None:
        if self.uses_density and not is_tracing() and not self.feature_density.fitted:
            msg = (
                "This Mdps model has no normal feature density (score_fusion 'auto', or density_weight or "
                "score_density_weight > 0). Train it with the Lightning module (it fits the density in the first "
                "epoch), call MdpsModel.fit_feature_density(normal_training_images), or set score_fusion='fixed' "
                "and both weights to 0."
            )
            raise RuntimeError(msg)

    def set_image_size(self, image_size: Sequence[int]) -> None:
        super().set_image_size(image_size)
        self.full_size = (self.image_size[0] * self.input_scale, self.image_size[1] * self.input_scale)

    def _checked(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images at the denoiser's size (box-filtered by ``input_scale``) and as they came."""
        images = as_rgb_batch(images)
        height, width = images.shape[-2:]
        if height % self.input_scale or width % self.input_scale:
            msg = (
                f"Images of {height} x {width} px cannot be reduced by input_scale {self.input_scale}: "
                f"give them at full_size {self.full_size} (input_scale x image_size)."
            )
            raise ValueError(msg)
        small = F.avg_pool2d(images, self.input_scale) if self.input_scale > 1 else images
        return super()._checked(small), images

    def _at_input_size(self, anomaly_map: torch.Tensor, full_images: torch.Tensor) -> torch.Tensor:
        if self.input_scale == 1:
            return anomaly_map
        return F.interpolate(anomaly_map, size=full_images.shape[-2:], mode="bilinear", align_corners=False)

    def _check_calibrated(self) -> None:
        self._check_density_fitted()
        needs_statistics = self.standardize or (self.use_mask and self.threshold_mode == ThresholdMode.NORMAL)
        if needs_statistics and not is_tracing() and not bool(self.calibrated):
            msg = (
                "This Mdps model has no normal-image statistics (standardize / threshold_mode='normal'). "
                "Train it with the Lightning module (it calibrates on held-out training images), call "
                "MdpsModel.calibrate(normal_images), or set standardize=False and threshold_mode='per_image'."
            )
            raise RuntimeError(msg)

    def _posterior_samples(
        self, y: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor, guidance_scale: float,
    ) -> torch.Tensor:
        """N_s posterior samples per image (Algorithm 1), returned in [0, 1]."""
        samples = masked_posterior_sampling(
            self.prior.sampling_denoiser,
            self.prior.alpha_bar,
            y,
            mask,
            noise,
            noise_level=self.noise_level,
            num_steps=self.num_steps,
            guidance_scale=guidance_scale,
            eta=self.ddim_eta,
            guidance=self.guidance,
            masked_guidance=self.masked_guidance,
            guidance_norm=self.guidance_norm,
        )
        return ((samples + 1) / 2).clamp(0, 1)

    def difference_map(
        self,
        samples: torch.Tensor,
        images: torch.Tensor,
        features_y: list[torch.Tensor],
    ) -> torch.Tensor:
        """D̄ of eq. 19 over the eq.-18 differences of each image's N_s samples, smoothed."""
        difference = reconstruction_difference(
            samples,
            images.repeat_interleave(self.num_samples, dim=0),
            self.features(samples),
            features_y,
            self.pixel_weight,
            self.feature_pool_size,
            self._term_scale(),
        )
        return self._smoothed_mean(difference)

    def _term_scale(self) -> torch.Tensor | None:
        return self.term_scale if self.standardize else None

    def _smoothed_mean(self, difference: torch.Tensor) -> torch.Tensor:
        """D̄ of eq. 19 (the mean over each image's N_s samples), smoothed."""
        return self.blur(mean_over_samples(difference, self.num_samples))

    def noise_for(self, image_shape: Sequence[int]) -> torch.Tensor:
        """The (N + 1, N_s, C, H, W) sampling noise: drawn once from ``seed``, shared by all images.

        Sharing it makes an image's map independent of its batch and lets exported graphs hold
        it as a constant.
        """
        shape = (self.num_steps + 1, self.num_samples, *image_shape)
        if tuple(self.sampling_noise.shape) != shape:
            generator = torch.Generator().manual_seed(self.seed)
            noise = torch.randn(shape, generator=generator)
            self.sampling_noise = noise.to(device=self.prior.alpha_bar.device)
        return self.sampling_noise

    @contextmanager
    def exportable(self) -> Iterator[None]:
        """Within this context ``forward`` can be captured as a graph: guidance without autograd
        (eq. 16 with ∂x̂0/∂x_t ≈ I/√ᾱ_t) and the sampling noise fixed as a constant buffer.
        """
        guidance = self.guidance
        self.guidance = Guidance.JACOBIAN_FREE
        self.noise_for((3, *self.image_size))
        self._terms_at_export = self.needed_terms
        try:
            yield
        finally:
            self.guidance = guidance
            del self._terms_at_export


def normal_density_statistics(distances: torch.Tensor, statistics: DensityStatistics) -> torch.Tensor:
    """Mean and spread of held-out normal images' density distances (N, 1, h, w): (2,) or (2, h, w).

    Per location, because normal images' distances do not vary alike everywhere (MVTec 3D tire:
    from 0.42 to 2.24 times the spread over all locations, 1st to 99th percentile), and with one
    global spread the image score's top pixels are those where normal images vary most, often
    at the borders. Fewer than two images give no per-location spread; the global statistics
    stand in.
    """
    spread = distances.std().clamp(min=1e-6)
    if statistics == DensityStatistics.GLOBAL or distances.shape[0] < 2:
        return torch.stack([distances.mean(), spread])
    local_spread = distances.std(dim=0)[0].clamp(min=DENSITY_SPREAD_FLOOR * float(spread))
    return torch.stack([distances.mean(dim=0)[0], local_spread])


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile without its 16 M element limit (linear interpolation, as torch's default)."""
    ordered = values.sort().values
    position = q * (ordered.numel() - 1)
    low = int(position)
    high = min(low + 1, ordered.numel() - 1)
    return torch.lerp(ordered[low], ordered[high], position - low)
