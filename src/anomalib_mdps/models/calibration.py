"""Normal training images held out of training: a calibration part, for the normal-image statistics,
and a selection part, from which ``selection_split`` makes the images that settings are chosen on.

The held-out set is a function of the file names alone (a CRC-32 rank), so it is the same on
every machine, in every run and on every DDP rank; no test image can enter it, since only the
training dataset's paths are ranked. The images are read from the training dataset when training
starts, so that every rank holds all of them, not only those of its own shard.
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


def held_out_keys(paths: list[str], count: int, selection: int = 0) -> tuple[list[str], list[str]]:
    """Calibration and selection keys: the images with the smallest CRC-32 of their key, the first
    ``count`` for calibration, the next ``selection`` for selection. At least half of the images
    stay to train on; when fewer can be held out, calibration (which the model needs) comes first.
    """
    keys = sorted({image_key(path) for path in paths}, key=lambda key: (zlib.crc32(key.encode()), key))
    available = len(keys) // 2
    count = min(count, available)
    selection = min(selection, available - count)
    return keys[:count], keys[count : count + selection]


class CalibrationHoldout:
    """Chooses, splits off and keeps the held-out normal images of one training run."""

    def __init__(self, count: int, selection: int = 0) -> None:
        self.count = count
        self.selection = selection
        self.keys: set[str] = set()
        self.calibration_keys: list[str] = []
        self.selection_keys: list[str] = []
        self.images: dict[str, torch.Tensor] = {}
        self.stale = False

    def choose(self, datamodule: object) -> None:
        """Pick the held-out images among the datamodule's training images and read them."""
        self.images = {}
        paths = split_image_paths(datamodule, "train_data")
        wanted = max(self.count, 0) + max(self.selection, 0)
        if wanted <= 0 or not paths:
            if wanted > 0:
                logger.warning("No training image list found: the model trains on every image and is not calibrated.")
            self.keys, self.calibration_keys, self.selection_keys = set(), [], []
            return
        dataset = datamodule.train_data
        self.calibration_keys, self.selection_keys = held_out_keys(paths, max(self.count, 0), max(self.selection, 0))
        self.keys = {*self.calibration_keys, *self.selection_keys}
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

    def stacked(
        self, transform: Callable[[torch.Tensor], torch.Tensor], device: torch.device, part: str = "calibration",
    ) -> torch.Tensor:
        """The held-out images of ``part`` (``calibration`` or ``selection``) in key order, each through
        ``transform`` (the model's resize).
        """
        keys = sorted(self.calibration_keys if part == "calibration" else self.selection_keys)
        return torch.stack([transform(self.images[key]) for key in keys]).to(device)

    @property
    def has_selection(self) -> bool:
        return bool(self.selection_keys)
