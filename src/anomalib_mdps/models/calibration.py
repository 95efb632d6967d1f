"""Normal training images held out of the denoiser's training, for MDPS's normal-image statistics.

The held-out set is a function of the file names alone (a CRC-32 rank), so it is the same on
every machine, in every run and on every DDP rank. The images are read from the training dataset
when training starts, so that every rank holds all of them, not only those of its own shard.
"""

import logging
import zlib
from collections.abc import Callable
from pathlib import PurePath

import torch
from anomalib.data import Batch

from anomalib_mdps.data_checks import split_image_paths

logger = logging.getLogger(__name__)


def image_key(path: str) -> str:
    """The last two path components ("good/000.png"): stable across dataset locations."""
    return "/".join(PurePath(path).parts[-2:])


def held_out_keys(paths: list[str], count: int) -> set[str]:
    """The ``count`` images with the smallest CRC-32 of their key, leaving at least half to train on."""
    keys = sorted({image_key(path) for path in paths}, key=lambda key: (zlib.crc32(key.encode()), key))
    return set(keys[: min(count, len(keys) // 2)])


class CalibrationHoldout:
    """Chooses, splits off and keeps the held-out normal images of one training run."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.keys: set[str] = set()
        self.images: dict[str, torch.Tensor] = {}
        self.stale = False

    def choose(self, datamodule: object) -> None:
        """Pick the held-out images among the datamodule's training images and read them."""
        self.images = {}
        paths = split_image_paths(datamodule, "train_data")
        if self.count <= 0 or not paths:
            if self.count > 0:
                logger.warning("No training image list found: Mdps trains on every image and is not calibrated.")
            self.keys = set()
            return
        dataset = datamodule.train_data
        self.keys = held_out_keys(paths, self.count)
        for index, path in enumerate(paths):
            key = image_key(path)
            if key in self.keys and key not in self.images:
                self.images[key] = dataset[index].image

    def split_off(self, batch: Batch) -> torch.Tensor:
        """The batch's images to train on: all but the held-out ones."""
        paths = batch.image_path
        if not self.keys or paths is None:
            return batch.image
        keep = torch.tensor([image_key(path) not in self.keys for path in paths], device=batch.image.device)
        return batch.image[keep]

    def stacked(self, transform: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> torch.Tensor:
        """The held-out images in key order, each through ``transform`` (the model's resize)."""
        return torch.stack([transform(self.images[key]) for key in sorted(self.images)]).to(device)
